"""Dense attention from per-token mask inputs: the oracle the flash-attention kernel is tested with.

It builds the full [B, T, T] boolean mask from the same per-token inputs the kernel takes and runs
plain softmax attention on it, in float32 throughout, so that it shares no code with the kernel or
with the model's dense path (vpd_jax.models.attention).

Mask rule (query t, key s of one row; `cum` is the running count of `ar_flag` along the row):
  allowed = segment_ids[t] == segment_ids[s] > 0  and  cum[s] <= cum[t]
With ar_flag all ones this is causal attention, with ar_flag all zeros full attention within each
segment, and with zeros then ones a prefix-LM. A sliding `window` further keeps only keys with
|positions[t] - positions[s]| < window, except pairs with cum[t] == cum[s] (the bidirectional
prefix stays whole). Queries that see no key get a zero output (and zero gradients).
"""

from typing import Optional

import jax
import jax.numpy as jnp


def dense_mask(segment_ids: jax.Array, ar_flag: jax.Array, positions: Optional[jax.Array] = None,
               window: Optional[int] = None) -> jax.Array:
  """bool [B, T, T] indexed [query, key] by the rule in the module docstring."""
  seg = jnp.asarray(segment_ids, jnp.int32)
  cum = jnp.cumsum(jnp.asarray(ar_flag, jnp.int32), axis=1)
  query_seg, key_seg = seg[:, :, None], seg[:, None, :]
  query_cum, key_cum = cum[:, :, None], cum[:, None, :]
  allowed = (query_seg == key_seg) & (query_seg > 0) & (key_cum <= query_cum)
  if window is not None:
    pos = jnp.asarray(positions, jnp.int32)
    near = jnp.abs(pos[:, :, None] - pos[:, None, :]) < window
    allowed = allowed & (near | (key_cum == query_cum))
  return allowed


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              ar_flag: jax.Array, positions: Optional[jax.Array] = None, *,
              window: Optional[int] = None, softcap: Optional[float] = None,
              scale: Optional[float] = None) -> jax.Array:
  """Attention of q [B, T, H, D] over k, v [B, T, K, D] (H a multiple of K), float32 output."""
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # Each kv head serves num_heads // num_kv_heads consecutive query heads.
  k = jnp.repeat(k.astype(jnp.float32), num_heads // num_kv_heads, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), num_heads // num_kv_heads, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k,
                      precision=jax.lax.Precision.HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  allowed = dense_mask(segment_ids, ar_flag, positions, window)[:, None]
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  return jnp.einsum("bhts,bshd->bthd", probs, v, precision=jax.lax.Precision.HIGHEST)
