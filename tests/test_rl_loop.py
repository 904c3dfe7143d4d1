"""Tests for vpd_jax.rl.loop through `vpd-jax train --config=configs/pixel_rl.py`: warm start, GRPO
iterations with their metrics, and resuming from the latest checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vpd_jax.config_args import load_config_file
from vpd_jax.rl import loop as rl_loop
from vpd_jax.rl import warmstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ("hires_size=192,target_radius=0.03,warm_steps=2,warm_examples=8,warm_batch=4,questions=2,"
        "group=2,row_length=224,max_new_tokens=12,eval_every=1,eval_questions=2,ckpt_every=1,"
        "log_every=1,kl_coef=0.01")


def _train(workdir, extra):
  # One device, whatever device count other test modules of this process forced through XLA_FLAGS.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
      [sys.executable, "-m", "vpd_jax.main", "train",
       f"--config=configs/pixel_rl.py:{BASE},{extra}", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**env, "JAX_PLATFORMS": "cpu"})


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_config_defaults_are_the_papers_and_unknown_keys_are_named():
  config = load_config_file(os.path.join(ROOT, "configs", "pixel_rl.py"))
  assert config.trainer == "pixel_rl" and config.reward.variant == "paper"
  assert (config.reward.target_rapr, config.reward.op_budget, config.reward.alpha,
          config.reward.beta) == (0.3, 1, 0.5, 0.05)
  assert config.grpo.drop_zero_groups and config.grpo.temperature == 1.0
  with pytest.raises(ValueError, match="curiosity"):
    load_config_file(os.path.join(ROOT, "configs", "pixel_rl.py"), "curiosity=1")


def test_mixed_world_alternates_images_and_videos_with_their_warm_start_turns():
  config = load_config_file(os.path.join(ROOT, "configs", "pixel_rl.py"),
                            "world=mixed,hires_size=192,target_radius=0.03,video_size=48")
  world = rl_loop.World(config.world)
  image, clip = world.example(0, 0), world.example(0, 1)
  image_task, clip_task = rl_loop.World.task(image), rl_loop.World.task(clip)
  assert not image_task.is_video and clip_task.is_video
  assert clip_task.visual.shape == (8, 48, 48, 3) and clip_task.overview.ndim == 3
  rng = np.random.default_rng(0)
  assert "zoom_in(<loc" in rl_loop.World.turns(image, "zoom", rng)[0]
  turns = rl_loop.World.turns(clip, "zoom", rng)
  assert turns[0].endswith(f"select_frames({clip.frames_needed[0]})")
  episode = warmstart.replay(clip_task, turns)
  assert episode.correct and episode.num_images == 2
  with pytest.raises(ValueError, match="world="):
    rl_loop.World(load_config_file(os.path.join(ROOT, "configs", "pixel_rl.py"),
                                   "world=audio").world)


@pytest.mark.slow
def test_warm_start_then_grpo_then_resume(tmp_path):
  workdir = tmp_path / "run"
  result = _train(workdir, "iterations=1")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _metrics(workdir)
  warm = [m for m in lines if m.get("phase") == 0]
  rl = [m for m in lines if m.get("phase") == 1]
  assert [m["step"] for m in warm] == [1, 2] and [m["step"] for m in rl] == [3]
  for key in ("reward", "correctness", "curiosity", "penalty", "rapr", "ops_per_rollout",
              "accuracy", "kept_groups", "model_seconds", "env_seconds", "loss"):
    assert key in rl[0], key
  assert 0.0 <= rl[0]["rapr"] <= 1.0 and warm[0]["tokens"] > 0
  assert {m["step"] for m in lines if "eval_accuracy" in m} == {2, 3}
  assert (workdir / "vocab.model").exists() and (workdir / "reference").exists()
  assert rl[0]["kl"] >= 0.0  # the KL to the warm-start model is computed and reported
  # One more iteration: the run restores step 3 and only adds step 4.
  result = _train(workdir, "iterations=2")
  assert result.returncode == 0, result.stderr[-3000:]
  steps = [m["step"] for m in _metrics(workdir) if "phase" in m]
  assert steps == [1, 2, 3, 4]
  assert json.loads(result.stdout.strip().splitlines()[-1])["phase"] == 1.0
