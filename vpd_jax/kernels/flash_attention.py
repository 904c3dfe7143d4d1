"""Flash attention in Pallas for packed prefix-LM rows, with masks built from per-token inputs.

  out = flash_attention(q, k, v, segment_ids=seg, ar_flag=ar, positions=pos,
                        softcap=None, window=None, scale=None)

q [B, T, H, D], k and v [B, T, K, D] with H a multiple of K (grouped- and multi-query attention:
query head h reads kv head h // (H // K)); float32 or bfloat16 inputs, float32 accumulation, output
in q's dtype. The mask is never a [T, T] array: each block of it is computed inside the kernel from
[B, T] inputs (kernels/reference.py states the rule and builds the dense version):
  segment_ids  example of each token in a packed row, 0 on padding (default: all 1);
  ar_flag      1 on causal tokens, 0 on bidirectional ones (prefix, image); default all 1 (causal)
               or, with causal=False, all 0;
  positions    token positions (default 0..T-1), read only for a sliding `window`.
Query t sees key s when both are in the same segment > 0 and cum_ar[s] <= cum_ar[t]; `window`
keeps keys with |position difference| < window, plus pairs of the same bidirectional block.
`softcap` c applies Gemma 2's c * tanh(logit / c). Queries that see no key output zeros.

Structure (the FlashAttention-2 algorithm, Dao 2023):
  forward   grid (B, H, T / block_q); each program streams the key blocks through an online softmax
            and writes its outputs and their log-sum-exp, the only residual the backward keeps.
  backward  custom VJP with two kernels that recompute the probabilities block by block from the
            saved log-sum-exp: dK/dV with grid (B, H, T / block_k) looping over query blocks, and
            dQ with grid (B, H, T / block_q) looping over key blocks. dK and dV are made per query
            head and summed over each kv head's group outside the kernel.
  skipping  the per-block min/max of segment ids and of cum_ar decide whether any pair of a block
            pair can be unmasked. Each program's loop runs only over the range of live blocks
            (`live_block_ranges`, computed outside the kernel from [B, T] inputs), and a block
            inside the range that is dead anyway is skipped by the same test in the kernel
            (lax.cond), so packed rows and the causal part cost only their live blocks.
  padding   T is padded inside to a multiple of the blocks with segment id 0 (masked), and the
            padding is cut off again; callers never see it.

Backends: one kernel body serves all of them. Per-token inputs are passed as columns [B, T, 1]
(queries) and rows [B, 1, T] (keys) so every block is two-dimensional, as Mosaic (TPU) wants, and
q, k, v are laid out [B, H, T, D] inside. What was verified where:
  CPU  interpret mode: outputs and dq, dk, dv against the dense reference (tests).
  GPU  the forward and both backward kernels lower through Pallas' Triton lowering on a CPU host
       (tests/test_flash_attention.py lowers for "cuda"); not run on a GPU.
  TPU  the same kernels lower through Mosaic when a TPU device kind is supplied to Pallas by hand
       (done once, outside the tests); not run on a TPU. Each program keeps its row's whole K and
       V (or Q, dO) in VMEM, which bounds T by VMEM size there.
Default block sizes per backend are in DEFAULT_BLOCKS; any block size must be a multiple of 8 (a
power of two on GPU, a multiple of 128 for long rows on TPU).
"""

import functools
import math
from typing import NamedTuple, Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

# (block_q, block_k) by backend. Interpret mode (CPU) is slow per grid step: larger blocks there.
DEFAULT_BLOCKS = {"gpu": (64, 64), "tpu": (128, 128), "cpu": (128, 128)}
# Finite "minus infinity" for masked logits and the running maximum: exp(_NEG - x) underflows to
# 0 for every real logit, and _NEG - _NEG stays 0 (never NaN) in rows that have seen no key yet.
_NEG = -1e30


class _Static(NamedTuple):
  """Settings fixed at trace time (hashable, for custom_vjp's nondiff argument)."""
  scale: float
  softcap: Optional[float]
  window: Optional[int]
  block_q: int
  block_k: int
  backend: str
  interpret: bool


