"""Output projection and cross-entropy in chunks of the sequence: [B, T, V] logits never exist.

  nll = chunked_cross_entropy(hidden, embedding, targets, chunk=DEFAULT_CHUNK, softcap=None)
  loss = weighted_cross_entropy(hidden, embedding, targets, weights, chunk=DEFAULT_CHUNK)

hidden [B, T, D] (the decoder's final-normed states), embedding [V, D] (Gemma's tied output
layer), targets [B, T] int -> nll [B, T] float32, the per-token negative log-likelihood
logsumexp(logits) - logits[target] of logits = softcap(hidden . embedding^T) computed in float32
(preferred_element_type, as the model's own logits). `weighted_cross_entropy` returns the scalar
sum(weights * nll) instead (train/steps.py's "sft_chunked" loss, with weights = mask / tokens).

With PaliGemma's 257,216-row vocabulary the plain path's float32 logits are 1 GiB per 1,024 tokens,
and autodiff keeps them (and their softmax) for the backward pass. Here a lax.scan walks the
sequence `chunk` positions at a time (all rows together, so a batch sharded over devices stays
sharded) and only [B, chunk, V] logits live at once. Both functions have custom VJPs:
  chunked_cross_entropy    keeps just the per-token log-sum-exp; the backward scan recomputes each
                           chunk's logits (four matmuls per chunk in all, against the plain path's
                           three) and forms softmax - one_hot directly.
  weighted_cross_entropy   its weights are known in the forward pass, so when differentiated the
                           forward scan also forms the gradients (of the hidden states, and of the
                           embedding accumulated in float32) from the logits it already has: three
                           matmuls, like the plain path; the backward only scales them by the
                           incoming cotangent. Without differentiation only the loss is computed.
Gradients equal the plain path's (tests/test_cross_entropy.py).
"""

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


# Sequence positions per chunk. At paligemma-3b's vocabulary, B = 8 and T = 1,024 (float32), the
# loss and its gradients peak at 6.9 GB with 16, 7.6 GB with 64 and 10.8 GB with 256 (21.2 GB
# unchunked; bench/attention.py); the floor is the embedding, its gradient and the accumulator.
DEFAULT_CHUNK = 64


class _Static(NamedTuple):
  chunk: int
  softcap: Optional[float]


