"""The Gemma (1 and 2) decoder: embeddings, `depth` blocks stacked under nn.scan, tied logits.

  embed(tokens [B, T])                      -> [B, T, D], the embedding row times sqrt(D)
  __call__(x [B, T, D], positions [B, T], mask [B, T, S] or attention.SegmentMask, cache=None)
                                            -> (logits [B, T, V] float32, new_cache)
  logits(hidden [B, T, D])                  -> tied-embedding logits, soft-capped if configured

Numerics follow Hugging Face's Gemma/Gemma2 (and big_vision's gemma.py): RMSNorm in float32 with
(1 + scale); RoPE with base 10,000 on the two halves of each head (rotate_half convention),
inv_freq = 1 / base**(2i / head_dim); grouped-query attention; GeGLU with tanh-approximate GELU;
softmax in float32. Gemma 2 adds attention and final logit soft-capping, post-attention and
post-feed-forward norms, query scaling by query_pre_attn_scalar**-0.5, and local attention on even
layers (0, 2, ...) that sees keys less than `sliding_window` positions away (see
attention.sliding_window_mask for the prefix exception).

KV cache (`init_cache`): {"k": [depth, B, S, K, head_dim], "v": same, "end": int32 [B]}. With a
cache, the call writes each token's key and value at cache slot `positions[b, t]` (positions within
one call must differ per row) and `mask` [B, T, S] ranges over all S slots, slot s holding
position s. "end" is carried unchanged; the caller (vlm.VLM) keeps it as the number of filled slots.

Parameters (big_vision's scan layout; N heads, K kv heads, H head_dim, F mlp_dim):
  embedder/input_embedding [V, D]
  layers/pre_attention_norm/scale [depth, D]      layers/pre_ffw_norm/scale [depth, D]
  layers/attn/q_einsum/w [depth, N, D, H]         layers/attn/kv_einsum/w [depth, 2, K, D, H]
  layers/attn/attn_vec_einsum/w [depth, N, H, D]
  layers/mlp/gating_einsum [depth, 2, D, F]       layers/mlp/linear [depth, F, D]
  layers/post_attention_norm/scale, layers/post_ffw_norm/scale [depth, D]   (post_norms only)
  final_norm/scale [D]
(q_einsum/kv_einsum are used for every head count, including K == N, where big_vision would use
one qkv_einsum [3, N, D, H].) Hugging Face names: gating_einsum[0] = gate_proj.T,
gating_einsum[1] = up_proj.T; Gemma 1's post_attention_layernorm is pre_ffw_norm here.
"""

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models import attention as attention_lib
from vpd_jax.models import norms
from vpd_jax.models import sizes


def _init(initializer, names):
  return nn.with_logical_partitioning(initializer, names)


def _fan_in_init(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """RoPE on x [B, T, heads, H] at positions [B, T], rotating the halves (x1, x2) of each head."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  return _rotate(x.astype(jnp.float32), sin, cos).astype(x.dtype)


@jax.custom_vjp
def _rotate(x, sin, cos):
  """(x1 cos - x2 sin, x2 cos + x1 sin) on the halves of the last axis of x."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_fwd(x, sin, cos):
  return _rotate(x, sin, cos), (sin, cos)


def _rotate_bwd(residuals, d_out):
  # A rotation's transpose is the rotation by the opposite angle: one concatenation, where
  # autodiff of the slices would pad each half's gradient and add them.
  sin, cos = residuals
  return _rotate(d_out, -sin, cos), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_and_slope(x, approximate: bool):
  """GELU(x) and its derivative (tanh approximation or exact)."""
  if approximate:
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), slope
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
  return x * cdf, cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def geglu(gate: jax.Array, up: jax.Array, approximate: bool) -> jax.Array:
  """GELU(gate) * up. Its backward pass recomputes GELU and its slope from `gate` in one loop
  instead of keeping autodiff's intermediates (BENCHMARKS.md, "train")."""
  return nn.gelu(gate, approximate=approximate) * up


def _geglu_fwd(gate, up, approximate):
  return geglu(gate, up, approximate), (gate, up)


