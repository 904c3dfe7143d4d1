"""The Pixel Reasoner driver: warm-start SFT steps, then GRPO iterations with the curiosity reward.

  train(config, workdir)        (`vpd-jax train --config=configs/pixel_rl.py:... --workdir=W`)

  1. Warm start: conversations synthesised from the worlds' reference-program traces
     (warmstart.py: zooms, wrong-zoom-then-correct, text-only; frame selection for videos), SFT
     with the loss on the model's turns, `warmstart.steps` optimizer steps.
  2. GRPO: each iteration samples `questions` new questions, rolls out G conversations per question
     with the KV cache (rollout.py), scores them (rewards.py), computes group advantages and takes
     one "grpo" step (grpo.py). Groups whose advantages are all zero are dropped (their loss mask
     is cleared) unless `keep_zero_groups`.

Both phases go through steps.make_train_step with one TrainState, so optimizer step s is warm-start
step s for s <= warmstart.steps and GRPO iteration s - warmstart.steps after. Questions are drawn
deterministically from (seed, step), so a run restored from its latest checkpoint
(checkpoints/STEP/, train/checkpoint.Checkpointer) continues as an uninterrupted one would.
metrics.jsonl gets one line per step: warm start {"step", "phase": 0, "loss", ...}; GRPO
{"step", "phase": 1, "loss", "reward", "correctness", "curiosity", "penalty", "rapr",
"ops_per_rollout", "accuracy", "error_rate", "kept_groups", "model_seconds", "env_seconds", ...};
with evaluation on, {"step", "eval_accuracy", "eval_rapr", "eval_ops"} from greedy rollouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import tensorflow as tf

from vpd_jax import sharding as sharding_lib
from vpd_jax.data import vocab as vocab_lib
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.rl import conversation
from vpd_jax.rl import env as env_lib
from vpd_jax.rl import grpo
from vpd_jax.rl import rewards as rewards_lib
from vpd_jax.rl import rollout as rollout_lib
from vpd_jax.rl import warmstart
from vpd_jax.train import checkpoint as checkpoint_lib
from vpd_jax.train import loop as train_loop
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib
from vpd_jax.train import steps
from vpd_jax.worlds import hires
from vpd_jax.worlds import video

WORLDS = ("hires", "video", "mixed")
# Separate example streams: warm start, GRPO questions and evaluation never share a question.
_WARM, _RL, _EVAL = 0, 1, 2


class World:
  """Questions of the configured world as environment tasks, and their warm-start turns."""

  def __init__(self, config):
    if config.name not in WORLDS:
      raise ValueError(f"config world={config.name!r} is unknown; expected one of {WORLDS}")
    self.name = config.name
    self.hires = hires.HiresConfig(width=config.hires_size, height=config.hires_size,
                                   target_radius=config.target_radius)
    self.video = video.VideoConfig(num_frames=config.video_frames, size=config.video_size)

  def example(self, seed: int, index: int):
    use_video = self.name == "video" or (self.name == "mixed" and index % 2 == 1)
    if use_video:
      return video.generate_video_example(seed, index, self.video)
    return hires.generate_hires_example(seed, index, self.hires)

  @staticmethod
  def task(example) -> env_lib.Task:
    if isinstance(example, video.VideoExample):
      return env_lib.Task(example.frames, example.question, list(example.answers), is_video=True,
                          overview=example.overview, task_id=example.example_id)
    return env_lib.Task(example.image, example.question, list(example.answers),
                        task_id=example.example_id)

  @staticmethod
  def turns(example, kind: str, rng: np.random.Generator) -> list[str]:
    if isinstance(example, video.VideoExample):
      return warmstart.video_turns(example.frames_needed, example.answers[0], kind)
    events = warmstart.reference_trace(example.program, example.image)
    height, width = example.image.shape[:2]
    return warmstart.image_turns(warmstart.crop_boxes(events), example.answers[0], width, height,
                                 kind, rng)


def _episode_texts(episodes) -> list[str]:
  texts = []
  for e in episodes:
    texts.append(conversation.prompt_text(e.task.question))
    texts.extend(s.text for s in e.segments if s.kind != "image")
  return texts


def _vocabulary(config, path: str, episodes, vocab_size_limit: int):
  """The configured vocabulary, or one trained on the warm-start conversations into `path`."""
  if not tf.io.gfile.exists(path):
    if config.vocab:
      raise FileNotFoundError(f"config vocab={config.vocab!r} does not exist")
    error_examples = ["Execution Error: the box is outside the image; coordinates must be in "
                      "[0, 1]", "Execution Error: select_frames needs at least one frame index"]
    vocab_lib.train_vocabulary(_episode_texts(episodes) + error_examples, path,
                               vocab_size=min(4000, vocab_size_limit))
  vocab = vocab_lib.load_vocabulary(path)
  if vocab.vocab_size > vocab_size_limit:
    raise ValueError(f"vocabulary {path} has {vocab.vocab_size} pieces; the model holds "
                     f"{vocab_size_limit}")
  return vocab


def _check(config) -> None:
  for key, value in (("warmstart.steps", config.warmstart.steps),
                     ("grpo.iterations", config.grpo.iterations)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"config {key}={value!r}: expected a number of steps >= 0")
  for key, value in (("grpo.group_size", config.grpo.group_size),
                     ("grpo.questions", config.grpo.questions), ("log_every", config.log_every),
                     ("checkpoint.every", config.checkpoint.every),
                     ("warmstart.examples", config.warmstart.examples),
                     ("warmstart.batch_size", config.warmstart.batch_size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config {key}={value!r}: expected a positive integer")


def train(config: Any, workdir: str) -> dict:
  """Runs (or resumes) the warm start and GRPO as `config` says; returns the last step's metrics."""
  with contextlib.ExitStack() as cleanup:
    return _train(config, workdir, cleanup)


