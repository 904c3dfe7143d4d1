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
  groups = num_heads // num_kv_heads
  q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, q_len, num_heads, head_dim)


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