def _backend(backend: Optional[str]) -> str:
  name = jax.default_backend() if backend is None else backend
  if name in ("cuda", "rocm"):
    name = "gpu"
  if name not in DEFAULT_BLOCKS:
    raise ValueError(f"flash_attention: backend {name!r} is not one of {sorted(DEFAULT_BLOCKS)}")
  return name


def _block_mask(seg_q, cum_q, pos_q, seg_k, cum_k, pos_k, window):
  """bool [block_q, block_k] from query columns [bq, 1] and key rows [1, bk]."""
  allowed = (seg_q == seg_k) & (seg_q > 0) & (cum_k <= cum_q)
  if window is not None:
    allowed = allowed & ((jnp.abs(pos_q - pos_k) < window) | (cum_k == cum_q))
  return allowed


def _block_is_live(seg_q, cum_q, seg_k, cum_k):
  """Whether any (query, key) pair of two blocks can be unmasked (a conservative test)."""
  low = jnp.maximum(jnp.maximum(jnp.min(seg_q), jnp.min(seg_k)), 1)
  high = jnp.minimum(jnp.max(seg_q), jnp.max(seg_k))
  return (low <= high) & (jnp.min(cum_k) <= jnp.max(cum_q))


def live_block_ranges(segment_ids, cum_ar, block_q: int, block_k: int):
  """Per query block, the key blocks [first, last + 1) that can hold unmasked pairs, and per key
  block the query blocks likewise: int32 [B, T / block_q, 2] and [B, T / block_k, 2].

  From per-block min/max of segment ids and cum_ar (the test of _block_is_live, for all block
  pairs at once). Loops run over these ranges only, so the dead blocks before and after the live
  ones (other examples of a packed row, the future of a causal row) cost nothing at all; dead
  blocks inside a range are skipped by the per-block test.
  """
  def stats(x, block):
    x = x.reshape(x.shape[0], -1, block)
    return jnp.min(x, axis=-1), jnp.max(x, axis=-1)
  (q_seg_min, q_seg_max), (_, q_cum_max) = stats(segment_ids, block_q), stats(cum_ar, block_q)
  (k_seg_min, k_seg_max), (k_cum_min, _) = stats(segment_ids, block_k), stats(cum_ar, block_k)
  low = jnp.maximum(jnp.maximum(q_seg_min[:, :, None], k_seg_min[:, None, :]), 1)
  high = jnp.minimum(q_seg_max[:, :, None], k_seg_max[:, None, :])
  live = (low <= high) & (k_cum_min[:, None, :] <= q_cum_max[:, :, None])  # [B, nq, nk]

  def first_and_end(live):  # over the last axis; (0, 0) where nothing is live
    count = live.shape[-1]
    any_live = jnp.any(live, axis=-1)
    first = jnp.argmax(live, axis=-1)
    end = count - jnp.argmax(live[..., ::-1], axis=-1)
    return jnp.stack([jnp.where(any_live, first, 0), jnp.where(any_live, end, 0)],
                     axis=-1).astype(jnp.int32)
  return first_and_end(live), first_and_end(jnp.swapaxes(live, 1, 2))


def _compiled_for_tpu(static: _Static) -> bool:
  return static.backend == "tpu" and not static.interpret


def _range_spec(static: _Static):
  """The loop range of each program: a (1, 2) block, or on TPU the whole table in SMEM."""
  if _compiled_for_tpu(static):
    from jax.experimental.pallas import tpu as pl_tpu  # pylint: disable=g-import-not-at-top
    return pl.BlockSpec(memory_space=pl_tpu.SMEM)
  return pl.BlockSpec((None, 1, 2), lambda b, h, i: (b, i, 0))


def _read_range(range_ref, static: _Static):
  """(first, end) block of this program's loop."""
  if _compiled_for_tpu(static):
    b, i = pl.program_id(0), pl.program_id(2)
    return range_ref[b, i, 0], range_ref[b, i, 1]
  return range_ref[0, 0], range_ref[0, 1]


def _logits(q, k, static: _Static):
  """(soft-capped logits [bq, bk] float32, tanh of the capped logits or None)."""
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = s * static.scale
  if static.softcap is None:
    return s, None
  t = jnp.tanh(s / static.softcap)
  return static.softcap * t, t