def _geglu_bwd(approximate, residuals, d_out):
  gate, up = residuals
  gelu, slope = _gelu_and_slope(gate, approximate)
  return d_out * up * slope, d_out * gelu


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _init(nn.initializers.zeros_init(), ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    return norms.rms_norm(x, scale, self.eps)


class Einsum(nn.Module):
  """A weight "w" of `shape` contracted with the input by `eqn`."""
  shape: tuple
  names: tuple
  init: nn.initializers.Initializer
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param("w", _init(self.init, self.names), self.shape, self.param_dtype)
    return jnp.einsum(eqn, x, w.astype(self.dtype))


class Embedder(nn.Module):
  vocab_size: int
  width: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding",
        _init(nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0),
              ("vocab", "embed")),
        (self.vocab_size, self.width), self.param_dtype)

  def encode(self, tokens):
    x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
    return x * jnp.sqrt(jnp.float32(self.width)).astype(self.dtype)

  def decode(self, x):
    return jnp.einsum("btd,vd->btv", x, self.input_embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, writing to and reading from a layer's KV cache."""
  config: sizes.GemmaConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, layer, positions, mask):
    cfg = self.config
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Einsum((n, d, h), ("heads", "embed", "head_dim"), _fan_in_init(1, (0, 2)),
               name="q_einsum", **kw)("btd,ndh->btnh", x)
    key, value = Einsum((2, k, d, h), (None, "kv_heads", "embed", "head_dim"),
                        _fan_in_init(2, (0, 1, 3)), name="kv_einsum", **kw)("btd,skdh->sbtkh", x)
    q = nn.with_logical_constraint(apply_rope(q, positions, cfg.rope_base),
                                   ("batch", "length", "heads", "head_dim"))
    key = nn.with_logical_constraint(apply_rope(key, positions, cfg.rope_base),
                                     ("batch", "length", "kv_heads", "head_dim"))
    value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))
    new_cache = None
    if "k" in layer:
      rows = jnp.arange(x.shape[0])[:, None]
      new_cache = {"k": layer["k"].at[rows, positions].set(key.astype(layer["k"].dtype)),
                   "v": layer["v"].at[rows, positions].set(value.astype(layer["v"].dtype))}
      key, value = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
    out = attention_lib.attention(q, key, value, mask, impl=self.attention_impl,
                                  softcap=cfg.attn_logit_softcap, scale=cfg.query_scale,
                                  positions=positions, window=cfg.sliding_window,
                                  local=layer.get("local"))
    out = Einsum((n, h, d), ("heads", "head_dim", "embed"), _fan_in_init((0, 1), 2),
                 name="attn_vec_einsum", **kw)("btnh,nhd->btd", out)
    return out, new_cache


class FeedForward(nn.Module):
  """GeGLU: (act(x W_gate) * x W_up) W_down with W_gate, W_up stacked in "gating_einsum"."""
  config: sizes.GemmaConfig
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gating = self.param("gating_einsum", _init(_fan_in_init(1, (0, 2)), (None, "embed", "mlp")),
                        (2, cfg.width, cfg.mlp_dim), self.param_dtype).astype(self.dtype)
    linear = self.param("linear", _init(_fan_in_init(0, 1), ("mlp", "embed")),
                        (cfg.mlp_dim, cfg.width), self.param_dtype).astype(self.dtype)
    # The matmuls run on [B*T, D] rows: with [B, T, D] operands XLA's CPU backward pass
    # transposes the GELU's gradient in a separate loop (the SFT step of size small took 1.4x
    # longer; bench/train.py).
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    hidden = geglu(jnp.dot(rows, gating[0]), jnp.dot(rows, gating[1]),
                   cfg.hidden_act == "gelu_tanh").reshape(*shape[:-1], cfg.mlp_dim)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    return jnp.dot(hidden.reshape(rows.shape[0], cfg.mlp_dim), linear).reshape(shape)


class Block(nn.Module):
  """One decoder block; nn.scan stacks it, scanning `layer` ({"local"[, "k", "v"]}) over depth."""
  config: sizes.GemmaConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, layer, positions, mask, local_mask):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, self.param_dtype, name=name)
    if local_mask is not None:
      mask = jnp.where(layer["local"], local_mask, mask)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y, new_cache = Attention(cfg, self.dtype, self.param_dtype, self.attention_impl, name="attn")(
        norm("pre_attention_norm")(x), layer, positions, mask)
    if cfg.post_norms:
      y = norm("post_attention_norm")(y)
    x = x + y
    y = FeedForward(cfg, self.dtype, self.param_dtype, name="mlp")(norm("pre_ffw_norm")(x))
    if cfg.post_norms:
      y = norm("post_ffw_norm")(y)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
    return x, new_cache


