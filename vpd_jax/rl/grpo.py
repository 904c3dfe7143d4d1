"""GRPO: group-normalised advantages and the clipped policy loss, registered as loss "grpo".

Advantages (Shao et al. 2024, outcome supervision): the G rollouts of one question form a group;
rollout i gets A_i = (r_i - mean(r)) / (std(r) + eps), with the population standard deviation of
the group's rewards. A group whose rewards are all equal has all advantages zero and teaches
nothing; Pixel Reasoner drops such groups (`keep` is False for their rollouts).

Loss, per model-written token t of a rollout with advantage A (rows in the data layer's layout;
loss_mask marks the tokens the model wrote, never the environment's):

  ratio_t = exp(logp_t - old_logp_t)
  l_t = -min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) * A) + kl_coef * kl_t
  kl_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1     (the k3 estimator, >= 0)

and the loss is the mean of l_t over all marked tokens of the batch (token-level averaging, so the
train step's micro-batches average exactly like one batch: aux "weight" is the token count).

Batch features beyond the model inputs: "targets", "loss_mask" [B, L]; "advantages" [B] float32;
optionally "old_logprobs" [B, L] (the behaviour policy's log-probabilities of the targets; without
them the update is on-policy, old = the current parameters, stopped) and, when kl_coef > 0,
"ref_logprobs" [B, L] from the reference model.
"""

from __future__ import annotations

import functools
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.train import steps

ADVANTAGE_EPS = 1e-6


def group_advantages(rewards, group_size: int, eps: float = ADVANTAGE_EPS):
  """(advantages float32 [B], keep bool [B]) for rewards [B] laid out group by group."""
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards must be [groups * group_size] with group_size={group_size}, got "
                     f"shape {rewards.shape}")
  grouped = rewards.reshape(-1, group_size)
  mean = grouped.mean(axis=1, keepdims=True)
  std = grouped.std(axis=1, keepdims=True)
  advantages = (grouped - mean) / (std + eps)
  keep = np.repeat(~np.all(grouped == grouped[:, :1], axis=1), group_size)
  return advantages.reshape(-1).astype(np.float32), keep


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, float32 [B, L]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def grpo_objective(logprobs: jax.Array, batch: Mapping[str, jax.Array], clip_eps: float,
                   kl_coef: float) -> Tuple[jax.Array, Dict]:
  """The loss above from the current log-probabilities [B, L]; see the module docstring."""
  mask = batch["loss_mask"].astype(jnp.float32)
  old = batch.get("old_logprobs")
  old = jax.lax.stop_gradient(logprobs) if old is None else old.astype(jnp.float32)
  advantages = batch["advantages"].astype(jnp.float32)[:, None]
  ratio = jnp.exp(logprobs - old)
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
  tokens = jnp.sum(mask)
  denom = jnp.maximum(tokens, 1.0)
  aux = {"tokens": tokens, "weight": tokens,
         "clip_fraction": jnp.sum(mask * (jnp.abs(ratio - 1.0) > clip_eps)) / denom}
  if kl_coef:
    if "ref_logprobs" not in batch:
      raise ValueError(f"grpo loss with kl_coef={kl_coef} needs batch['ref_logprobs']")
    delta = batch["ref_logprobs"].astype(jnp.float32) - logprobs
    kl = jnp.exp(delta) - delta - 1.0
    per_token = per_token + kl_coef * kl
    aux["kl"] = jnp.sum(mask * kl) / denom
  return jnp.sum(per_token * mask) / denom, aux


def grpo_loss(params, batch, rng, apply_fn, *, clip_eps: float = 0.2, kl_coef: float = 0.0):
  """The GRPO loss of a batch of rollouts (train/steps.py loss signature)."""
  logprobs = token_logprobs(apply_fn(params, batch, rng), batch["targets"])
  return grpo_objective(logprobs, batch, clip_eps, kl_coef)


steps.register_loss("grpo")(grpo_loss)


def make_grpo_loss(clip_eps: float = 0.2, kl_coef: float = 0.0):
  """The "grpo" loss with its clip range and KL weight fixed (for make_train_step)."""
  if not 0.0 < clip_eps < 1.0:
    raise ValueError(f"GRPO clip_eps must be in (0, 1), got {clip_eps}")
  if kl_coef < 0:
    raise ValueError(f"GRPO kl_coef must be >= 0, got {kl_coef}")
  return functools.partial(grpo_loss, clip_eps=clip_eps, kl_coef=kl_coef)