def _forward_kernel(seg_q_ref, cum_q_ref, pos_q_ref, seg_k_ref, cum_k_ref, pos_k_ref, range_ref,
                    q_ref, k_ref, v_ref, out_ref, lse_ref, *, static: _Static):
  q = q_ref[...]
  seg_q, cum_q, pos_q = seg_q_ref[...], cum_q_ref[...], pos_q_ref[...]
  block_q, head_dim = q.shape
  bk = static.block_k

  def body(j, carry):
    start = pl.multiple_of(j * bk, bk)
    seg_k = seg_k_ref[:, pl.ds(start, bk)]
    cum_k = cum_k_ref[:, pl.ds(start, bk)]

    def compute(carry):
      acc, m, l = carry
      k = k_ref[pl.ds(start, bk), :]
      v = v_ref[pl.ds(start, bk), :]
      s, _ = _logits(q, k, static)
      allowed = _block_mask(seg_q, cum_q, pos_q, seg_k, cum_k, pos_k_ref[:, pl.ds(start, bk)],
                            static.window)
      s = jnp.where(allowed, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
      p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
      alpha = jnp.exp(m - m_new)
      l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
      acc = acc * alpha + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
      return acc, m_new, l_new

    return lax.cond(_block_is_live(seg_q, cum_q, seg_k, cum_k), compute, lambda c: c, carry)

  init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q, 1), _NEG, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32))
  acc, m, l = lax.fori_loop(*_read_range(range_ref, static), body, init)
  seen = l > 0
  out_ref[...] = (acc / jnp.where(seen, l, 1.0)).astype(out_ref.dtype)
  # Rows that saw no key keep lse 0: the backward masks their probabilities explicitly.
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _probs_and_dlogits(q, k, v, do, lse, delta, allowed, static: _Static):
  """(probabilities [bq, bk] f32, gradient of the pre-cap scaled logits [bq, bk] f32)."""
  s, t = _logits(q, k, static)
  p = jnp.where(allowed, jnp.exp(s - lse), 0.0)
  dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dkv_kernel(seg_q_ref, cum_q_ref, pos_q_ref, seg_k_ref, cum_k_ref, pos_k_ref, range_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                static: _Static):
  k, v = k_ref[...], v_ref[...]
  seg_k, cum_k, pos_k = seg_k_ref[...], cum_k_ref[...], pos_k_ref[...]
  bq = static.block_q

  def body(i, carry):
    start = pl.multiple_of(i * bq, bq)
    seg_q = seg_q_ref[pl.ds(start, bq), :]
    cum_q = cum_q_ref[pl.ds(start, bq), :]

    def compute(carry):
      dk, dv = carry
      q = q_ref[pl.ds(start, bq), :]
      do = do_ref[pl.ds(start, bq), :]
      allowed = _block_mask(seg_q, cum_q, pos_q_ref[pl.ds(start, bq), :], seg_k, cum_k, pos_k,
                            static.window)
      p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[pl.ds(start, bq), :],
                                 delta_ref[pl.ds(start, bq), :], allowed, static)
      dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
      dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
      return dk, dv

    return lax.cond(_block_is_live(seg_q, cum_q, seg_k, cum_k), compute, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(*_read_range(range_ref, static), body, (zeros, zeros))
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seg_q_ref, cum_q_ref, pos_q_ref, seg_k_ref, cum_k_ref, pos_k_ref, range_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, static: _Static):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  seg_q, cum_q, pos_q = seg_q_ref[...], cum_q_ref[...], pos_q_ref[...]
  bk = static.block_k

  def body(j, dq):
    start = pl.multiple_of(j * bk, bk)
    seg_k = seg_k_ref[:, pl.ds(start, bk)]
    cum_k = cum_k_ref[:, pl.ds(start, bk)]

    def compute(dq):
      k = k_ref[pl.ds(start, bk), :]
      v = v_ref[pl.ds(start, bk), :]
      allowed = _block_mask(seg_q, cum_q, pos_q, seg_k, cum_k, pos_k_ref[:, pl.ds(start, bk)],
                            static.window)
      _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, allowed, static)
      return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)

    return lax.cond(_block_is_live(seg_q, cum_q, seg_k, cum_k), compute, lambda c: c, dq)

  dq = lax.fori_loop(*_read_range(range_ref, static), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _compiler_params(static: _Static, grid_rank: int):
  if static.interpret:
    return None
  if static.backend == "gpu":
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    return pl_triton.CompilerParams(num_warps=4, num_stages=2)
  if static.backend == "tpu":
    from jax.experimental.pallas import tpu as pl_tpu  # pylint: disable=g-import-not-at-top
    return pl_tpu.CompilerParams(
        dimension_semantics=("parallel",) * (grid_rank - 1) + ("arbitrary",))
  return None


def _token_specs(block_q: int, block_k: int, length: int, queries_blocked: bool):
  """BlockSpecs of the three query columns [B, T, 1] and three key rows [B, 1, T]."""
  if queries_blocked:
    column = pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0))
    row = pl.BlockSpec((None, 1, length), lambda b, h, i: (b, 0, 0))
  else:
    column = pl.BlockSpec((None, length, 1), lambda b, h, i: (b, 0, 0))
    row = pl.BlockSpec((None, 1, block_k), lambda b, h, i: (b, 0, i))
  return [column] * 3 + [row] * 3


