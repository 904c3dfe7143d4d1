"""Rollout throughput: batched multi-turn rollouts with the KV cache on high-resolution ShapesVQA.

A tiny VLM is warm-started on synthesised pixel-space conversations (configs/pixel_rl.py,
`warm_steps` SFT steps, a few minutes on CPU), so that its rollouts call zoom_in and take several
turns. Then `rollout.rollout` runs `questions` x `group` conversations at temperature 1 (each turn:
prefill of every conversation with all its images, cached token-by-token decoding, the environment
executing the operations), `repeats` times after one untimed call that compiles.

Headline: conversations finished per second (median run). Details: the share of the time spent in
the model (prefill and decoding) and in the environment (parsing, cropping, image preparation, row
building), turns per batch, operations and errors per rollout, tokens generated per second.
Run ``vpd-jax bench rollout --json OUT`` or ``python -m bench.rollout``.
"""

import json
import os
import statistics
import sys
import tempfile

import jax
import numpy as np

from vpd_jax.config_args import load_config_file
from vpd_jax.rl import env as env_lib
from vpd_jax.rl import loop as rl_loop
from vpd_jax.rl import rollout as rollout_lib

GOAL_ROLLOUTS_PER_S = 10.0
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "pixel_rl.py")


def run(warm_steps: int = 300, questions: int = 8, group: int = 4, repeats: int = 3) -> dict:
  import bench  # pylint: disable=g-import-not-at-top
  arg = (f"hires_size=256,target_radius=0.02,warm_steps={warm_steps},warm_examples=256,"
         f"iterations=0,log_every={max(warm_steps, 1)},ckpt_every={max(warm_steps, 1)}")
  config = load_config_file(CONFIG, arg)
  with tempfile.TemporaryDirectory() as workdir:
    rl_loop.train(config, workdir)
    model_config, params, vocab = rl_loop.restore_policy(config, workdir)
  world = rl_loop.World(config.world)
  tasks = []
  for i in range(questions):
    tasks += [rl_loop.World.task(world.example(config.seed + 1, i))] * group
  rollout_config = rollout_lib.RolloutConfig(
      row_length=config.rollout.row_length, max_images=config.rollout.max_images,
      max_new_tokens=config.rollout.max_new_tokens, temperature=1.0, vocab_size=vocab.vocab_size)
  env_config = env_lib.EnvConfig(max_ops=config.env.max_ops, min_crop=config.env.min_crop)
  rollout_lib.rollout(model_config, params, tasks, vocab, jax.random.key(99), rollout_config,
                      env_config)  # compiles
  runs = []
  for r in range(repeats):
    result = rollout_lib.rollout(model_config, params, tasks, vocab, jax.random.key(r),
                                 rollout_config, env_config)
    total = result.model_seconds + result.env_seconds
    written = int(result.rows["loss_mask"].sum())
    runs.append({"rollouts_per_s": len(tasks) / total, "seconds": total,
                 "model_share": result.model_seconds / total,
                 "env_share": result.env_seconds / total, "turns": result.turns,
                 "ops_per_rollout": float(result.num_ops.mean()),
                 "errors_per_rollout": float(np.mean([e.num_errors for e in result.episodes])),
                 "generated_tokens_per_s": written / total})
  median = sorted(runs, key=lambda x: x["rollouts_per_s"])[len(runs) // 2]
  details = {"rollouts": len(tasks), "questions": questions, "group": group,
             "warm_steps": warm_steps, "model": config.model.size,
             "row_length": rollout_config.row_length, "max_new_tokens_per_turn":
             rollout_config.max_new_tokens, "max_ops": env_config.max_ops,
             "median_run": {k: round(v, 4) for k, v in median.items()},
             "all_runs_rollouts_per_s": [round(x["rollouts_per_s"], 2) for x in runs],
             "model_share_mean": round(statistics.mean(x["model_share"] for x in runs), 4),
             "env_share_mean": round(statistics.mean(x["env_share"] for x in runs), 4)}
  return {"name": "rollout", "metric": "rollouts_per_s",
          "value": round(median["rollouts_per_s"], 2),
          "unit": f"conversations/s ({config.model.size}, batch of {len(tasks)}, KV cache)",
          "goal": GOAL_ROLLOUTS_PER_S, "higher_is_better": True,
          "device": bench.device_description(), "details": details}


if __name__ == "__main__":
  print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 300), indent=2))
