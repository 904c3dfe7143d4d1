"""Tests for vpd_jax.rl.grpo: group advantages and the clipped GRPO loss against hand values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax.rl import grpo
from vpd_jax.train import steps


def test_group_advantages_by_hand():
  rewards = [1, 0, 1, 0, 2, 2, 2, 2, 3, 0, 0, 0]
  adv, keep = grpo.group_advantages(rewards, 4)
  # Group 1: mean 0.5, std 0.5 -> +-1. Group 2: all equal -> 0, dropped. Group 3: mean 0.75,
  # population std sqrt(1.6875) -> 2.25 / 1.299 = sqrt(3) and -0.75 / 1.299 = -1 / sqrt(3).
  s3 = math.sqrt(3.0)
  np.testing.assert_allclose(adv, [1, -1, 1, -1, 0, 0, 0, 0, s3, -1 / s3, -1 / s3, -1 / s3],
                             rtol=1e-5)
  np.testing.assert_array_equal(keep, [True] * 4 + [False] * 4 + [True] * 4)
  with pytest.raises(ValueError, match="group_size=5"):
    grpo.group_advantages(rewards, 5)


def _fixed_logits_apply(params, batch, rng=None):
  """Logits that do not depend on the batch: params["w"] [L, V] for every row."""
  del rng
  return jnp.broadcast_to(params["w"], batch["targets"].shape + params["w"].shape[-1:])


def _batch(ratios, advantages, mask):
  # Uniform logits over 2 tokens: log p = log 0.5 for every target; old log-probs set the ratios.
  ratios = np.asarray(ratios, np.float32)
  return {"targets": np.ones(ratios.shape, np.int32),
          "loss_mask": np.asarray(mask, np.int32),
          "advantages": np.asarray(advantages, np.float32),
          "old_logprobs": (np.log(0.5) - np.log(ratios)).astype(np.float32)}


def test_clipped_loss_by_hand():
  params = {"w": jnp.zeros((3, 2))}
  batch = _batch([[1.5, 0.9, 1.0], [0.5, 1.0, 1.0]], [1.0, -2.0], [[1, 1, 0], [1, 0, 0]])
  loss, aux = grpo.grpo_loss(params, batch, None, _fixed_logits_apply, clip_eps=0.2)
  # Row 0 (A = 1): ratio 1.5 clipped to 1.2 -> -1.2; ratio 0.9 -> -0.9. Row 1 (A = -2): ratio 0.5,
  # min(-1.0, 0.8 * -2 = -1.6) = -1.6 -> +1.6. Mean over 3 tokens: -0.5 / 3.
  np.testing.assert_allclose(loss, -0.5 / 3, rtol=1e-5)
  np.testing.assert_allclose(aux["clip_fraction"], 2 / 3, rtol=1e-5)
  assert float(aux["tokens"]) == 3 and float(aux["weight"]) == 3


def test_kl_term_by_hand():
  params = {"w": jnp.zeros((3, 2))}
  batch = _batch([[1.0, 1.0, 1.0]] * 2, [0.0, 0.0], [[1, 1, 1], [1, 0, 0]])
  batch["ref_logprobs"] = np.full((2, 3), np.log(0.5) + np.log(2.0), np.float32)
  loss, aux = grpo.grpo_loss(params, batch, None, _fixed_logits_apply, kl_coef=0.1)
  kl = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1 at d = log 2
  np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.1 * kl, rtol=1e-5)
  del batch["ref_logprobs"]
  with pytest.raises(ValueError, match="ref_logprobs"):
    grpo.grpo_loss(params, batch, None, _fixed_logits_apply, kl_coef=0.1)


def test_on_policy_gradient_is_the_advantage_weighted_score():
  params = {"w": jnp.zeros((2, 2))}
  batch = _batch([[1.0, 1.0]], [0.5], [[1, 1]])
  del batch["old_logprobs"]  # on-policy: ratio 1 with the gradient of log p
  grads = jax.grad(lambda p: grpo.grpo_loss(p, batch, None, _fixed_logits_apply)[0])(params)
  # d(-A * log softmax(w)[1]) / dw = -A * (onehot(1) - 0.5), averaged over the 2 tokens (each token
  # has its own row of w here).
  expected = -0.5 * (np.array([0.0, 1.0]) - 0.5) / 2
  np.testing.assert_allclose(grads["w"], np.stack([expected, expected]), rtol=1e-6)


def test_registered_and_configurable():
  assert steps.get_loss("grpo") is grpo.grpo_loss
  with pytest.raises(ValueError, match="clip_eps"):
    grpo.make_grpo_loss(clip_eps=1.5)