def _chunks(x, chunk):
  """[B, T, ...] (T a multiple of chunk) -> [T / chunk, B, chunk, ...] for the scan."""
  batch, length = x.shape[:2]
  return x.reshape(batch, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x):
  """[T / chunk, B, chunk, ...] -> [B, T, ...]."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _capped_logits(hidden, embedding, softcap):
  """(float32 logits [B, C, V] after soft-capping, tanh of the capped logits or None)."""
  logits = jnp.einsum("bcd,vd->bcv", hidden, embedding, preferred_element_type=jnp.float32)
  logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  if softcap is None:
    return logits, None
  t = jnp.tanh(logits / softcap)
  return softcap * t, t


def _target_logit(logits, targets):
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
  return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nll(static: _Static, hidden, embedding, targets):
  return _nll_forward(static, hidden, embedding, targets)[0]


def _nll_forward(static, hidden, embedding, targets):
  def body(_, xs):
    h, t = xs
    logits, _ = _capped_logits(h, embedding, static.softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return None, (lse - _target_logit(logits, t), lse)

  _, (nll, lse) = jax.lax.scan(body, None, (_chunks(hidden, static.chunk),
                                            _chunks(targets, static.chunk)))
  return _unchunk(nll), (hidden, embedding, targets, _unchunk(lse))


def _nll_backward(static, residuals, d_nll):
  hidden, embedding, targets, lse = residuals

  def body(d_embedding, xs):
    h, t, l, d = xs
    logits, tanh = _capped_logits(h, embedding, static.softcap)
    # d nll / d logits = softmax - one_hot(target), scaled by the incoming cotangent.
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    probs = jnp.exp(logits - l[..., None])
    g = (probs - (vocab == t[..., None]).astype(jnp.float32)) * d[..., None]
    if tanh is not None:
      g = g * (1.0 - tanh * tanh)
    d_h = jnp.einsum("bcv,vd->bcd", g, embedding.astype(jnp.float32))
    d_embedding = d_embedding + jnp.einsum("bcv,bcd->vd", g, h.astype(jnp.float32))
    return d_embedding, d_h.astype(hidden.dtype)

  chunk = static.chunk
  d_embedding, d_hidden = jax.lax.scan(
      body, jnp.zeros(embedding.shape, jnp.float32),
      (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(lse, chunk),
       _chunks(d_nll.astype(jnp.float32), chunk)))
  return _unchunk(d_hidden), d_embedding.astype(embedding.dtype), None


_nll.defvjp(_nll_forward, _nll_backward)


def _check(hidden, embedding, targets, chunk, softcap):
  if hidden.ndim != 3 or embedding.ndim != 2 or hidden.shape[-1] != embedding.shape[-1]:
    raise ValueError(f"chunked cross-entropy: hidden {hidden.shape} and embedding "
                     f"{embedding.shape} must be [B, T, D] and [V, D]")
  if tuple(targets.shape) != hidden.shape[:2]:
    raise ValueError(f"chunked cross-entropy: targets have shape {tuple(targets.shape)}, "
                     f"expected {hidden.shape[:2]} ([B, T])")
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunked cross-entropy: chunk must be a positive integer, got {chunk!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"chunked cross-entropy: softcap must be positive or None, got {softcap!r}")


def _pad(hidden, targets, chunk):
  """hidden and targets padded along T to a multiple of the chunk (itself at most T)."""
  length = hidden.shape[1]
  chunk = min(chunk, length)
  extra = -length % chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, extra), (0, 0)))
  targets = jnp.pad(jnp.asarray(targets, jnp.int32), ((0, 0), (0, extra)))
  return hidden, targets, chunk


def chunked_cross_entropy(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *,
                          chunk: int = DEFAULT_CHUNK,
                          softcap: Optional[float] = None) -> jax.Array:
  """Per-token negative log-likelihood [B, T] float32; see the module docstring."""
  _check(hidden, embedding, targets, chunk, softcap)
  length = hidden.shape[1]
  # Padded positions (target 0) are cut off below; their zero cotangents add nothing.
  hidden, targets, chunk = _pad(hidden, targets, chunk)
  static = _Static(chunk, None if softcap is None else float(softcap))
  return _nll(static, hidden, embedding, targets)[:, :length]

def _weighted_forward(static, hidden, embedding, targets, weights, with_grads: bool):
  """(sum of weights * nll, nll [B, T], d_hidden, d_embedding) of the loss; the last two None
  unless `with_grads`."""
  def body(d_embedding, xs):
    h, t, w = xs
    logits, tanh = _capped_logits(h, embedding, static.softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - _target_logit(logits, t)
    if not with_grads:
      return d_embedding, (nll, None)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    g = (jnp.exp(logits - lse[..., None]) - (vocab == t[..., None]).astype(jnp.float32))
    g = g * w[..., None]
    if tanh is not None:
      g = g * (1.0 - tanh * tanh)
    d_h = jnp.einsum("bcv,vd->bcd", g, embedding.astype(jnp.float32))
    d_embedding = d_embedding + jnp.einsum("bcv,bcd->vd", g, h.astype(jnp.float32))
    return d_embedding, (nll, d_h)

  chunk = static.chunk
  init = jnp.zeros(embedding.shape, jnp.float32) if with_grads else None
  d_embedding, (nll, d_hidden) = jax.lax.scan(
      body, init, (_chunks(hidden, chunk), _chunks(targets, chunk),
                   _chunks(weights.astype(jnp.float32), chunk)))
  nll = _unchunk(nll)
  loss = jnp.sum(nll * weights.astype(jnp.float32))
  return loss, nll, (None if d_hidden is None else _unchunk(d_hidden)), d_embedding


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted(static: _Static, hidden, embedding, targets, weights):
  return _weighted_forward(static, hidden, embedding, targets, weights, with_grads=False)[0]


def _weighted_fwd(static, hidden, embedding, targets, weights):
  loss, nll, d_hidden, d_embedding = _weighted_forward(static, hidden, embedding, targets,
                                                       weights, with_grads=True)
  # Empty arrays carry the input dtypes the cotangents must have.
  dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (hidden, embedding, weights))
  return loss, (nll, d_hidden, d_embedding, dtypes)


def _weighted_bwd(static, residuals, d_loss):
  del static
  nll, d_hidden, d_embedding, (hidden_like, embedding_like, weights_like) = residuals
  return ((d_loss * d_hidden).astype(hidden_like.dtype),
          (d_loss * d_embedding).astype(embedding_like.dtype), None,
          (d_loss * nll).astype(weights_like.dtype))


_weighted.defvjp(_weighted_fwd, _weighted_bwd)


def weighted_cross_entropy(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                           weights: jax.Array, *, chunk: int = DEFAULT_CHUNK,
                           softcap: Optional[float] = None) -> jax.Array:
  """sum(weights * nll) float32 for weights [B, T]; see the module docstring."""
  _check(hidden, embedding, targets, chunk, softcap)
  if tuple(weights.shape) != hidden.shape[:2]:
    raise ValueError(f"weighted_cross_entropy: weights have shape {tuple(weights.shape)}, "
                     f"expected {hidden.shape[:2]} ([B, T])")
  hidden, targets, chunk = _pad(hidden, targets, chunk)
  # Padded positions get weight 0: they add nothing to the loss or the gradients.
  weights = jnp.pad(weights, ((0, 0), (0, hidden.shape[1] - weights.shape[1])))
  return _weighted(_Static(chunk, None if softcap is None else float(softcap)), hidden, embedding,
                   targets, weights)
