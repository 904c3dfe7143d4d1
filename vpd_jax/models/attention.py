"""Attention: the masks the models use and the dense dot-product attention, behind one switch.

Layout: queries [B, T, H, D], keys and values [B, S, K, D] with H a multiple of K (grouped-query
attention: query head h reads kv head h // (H // K), the same grouping as Hugging Face's
`repeat_kv`), masks bool [B, T, S] indexed [query, key].

`attention(..., impl=)` picks the implementation: "xla" is the dense path below; "pallas" is the
flash-attention kernel (vpd_jax.kernels.flash_attention; Pallas interpret mode on CPU); "auto" picks
the kernel on GPU and TPU for rows of 128 tokens or more, the dense path on CPU and for short rows
and single-token decoding (`resolve_impl`). The kernel never takes a dense mask: it runs when the
mask is a `SegmentMask` (per-token segment ids and ar flags, which the VLM passes on the kernel
path) or None (full attention, the ViT); a dense [B, T, S] mask (the KV-cache paths) always runs
the dense path. Inside a jit with a mesh set (jax.set_mesh), the kernel runs under jax.shard_map
over the batch and head axes that the logical axis rules give, so sharded training runs it on each
shard instead of gathering (or replicating) its inputs.

Masks:
  prefix_lm_mask       prefix-LM + segment mask of packed rows (the same rule as
                       vpd_jax.data.features.make_attention_mask, which the tests check; it lives
                       here too so that the model does not import the TensorFlow data layer).
  sliding_window_mask  Gemma 2's local attention: a mask restricted to keys less than `window`
                       positions away, except pairs that see each other (a bidirectional prefix
                       stays whole), as Hugging Face's PaliGemma 2 does.
"""

import functools
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vpd_jax import sharding as sharding_lib

# Large negative logit for masked keys. A row with no allowed key gets a uniform softmax over these
# equal values (finite, never NaN); such rows are padding and are never read.
_MASKED = -2.3819763e38


def prefix_lm_mask(ar_flag: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """bool [..., L, L]: query q sees key k when both share a segment > 0 and cum_ar[k] <= cum_ar[q].

  `ar_flag` is 0 on image and prefix tokens (full attention among them) and 1 on suffix tokens
  (causal); `segment_ids` is 0 on padding.
  """
  ar = jnp.asarray(ar_flag, jnp.int32)
  seg = jnp.asarray(segment_ids, jnp.int32)
  if ar.shape != seg.shape:
    raise ValueError(f"prefix_lm_mask: ar_flag has shape {ar.shape} but segment_ids has shape "
                     f"{seg.shape}; both must be [..., L]")
  cum = jnp.cumsum(ar, axis=-1)
  earlier = cum[..., None, :] <= cum[..., :, None]
  same_segment = (seg[..., :, None] == seg[..., None, :]) & (seg[..., :, None] > 0)
  return earlier & same_segment


def mutual_pairs(mask: jax.Array) -> jax.Array:
  """bool [B, L, L]: pairs of a square mask that attend to each other (bidirectional blocks)."""
  return mask & jnp.swapaxes(mask, -1, -2)


def sliding_window_mask(mask: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                        window: int, mutual: Optional[jax.Array] = None) -> jax.Array:
  """`mask` [B, T, S] limited to |q_position - k_position| < window, except `mutual` pairs.

  With a causal mask this is Gemma 2's local attention (a query sees itself and the window - 1
  keys before it). `mutual` [B, T, S] marks pairs exempt from the window: the image and prefix
  tokens of a prefix-LM see each other whatever their distance, as in Hugging Face's PaliGemma 2
  (its sliding mask is "causal window OR same prefix block").
  """
  distance = jnp.abs(q_positions[:, :, None] - k_positions[:, None, :])
  near = distance < window
  if mutual is not None:
    near = near | mutual
  return mask & near


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: Optional[jax.Array] = None, *, softcap: Optional[float] = None,
                          scale: Optional[float] = None) -> jax.Array:
  """Dense attention: softmax(softcap(scale * q.k)) v over allowed keys; returns [B, T, H, D].

  Logits, soft-capping and softmax run in float32 whatever the input dtype (as Hugging Face's
  eager Gemma does); the probabilities are cast back to v's dtype for the weighted sum. `scale`
  defaults to 1/sqrt(D); `softcap` c maps logits x to c * tanh(x / c). `mask` None means every key.
  """
  batch, q_len, num_heads, head_dim = q.shape
  _, k_len, num_kv_heads, _ = k.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != head_dim:
    raise ValueError(f"dot_product_attention: q {q.shape}, k {k.shape} and v {v.shape} do not "
                     "fit [B, T, H, D], [B, S, K, D], [B, S, K, D]")
  if num_heads % num_kv_heads:
    raise ValueError(f"dot_product_attention: {num_heads} query heads are not a multiple of "
                     f"{num_kv_heads} kv heads")
  if mask is not None and mask.shape != (batch, q_len, k_len):
    raise ValueError(f"dot_product_attention: mask has shape {mask.shape}, expected "
                     f"{(batch, q_len, k_len)} ([B, T, S])")
  scale = head_dim ** -0.5 if scale is None else scale
  return _dense_attention(q, k, v, mask, softcap, float(scale))


