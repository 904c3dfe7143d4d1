"""Pixel Reasoner: warm-start SFT on synthesised pixel-space conversations, then GRPO with
curiosity.

  vpd-jax train --config=configs/pixel_rl.py:size=tiny --workdir=W
  vpd-jax train --config=configs/pixel_rl.py:size=tiny,alpha=0 --workdir=W      (plain GRPO)
  vpd-jax train --config=configs/pixel_rl.py:reward=released,world=mixed --workdir=W

Arguments (key=value, comma separated; an unknown key is an error that lists the known ones):
  size, dtype, param_dtype, remat, attention   the model (vpd_jax.models.sizes)
  seed, mesh                                    as in configs/vpd_sft.py
  world          hires (ShapesVQA scenes with a tiny target), video (moving shapes, one frame asked
                 about) or mixed (alternating)
  hires_size, target_radius, video_frames, video_size   the worlds' settings
  vocab          SentencePiece model; "" trains one on the warm-start text into WORKDIR/vocab.model
  warm_steps, warm_batch, warm_examples, warm_lr   warm-start SFT (steps, rows per step, distinct
                 questions it cycles through, learning rate)
  self_correction, text_only   shares of wrong-zoom-then-correct and text-only warm-start
                 conversations (the rest zoom straight at the target)
  iterations     GRPO iterations (one rollout batch and one update each)
  questions, group   questions per iteration and rollouts per question (G)
  lr, clip_eps, kl_coef, temperature   GRPO settings (kl_coef > 0 keeps the warm-start model as
                 the reference)
  reward         paper (default) or released, see vpd_jax/rl/rewards.py
  target_rapr (H), op_budget (N), alpha, beta, alpha_video   the curiosity reward
  keep_zero_groups   train on groups whose advantages are all zero (the paper drops them)
  max_ops, min_crop, max_frames   the environment (vpd_jax/rl/env.py)
  row_length, max_images, max_new_tokens   rollout rows and the tokens per turn
  eval_every, eval_questions   greedy rollouts on held-out questions (accuracy, RaPR); 0 turns off
  ckpt_every, keep, log_every
"""

import ml_collections

from vpd_jax.config_args import parse_arg
from vpd_jax.config_args import parse_mesh


def get_config(arg=None):
  a = parse_arg(
      arg, size="tiny", dtype="float32", param_dtype="float32", remat="none", attention="xla",
      seed=0, mesh="data:-1",
      world="hires", hires_size=448, target_radius=0.012, video_frames=8, video_size=96,
      vocab="",
      warm_steps=200, warm_batch=16, warm_examples=512, warm_lr=1e-3,
      self_correction=0.25, text_only=0.25,
      iterations=100, questions=8, group=4, lr=1e-4, clip_eps=0.2, kl_coef=0.0, temperature=1.0,
      reward="paper", target_rapr=0.3, op_budget=1, alpha=0.5, beta=0.05, alpha_video=0.5,
      keep_zero_groups=False,
      max_ops=3, min_crop=28, max_frames=4,
      row_length=160, max_images=4, max_new_tokens=24,
      eval_every=0, eval_questions=32, ckpt_every=50, keep=2, log_every=10)
  config = ml_collections.ConfigDict()
  config.trainer = "pixel_rl"
  config.seed = a.seed
  config.log_every = a.log_every
  config.model = ml_collections.ConfigDict(dict(
      size=a.size, dtype=a.dtype, param_dtype=a.param_dtype, remat=a.remat,
      attention_impl=a.attention))
  config.mesh = parse_mesh(a.mesh)
  config.world = ml_collections.ConfigDict(dict(
      name=a.world, hires_size=a.hires_size, target_radius=a.target_radius,
      video_frames=a.video_frames, video_size=a.video_size))
  config.vocab = a.vocab
  config.warmstart = ml_collections.ConfigDict(dict(
      steps=a.warm_steps, batch_size=a.warm_batch, examples=a.warm_examples, lr=a.warm_lr,
      self_correction=a.self_correction, text_only=a.text_only))
  config.grpo = ml_collections.ConfigDict(dict(
      iterations=a.iterations, questions=a.questions, group_size=a.group, lr=a.lr,
      clip_eps=a.clip_eps, kl_coef=a.kl_coef, temperature=a.temperature,
      drop_zero_groups=not a.keep_zero_groups))
  config.reward = ml_collections.ConfigDict(dict(
      variant=a.reward, target_rapr=a.target_rapr, op_budget=a.op_budget, alpha=a.alpha,
      beta=a.beta, alpha_video=a.alpha_video))
  config.env = ml_collections.ConfigDict(dict(
      max_ops=a.max_ops, min_crop=a.min_crop, max_frames=a.max_frames))
  config.rollout = ml_collections.ConfigDict(dict(
      row_length=a.row_length, max_images=a.max_images, max_new_tokens=a.max_new_tokens))
  config.eval = ml_collections.ConfigDict(dict(every=a.eval_every, questions=a.eval_questions))
  config.checkpoint = ml_collections.ConfigDict(dict(every=a.ckpt_every, keep=a.keep))
  return config