def _call_forward(tokens, q, k, v, static: _Static):
  """q [B, H, T, D], k, v [B, K, T, D] (T padded) -> (out [B, H, T, D], lse [B, H, T, 1])."""
  batch, heads, length, head_dim = q.shape
  groups = heads // k.shape[1]
  bq = static.block_q
  full = lambda b, h, i: (b, h // groups, 0, 0)
  return pl.pallas_call(
      functools.partial(_forward_kernel, static=static),
      grid=(batch, heads, length // bq),
      in_specs=_token_specs(bq, static.block_k, length, True) + [_range_spec(static)] + [
          pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, length, head_dim), full),
          pl.BlockSpec((None, None, length, head_dim), full)],
      out_specs=[pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length, 1), jnp.float32)],
      compiler_params=_compiler_params(static, 3),
      interpret=static.interpret,
      name="flash_attention_forward",
  )(*tokens[:6], tokens[6], q, k, v)


def _call_backward(tokens, q, k, v, do, lse, delta, static: _Static):
  """(dq [B, H, T, D], dk, dv [B, H, T, D] float32 per query head)."""
  batch, heads, length, head_dim = q.shape
  groups = heads // k.shape[1]
  bq, bk = static.block_q, static.block_k
  per_q_head = lambda b, h, i: (b, h, 0, 0)
  per_kv_head = lambda b, h, i: (b, h // groups, 0, 0)
  whole = lambda index_map, width: pl.BlockSpec((None, None, length, width), index_map)

  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, static=static),
      grid=(batch, heads, length // bk),
      in_specs=_token_specs(bq, bk, length, False) + [_range_spec(static)] + [
          whole(per_q_head, head_dim),
          pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i: (b, h // groups, i, 0)),
          pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i: (b, h // groups, i, 0)),
          whole(per_q_head, head_dim), whole(per_q_head, 1), whole(per_q_head, 1)],
      out_specs=[pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i: (b, h, i, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct((batch, heads, length, head_dim), jnp.float32)] * 2,
      compiler_params=_compiler_params(static, 3),
      interpret=static.interpret,
      name="flash_attention_dkv",
  )(*tokens[:6], tokens[7], q, k, v, do, lse, delta)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, static=static),
      grid=(batch, heads, length // bq),
      in_specs=_token_specs(bq, bk, length, True) + [_range_spec(static)] + [
          pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0)),
          whole(per_kv_head, head_dim), whole(per_kv_head, head_dim),
          pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
      out_specs=pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
      compiler_params=_compiler_params(static, 3),
      interpret=static.interpret,
      name="flash_attention_dq",
  )(*tokens[:6], tokens[6], q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, tokens, q, k, v):
  return _call_forward(tokens, q, k, v, static)[0]


def _flash_forward(static, tokens, q, k, v):
  out, lse = _call_forward(tokens, q, k, v, static)
  return out, (tokens, q, k, v, out, lse)


def _flash_backward(static, residuals, d_out):
  tokens, q, k, v, out, lse = residuals
  # delta_t = sum_d dO * O = sum_s P_ts dP_ts, the softmax backward's row term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = _call_backward(tokens, q, k, v, d_out.astype(q.dtype), lse, delta, static)
  batch, kv_heads, length, head_dim = k.shape
  group_sum = lambda x: x.reshape(batch, kv_heads, -1, length, head_dim).sum(axis=2)
  token_cotangents = jax.tree.map(lambda _: None, tokens)
  return (token_cotangents, dq.astype(q.dtype), group_sum(dk).astype(k.dtype),
          group_sum(dv).astype(v.dtype))


_flash.defvjp(_flash_forward, _flash_backward)


def _check_block(name: str, value: int) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
    raise ValueError(f"flash_attention: {name} must be a positive multiple of 8, got {value!r}")
  return value


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: Optional[jax.Array] = None, ar_flag: Optional[jax.Array] = None,
                    positions: Optional[jax.Array] = None, causal: bool = True,
                    softcap: Optional[float] = None, window: Optional[int] = None,
                    scale: Optional[float] = None, block_q: Optional[int] = None,
                    block_k: Optional[int] = None, backend: Optional[str] = None,
                    interpret: Optional[bool] = None) -> jax.Array:
  """Masked attention of q [B, T, H, D] over k, v [B, T, K, D]; see the module docstring.

  block_q / block_k default to DEFAULT_BLOCKS[backend] (shrunk for short rows); `backend`
  defaults to jax's default backend; `interpret` defaults to True on CPU only.
  """
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} must be [B, T, H, D] "
                     "and two equal [B, T, K, D]")
  batch, length, heads, head_dim = q.shape
  if k.shape[0] != batch or k.shape[1] != length or k.shape[3] != head_dim:
    raise ValueError(f"flash_attention: k {k.shape} does not fit q {q.shape}: self-attention needs "
                     "the same batch, length and head size")
  if heads % k.shape[2]:
    raise ValueError(f"flash_attention: {heads} query heads are not a multiple of {k.shape[2]} "
                     "kv heads")
  for name, value in (("segment_ids", segment_ids), ("ar_flag", ar_flag),
                      ("positions", positions)):
    if value is not None and tuple(value.shape) != (batch, length):
      raise ValueError(f"flash_attention: {name} has shape {tuple(value.shape)}, expected "
                       f"{(batch, length)} ([B, T])")
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"flash_attention: window must be a positive integer or None, got {window!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"flash_attention: softcap must be positive or None, got {softcap!r}")
  name = _backend(backend)
  default_q, default_k = DEFAULT_BLOCKS[name]
  # Short rows use smaller blocks (powers of two, at least 16) rather than padding to a big one.
  fit = max(16, 1 << max(0, (length - 1).bit_length()))
  bq = _check_block("block_q", block_q if block_q is not None else min(default_q, fit))
  bk = _check_block("block_k", block_k if block_k is not None else min(default_k, fit))
  static = _Static(scale=float(head_dim ** -0.5 if scale is None else scale),
                   softcap=None if softcap is None else float(softcap), window=window,
                   block_q=bq, block_k=bk, backend=name,
                   interpret=(name == "cpu") if interpret is None else bool(interpret))

  ones = jnp.ones((batch, length), jnp.int32)
  seg = ones if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  ar = (ones if causal else 0 * ones) if ar_flag is None else jnp.asarray(ar_flag, jnp.int32)
  cum = jnp.cumsum(ar, axis=1, dtype=jnp.int32)
  pos = (jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
         if positions is None else jnp.asarray(positions, jnp.int32))

  padded = -(-length // math.lcm(bq, bk)) * math.lcm(bq, bk)
  extra = padded - length
  pad_tokens = lambda x, mode: jnp.pad(x, ((0, 0), (0, extra)), mode=mode)
  # Padding tokens get segment 0 (never seen, seeing nothing); cum_ar continues the row's last
  # value so the per-block cum_ar ranges, and hence the block skipping, stay tight.
  seg, cum, pos = pad_tokens(seg, "constant"), pad_tokens(cum, "edge"), pad_tokens(pos, "constant")
  tokens = (seg[:, :, None], cum[:, :, None], pos[:, :, None],
            seg[:, None, :], cum[:, None, :], pos[:, None, :],
            *live_block_ranges(seg, cum, bq, bk))
  to_heads_first = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  out = _flash(static, tokens, to_heads_first(q), to_heads_first(k), to_heads_first(v))
  return out.transpose(0, 2, 1, 3)[:, :length]