def _train(config, workdir, cleanup) -> dict:
  _check(config)
  tf.io.gfile.makedirs(workdir)
  mesh_spec = [tuple(axis) for axis in config.mesh]
  mesh_spec += [(n, 1) for n in train_loop.MESH_AXES if n not in {a[0] for a in mesh_spec}]
  mesh = sharding_lib.make_mesh(mesh_spec)
  rules = sharding_lib.DEFAULT_RULES
  model_config = sizes.from_model_section(config.model)
  model = vlm.VLM(model_config)
  world = World(config.world)
  env_config = env_lib.EnvConfig(max_ops=config.env.max_ops, min_crop=config.env.min_crop,
                                 max_frames=config.env.max_frames)
  reward_config = rewards_lib.RewardConfig(**config.reward)
  seed = config.seed

  # ---------------------------------------------------------------- warm-start data and vocabulary
  ws = config.warmstart
  mix = warmstart.WarmStartMix(self_correction=ws.self_correction, text_only=ws.text_only)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                     model_size=config.model.size,
                                     max_to_keep=config.checkpoint.keep)
  cleanup.callback(ckpt.close)
  # A run restored past its warm start needs no warm-start data (its vocabulary is in workdir).
  vocab_path = config.vocab or os.path.join(workdir, "vocab.model")
  warm_left = ws.steps > (ckpt.latest_step() or 0)
  warm_episodes = []
  for i in range(ws.examples if warm_left or not tf.io.gfile.exists(vocab_path) else 0):
    example = world.example(seed + _WARM, i)
    rng = np.random.default_rng([seed, i, 3])
    turns = World.turns(example, mix.pick(rng), rng)
    warm_episodes.append(warmstart.replay(World.task(example), turns, env_config))
  vocab = _vocabulary(config, vocab_path, warm_episodes, model_config.llm.vocab_size)
  rollout_config = rollout_lib.RolloutConfig(
      row_length=config.rollout.row_length, max_images=config.rollout.max_images,
      max_new_tokens=config.rollout.max_new_tokens, temperature=config.grpo.temperature,
      vocab_size=vocab.vocab_size)
  warm_rows = None
  if warm_left:
    warm_rows = warmstart.synthesize_rows(warm_episodes, vocab.encode, model_config,
                                          rollout_config.row_length, rollout_config.max_images)

  # ---------------------------------------------------------------- model, optimizers, state
  total = ws.steps + config.grpo.iterations
  # Two optimizers of one structure (only the learning rate differs) share the TrainState.
  optim_configs = {"warm": {"lr": ws.lr, "schedule": "constant"},
                   "grpo": {"lr": config.grpo.lr, "schedule": "constant"}}
  optimizers = {phase: optim.make_optimizer(cfg, max(total, 1))
                for phase, cfg in optim_configs.items()}
  init_inputs = vlm.example_inputs(model_config)
  abstract, shardings = state_lib.abstract_state(model, init_inputs, optimizers["warm"], mesh,
                                                 rules)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(abstract)
  else:
    state, _ = state_lib.create_sharded_state(model, init_inputs, optimizers["warm"], mesh, rules,
                                              rng=seed)
  start = int(np.asarray(state.step.addressable_data(0)))
  apply_fn = conversation.make_apply_fn(model)
  losses = {"warm": steps.get_loss("sft"),
            "grpo": grpo.make_grpo_loss(config.grpo.clip_eps, config.grpo.kl_coef)}
  step_fns = {phase: steps.make_train_step(
      losses[phase], apply_fn, optimizers[phase], mesh, shardings, rules=rules,
      learning_rate_fn=optim.make_schedule(optim_configs[phase], max(total, 1)))
              for phase in losses}

  log = cleanup.enter_context(contextlib.closing(train_loop.MetricsLog(workdir)))
  preempted = checkpoint_lib.PreemptionSignal()
  cleanup.callback(preempted.close)
  ref_params = None
  if config.grpo.kl_coef:
    ref_ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "reference"),
                                           model_size=config.model.size, max_to_keep=1)
    cleanup.callback(ref_ckpt.close)
    if ref_ckpt.latest_step() is not None:
      ref_params = ref_ckpt.restore(abstract)[0].params
  log_probs = jax.jit(lambda p, b: conversation.log_probs_of(apply_fn, p, b))

  def run_step(name, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return step_fns[name](state, sharding_lib.shard_batch(batch, mesh, rules))

  def evaluate(step):
    tasks = [World.task(world.example(seed + _EVAL, i)) for i in range(config.eval.questions)]
    greedy = dataclasses.replace(rollout_config, temperature=0.0)
    result = rollout_lib.rollout(model_config, state.params, tasks, vocab, jax.random.key(0),
                                 greedy, env_config)
    values = {"eval_accuracy": result.correct.mean(), "eval_rapr": (result.num_ops > 0).mean(),
              "eval_ops": result.num_ops.mean()}
    log.write(step, values)
    logging.info("step %d: %s", step, values)
    return values

  last = {}
  for step in range(start + 1, total + 1):
    began = time.perf_counter()
    if step <= ws.steps:
      index = (np.arange(ws.batch_size) + (step - 1) * ws.batch_size) % len(warm_episodes)
      batch = {k: v[index] for k, v in warm_rows.items()}
      state, metrics = run_step("warm", batch)
      values = {"phase": 0, **jax.device_get(metrics)}
      if step == ws.steps and ref_params is None and config.grpo.kl_coef:
        ref_ckpt.save(step, state)
        ref_params = jax.tree.map(lambda x: x.copy(), state.params)
    else:
      iteration = step - ws.steps
      values = {"phase": 1}
      batch, parts = _grpo_batch(config, world, vocab, model_config, state.params, rollout_config,
                                 env_config, reward_config, seed, iteration)
      values.update(parts)
      if ref_params is not None:
        batch["ref_logprobs"] = np.asarray(log_probs(ref_params, batch))
      state, metrics = run_step("grpo", batch)
      values.update(jax.device_get(metrics))
    values["step_seconds"] = time.perf_counter() - began
    last = {k: float(v) for k, v in values.items()}
    log.write(step, last)
    stop = preempted.reached(step)
    if step % config.log_every == 0 or step == total or stop:
      log.flush()
      logging.info("step %d/%d: %s", step, total, {k: round(v, 4) for k, v in last.items()})
    if config.eval.every and config.eval.questions and (
        step == ws.steps or (step > ws.steps and (step - ws.steps) % config.eval.every == 0)):
      last.update(evaluate(step))
    if step % config.checkpoint.every == 0 or step == total or step == ws.steps or stop:
      ckpt.save(step, state)
    if stop:
      logging.warning("step %d: stopping after a termination signal; checkpoint saved", step)
      break
  return last


def _grpo_batch(config, world, vocab, model_config, params, rollout_config, env_config,
                reward_config, seed, iteration):
  """Rolls out G conversations per question; returns (the GRPO batch, the iteration's metrics)."""
  g = config.grpo.group_size
  tasks = []
  for j in range(config.grpo.questions):
    task = World.task(world.example(seed + _RL, (iteration - 1) * config.grpo.questions + j))
    tasks.extend([task] * g)
  result = rollout_lib.rollout(model_config, params, tasks, vocab,
                               jax.random.fold_in(jax.random.key(seed), iteration),
                               rollout_config, env_config)
  episodes = result.episodes
  parts = rewards_lib.compute_rewards(
      result.correct, result.num_ops, g, reward_config,
      is_video=[e.task.is_video for e in episodes],
      unfixed_error=[e.unfixed_error for e in episodes])
  advantages, keep = grpo.group_advantages(parts["reward"], g)
  batch = dict(result.rows)
  if config.grpo.drop_zero_groups:
    batch["loss_mask"] = batch["loss_mask"] * keep[:, None].astype(np.int32)
  batch["advantages"] = advantages
  metrics = {name: float(np.mean(parts[name]))
             for name in ("reward", "correctness", "curiosity", "penalty", "rapr")}
  metrics.update(
      accuracy=float(np.mean(result.correct)), ops_per_rollout=float(np.mean(result.num_ops)),
      error_rate=float(np.mean([e.num_errors > 0 for e in episodes])),
      kept_groups=float(np.mean(keep)), model_seconds=result.model_seconds,
      env_seconds=result.env_seconds, turns=float(result.turns))
  return batch, metrics


def restore_policy(config: Any, workdir: str, step=None):
  """(model config, parameters, vocabulary) of a run's checkpoint (default: the latest), for
  rollouts outside training (benchmarks, inspection)."""
  model_config = sizes.from_model_section(config.model)
  model = vlm.VLM(model_config)
  mesh = sharding_lib.make_mesh([(name, 1) for name in train_loop.MESH_AXES])
  optimizer = optim.make_optimizer({"lr": config.grpo.lr, "schedule": "constant"}, 1)
  abstract, _ = state_lib.abstract_state(model, vlm.example_inputs(model_config), optimizer, mesh)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                     model_size=config.model.size)
  try:
    state, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  vocab = vocab_lib.load_vocabulary(config.vocab or os.path.join(workdir, "vocab.model"))
  return model_config, state.params, vocab