def init_cache(config: sizes.GemmaConfig, batch_size: int, cache_size: int,
               dtype="float32") -> dict:
  """An empty KV cache for `batch_size` rows of `cache_size` slots (layout in the docstring)."""
  shape = (config.depth, batch_size, cache_size, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "end": jnp.zeros((batch_size,), jnp.int32)}


class Gemma(nn.Module):
  """The decoder; see the module docstring for the methods, the cache and the parameters."""
  config: sizes.GemmaConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  remat: str = "none"
  scan_unroll: bool = False

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.width, self.dtype, self.param_dtype)
    self.layers = nn.scan(
        sizes.remat_block(Block, self.remat),
        variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth,
        unroll=cfg.depth if self.scan_unroll else 1,
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        metadata_params={nn.PARTITION_NAME: None})(
            cfg, self.dtype, self.param_dtype, self.attention_impl)
    self.final_norm = RMSNorm(cfg.norm_eps, self.param_dtype)

  def embed(self, tokens):
    return self.embedder.encode(tokens)

  def logits(self, hidden):
    logits = self.embedder.decode(hidden)
    if self.config.final_logit_softcap is not None:
      cap = self.config.final_logit_softcap
      logits = jnp.tanh(logits / cap) * cap
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, x, positions, mask, cache: Optional[dict] = None, *,
               return_hidden: bool = False):
    """(logits [B, T, V] float32, new cache or None); with `return_hidden`, the final-normed
    hidden states [B, T, D] instead of the logits."""
    cfg = self.config
    batch, length, width = x.shape
    keys = length if cache is None else cache["k"].shape[2]
    if width != cfg.width or positions.shape != (batch, length):
      raise ValueError(f"Gemma: x {x.shape} and positions {positions.shape} must be [B, T, "
                       f"{cfg.width}] and [B, T]")
    # A SegmentMask (the kernel path) carries per-token inputs; the kernel applies the sliding
    # window itself on local layers.
    per_token = isinstance(mask, attention_lib.SegmentMask)
    if per_token and (cache is not None or mask.segment_ids.shape != (batch, length)):
      raise ValueError(f"Gemma: a SegmentMask needs no cache and [B, T] = {(batch, length)} "
                       f"inputs, got segment_ids {mask.segment_ids.shape}")
    if not per_token and mask.shape != (batch, length, keys):
      raise ValueError(f"Gemma: mask has shape {mask.shape}, expected {(batch, length, keys)} "
                       "([B, T, T] without a cache, [B, T, cache slots] with one)")
    layer = {}
    local_mask = None
    if cfg.sliding_window is not None:
      layer["local"] = jnp.arange(cfg.depth) % 2 == 0
      if not per_token:
        local_mask = _local_mask(mask, positions, cfg.sliding_window, cache is not None)
    if cache is not None:
      layer["k"], layer["v"] = cache["k"], cache["v"]
    x, new_layers = self.layers(x.astype(self.dtype), layer, positions, mask, local_mask)
    new_cache = None if cache is None else {**new_layers, "end": cache["end"]}
    hidden = self.final_norm(x)
    return (hidden if return_hidden else self.logits(hidden)), new_cache


def _local_mask(mask, positions, window, with_cache):
  """Gemma 2's local-layer mask for `mask`; see attention.sliding_window_mask."""
  if not with_cache:
    return attention_lib.sliding_window_mask(mask, positions, positions, window,
                                             attention_lib.mutual_pairs(mask))
  # Keys live at slots 0..S-1. Only tokens written by this call can see the query back: take the
  # mask among them ([B, T, T], keys at their slots), keep mutual pairs, put them back at the slots.
  batch, length, slots = mask.shape
  rows = jnp.arange(batch)[:, None, None]
  queries = jnp.arange(length)[None, :, None]
  among_new = mask[rows, queries, positions[:, None, :]]
  mutual = jnp.zeros_like(mask).at[rows, queries, positions[:, None, :]].set(
      attention_lib.mutual_pairs(among_new))
  slot_positions = jnp.broadcast_to(jnp.arange(slots)[None, :], (batch, slots))
  return attention_lib.sliding_window_mask(mask, positions, slot_positions, window, mutual)