# The dense path computes in a head-major layout, queries [B, K, G*T, D] (the G query heads that
# share kv head k stacked along the rows) against keys [B, K, S, D], so that both products are
# batched over (B, K) with G*T rows each, and its backward pass is written out (the standard
# softmax-attention gradient) instead of differentiated. On CPU, the attention of size `small`
# (forward and backward, alone) ran about 1.5x faster than with [B, T, K, G, D] einsums and their
# autodiff; BENCHMARKS.md ("train") has what it and the GeGLU and RoPE backward passes in
# models/gemma.py gave the SFT step.

def _heads_first(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, H, D] -> [B, K, G*T, D], row g*T + t holding query head k*G + g at position t."""
  batch, length, heads, dim = x.shape
  groups = heads // num_kv_heads
  x = x.reshape(batch, length, num_kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
  return x.reshape(batch, num_kv_heads, groups * length, dim)


def _heads_last(x: jax.Array, length: int) -> jax.Array:
  """The inverse of _heads_first: [B, K, G*T, D] -> [B, T, K*G, D]."""
  batch, num_kv_heads, rows, dim = x.shape
  groups = rows // length
  x = x.reshape(batch, num_kv_heads, groups, length, dim).transpose(0, 3, 1, 2, 4)
  return x.reshape(batch, length, num_kv_heads * groups, dim)


def _row_mask(mask: jax.Array, groups: int) -> jax.Array:
  """bool [B, T, S] -> [B, 1, G*T, S], the rows of _heads_first."""
  return jnp.tile(mask, (1, groups, 1))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense_attention(q, k, v, mask, softcap, scale):
  return _dense_attention_fwd(q, k, v, mask, softcap, scale)[0]


def _dense_attention_fwd(q, k, v, mask, softcap, scale):
  q_len, num_kv_heads = q.shape[1], k.shape[2]
  qh = _heads_first(q, num_kv_heads)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  capped = None
  if softcap is not None:
    capped = jnp.tanh(logits / softcap)
    logits = capped * softcap
  if mask is not None:
    logits = jnp.where(_row_mask(mask, q.shape[2] // num_kv_heads), logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), vh)
  return _heads_last(out, q_len), (qh, kh, vh, probs, out, capped, mask)


def _dense_attention_bwd(softcap, scale, residuals, d_out):
  qh, kh, vh, probs, out, capped, mask = residuals
  q_len, num_kv_heads = d_out.shape[1], kh.shape[1]
  d_outh = _heads_first(d_out, num_kv_heads)
  d_vh = jnp.einsum("bkqs,bkqd->bksd", probs.astype(vh.dtype), d_outh)
  d_probs = jnp.einsum("bkqd,bksd->bkqs", d_outh, vh, preferred_element_type=jnp.float32)
  # Softmax: d_logits = p * (d_p - sum_s p * d_p), where sum_s p * d_p = d_out . out per row.
  row = jnp.sum(d_outh.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = probs * (d_probs - row)
  if mask is not None:  # masked logits are constants (this matters for rows with no key only)
    d_logits = jnp.where(_row_mask(mask, qh.shape[2] // q_len), d_logits, 0.0)
  if softcap is not None:
    d_logits = d_logits * (1.0 - capped * capped)
  d_logits = (d_logits * jnp.float32(scale)).astype(qh.dtype)
  d_qh = jnp.einsum("bkqs,bksd->bkqd", d_logits, kh)
  d_kh = jnp.einsum("bkqs,bkqd->bksd", d_logits, qh)
  return (_heads_last(d_qh, q_len), d_kh.transpose(0, 2, 1, 3), d_vh.transpose(0, 2, 1, 3),
          None)


_dense_attention.defvjp(_dense_attention_fwd, _dense_attention_bwd)


# "auto" picks the kernel for rows at least this long on GPU and TPU.
KERNEL_MIN_LENGTH = 128


def resolve_impl(impl: str, length: Optional[int] = None, backend: Optional[str] = None) -> str:
  """The implementation `impl` runs as for rows of `length` tokens on `backend` (default: jax's).

  "xla" and "pallas" run as named; "auto" runs "pallas" on GPU and TPU when `length` is at least
  KERNEL_MIN_LENGTH, "xla" otherwise (CPU, short or unknown lengths, single-token decoding).
  """
  if impl in ("xla", "pallas"):
    return impl
  if impl == "auto":
    backend = jax.default_backend() if backend is None else backend
    on_accelerator = backend in ("gpu", "cuda", "rocm", "tpu")
    use_kernel = on_accelerator and length is not None and length >= KERNEL_MIN_LENGTH
    return "pallas" if use_kernel else "xla"
  raise ValueError(f"unknown attention_impl {impl!r}; expected 'xla', 'pallas' or 'auto'")


@flax.struct.dataclass
class SegmentMask:
  """The prefix-LM + segment mask as per-token inputs, for the kernel: ar_flag and segment_ids
  [B, T] (the rule of prefix_lm_mask), and the kernel's block sizes (None: the backend default)."""
  ar_flag: jax.Array
  segment_ids: jax.Array
  block_q: Optional[int] = flax.struct.field(pytree_node=False, default=None)
  block_k: Optional[int] = flax.struct.field(pytree_node=False, default=None)


def _kernel_specs(q_shape, num_kv_heads: int, mesh):
  """PartitionSpecs (q and out, k and v, per-token [B, T] arrays) for the kernel's shard_map."""
  rules = nn.get_logical_axis_rules() or sharding_lib.DEFAULT_RULES
  batch_axes, _, head_axes, _ = sharding_lib.logical_to_mesh_spec(
      ("batch", "length", "heads", "head_dim"), mesh, rules, q_shape)
  kv_head_axes = head_axes
  if head_axes is not None and num_kv_heads % sharding_lib.axes_size(mesh, head_axes):
    if num_kv_heads != 1:
      # Query heads split evenly but kv heads do not: the groups would straddle shards.
      head_axes = kv_head_axes = None
    else:
      kv_head_axes = None  # multi-query: every shard of query heads reads the one kv head
  return (P(batch_axes, None, head_axes, None), P(batch_axes, None, kv_head_axes, None),
          P(batch_axes, None))


def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     ar_flag: jax.Array, positions: jax.Array, *, softcap: Optional[float] = None,
                     scale: Optional[float] = None, window: Optional[int] = None,
                     block_q: Optional[int] = None, block_k: Optional[int] = None) -> jax.Array:
  """The flash-attention kernel, under jax.shard_map when a multi-device mesh is set."""
  from vpd_jax.kernels import flash_attention  # pylint: disable=g-import-not-at-top
  def run(q, k, v, segment_ids, ar_flag, positions):
    return flash_attention.flash_attention(
        q, k, v, segment_ids=segment_ids, ar_flag=ar_flag, positions=positions, softcap=softcap,
        window=window, scale=scale, block_q=block_q, block_k=block_k)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, segment_ids, ar_flag, positions)
  q_spec, kv_spec, token_spec = _kernel_specs(q.shape, k.shape[2], mesh)
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (token_spec,) * 3,
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, ar_flag,
                                                         positions)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, *, impl: str = "auto",
              softcap: Optional[float] = None, scale: Optional[float] = None,
              positions: Optional[jax.Array] = None, window: Optional[int] = None,
              local: Optional[jax.Array] = None) -> jax.Array:
  """Attention through the implementation `impl` names (see the module docstring).

  `mask`: None, a dense bool [B, T, S] mask, or a SegmentMask (kernel path; its sliding window
  reads `positions` [B, T], default 0..T-1). `window` and `local` are read on the kernel path only
  (a dense mask already holds the window): with `local` (a traced bool, Gemma 2's even layers) the
  window applies where `local` is true, without it always.
  """
  if isinstance(mask, SegmentMask):
    ones = jnp.ones(q.shape[:2], jnp.int32)
    positions = jnp.cumsum(ones, axis=1) - 1 if positions is None else positions
    run = lambda w: kernel_attention(q, k, v, mask.segment_ids, mask.ar_flag, positions,
                                     softcap=softcap, scale=scale, window=w,
                                     block_q=mask.block_q, block_k=mask.block_k)
    if window is None:
      return run(None)
    if local is None:
      return run(window)
    return jax.lax.cond(local, lambda: run(window), lambda: run(None))
  resolved = resolve_impl(impl, q.shape[1])
  if resolved == "pallas" and mask is None and q.shape[1] == k.shape[1]:
    ones = jnp.ones(q.shape[:2], jnp.int32)
    # Full attention: one segment, no causal tokens.
    return kernel_attention(q, k, v, ones, 0 * ones, jnp.cumsum(ones, axis=1) - 1,
                            softcap=softcap, scale=scale)
  return dot_product_attention(q, k, v, mask, softcap=softcap, scale=scale)
