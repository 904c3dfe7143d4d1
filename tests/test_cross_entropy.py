"""Tests for vpd_jax/kernels/cross_entropy.py and the "sft_chunked" loss of train/steps.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax.kernels import cross_entropy
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.train import steps


def _plain_nll(hidden, embedding, targets, softcap=None):
  """The unchunked computation: full [B, T, V] logits, log-softmax, the target's entry."""
  logits = jnp.einsum("btd,vd->btv", hidden, embedding, preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def test_hand_computed_values():
  # Logits of the two positions: [0, 1] and [0, 2] (D = 1, V = 2).
  hidden = jnp.array([[[1.0], [2.0]]])
  embedding = jnp.array([[0.0], [1.0]])
  nll = cross_entropy.chunked_cross_entropy(hidden, embedding, jnp.array([[1, 0]]), chunk=1)
  want = [math.log(1 + math.e) - 1, math.log(1 + math.e ** 2)]
  np.testing.assert_allclose(nll, [want], rtol=1e-6)
  weighted = cross_entropy.weighted_cross_entropy(hidden, embedding, jnp.array([[1, 0]]),
                                                  jnp.array([[0.5, 2.0]]), chunk=1)
  np.testing.assert_allclose(weighted, 0.5 * want[0] + 2.0 * want[1], rtol=1e-6)
  # Soft-capped at 1: logits [0, tanh(1)] and [0, tanh(2)].
  capped = cross_entropy.chunked_cross_entropy(hidden, embedding, jnp.array([[1, 0]]), chunk=2,
                                               softcap=1.0)
  t1, t2 = math.tanh(1.0), math.tanh(2.0)
  np.testing.assert_allclose(capped, [[math.log(1 + math.exp(t1)) - t1,
                                       math.log(1 + math.exp(t2))]], rtol=1e-6)


@pytest.mark.parametrize("softcap,dtype,chunk", [(None, jnp.float32, 8), (3.0, jnp.float32, 5),
                                                 (None, jnp.bfloat16, 16)])
def test_values_and_gradients_match_the_plain_path(softcap, dtype, chunk):
  rng = np.random.default_rng(0)
  batch, length, width, vocab = 3, 21, 12, 50  # 21 positions: the last chunk is partial
  hidden = jnp.asarray(rng.normal(size=(batch, length, width)), dtype)
  embedding = jnp.asarray(rng.normal(size=(vocab, width)) * 0.5, dtype)
  targets = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(batch, length)) > 0.3, jnp.float32)

  def loss(fn):
    return lambda h, e, w: jnp.sum(fn(h, e) * w) / jnp.sum(weights)
  chunked = lambda h, e: cross_entropy.chunked_cross_entropy(h, e, targets, chunk=chunk,
                                                             softcap=softcap)
  weighted = lambda h, e, w: cross_entropy.weighted_cross_entropy(
      h, e, targets, w / jnp.sum(weights), chunk=chunk, softcap=softcap)
  plain = lambda h, e: _plain_nll(h, e, targets, softcap)
  as_f32 = (hidden.astype(jnp.float32), embedding.astype(jnp.float32))
  want, want_grads = jax.value_and_grad(loss(plain), (0, 1, 2))(*as_f32, weights)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(chunked(hidden, embedding), plain(*as_f32), rtol=tol, atol=tol)
  # Without differentiation the weighted loss takes its value-only path.
  np.testing.assert_allclose(jax.jit(weighted)(hidden, embedding, weights), want, rtol=tol)
  for fn in (loss(chunked), weighted):
    got, got_grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2)))(hidden, embedding, weights)
    np.testing.assert_allclose(got, want, rtol=tol)
    for g, w, x in zip(got_grads, want_grads, (hidden, embedding, weights)):
      assert g.dtype == x.dtype and g.shape == x.shape
      np.testing.assert_allclose(np.asarray(g, np.float32), w,
                                 atol=tol * float(jnp.abs(w).max()))


def test_bad_inputs_raise_clear_errors():
  hidden, embedding = jnp.zeros((2, 4, 8)), jnp.zeros((10, 8))
  with pytest.raises(ValueError, match=r"targets have shape \(2, 3\), expected \(2, 4\)"):
    cross_entropy.chunked_cross_entropy(hidden, embedding, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="must be \\[B, T, D\\] and \\[V, D\\]"):
    cross_entropy.chunked_cross_entropy(hidden, jnp.zeros((10, 7)), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
    cross_entropy.chunked_cross_entropy(hidden, embedding, jnp.zeros((2, 4), jnp.int32), chunk=0)
  with pytest.raises(ValueError, match=r"weights have shape \(2,\), expected \(2, 4\)"):
    cross_entropy.weighted_cross_entropy(hidden, embedding, jnp.zeros((2, 4), jnp.int32),
                                         jnp.zeros((2,)))


@pytest.mark.slow
def test_sft_chunked_loss_equals_sft_loss_and_gradients(monkeypatch):
  config = sizes.get_size("tiny", final_logit_softcap=5.0)
  model = vlm.VLM(config)
  batch = steps.synthetic_batch(config.num_image_tokens, config.vit.image_size,
                                config.llm.vocab_size, 2, seed=1)
  params = vlm.init_params(model, jax.random.key(0))
  apply_fn = steps.make_apply_fn(model)
  monkeypatch.setattr(steps, "CE_CHUNK", 16)  # 56 positions: three full chunks and a partial one
  results = {}
  for name in ("sft", "sft_chunked"):
    loss_fn = steps.get_loss(name)
    results[name] = jax.jit(jax.value_and_grad(
        lambda p, fn=loss_fn: fn(p, batch, None, apply_fn), has_aux=True))(params)
  (loss, aux), grads = results["sft"]
  (chunked_loss, chunked_aux), chunked_grads = results["sft_chunked"]
  np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
  assert chunked_aux == aux
  for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, atol=1e-6 + 1e-4 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match="needs an apply_fn made by make_apply_fn"):
    steps.get_loss("sft_chunked")(params, batch, None, lambda *a: None)
