"""SigLIP-style vision transformer: every patch token out, no pooling (PaliGemma's image encoder).

images [N, H, W, 3] in [-1, 1] -> patch embedding (a stride-P convolution) + learned position
embeddings -> `depth` pre-LayerNorm blocks (multi-head self-attention, GELU MLP) -> final LayerNorm
-> [N, (H/P) * (W/P), width]; with `projection_width` set, a linear "head" maps the tokens to that
width (PaliGemma's projection into the decoder).

Parameter names and shapes follow big_vision's ViT with `scan=True` (blocks stacked on a leading
depth axis), which PaliGemma checkpoints use:
  embedding/{kernel [P, P, 3, W], bias [W]}             pos_embedding [1, N_tok, W]
  Transformer/encoderblock/LayerNorm_0, LayerNorm_1/{scale, bias} [depth, W]
  Transformer/encoderblock/MultiHeadDotProductAttention_0/{query, key, value}/
      {kernel [depth, W, heads, W/heads], bias [depth, heads, W/heads]}
  Transformer/encoderblock/MultiHeadDotProductAttention_0/out/
      {kernel [depth, heads, W/heads, W], bias [depth, W]}
  Transformer/encoderblock/MlpBlock_0/Dense_0/{kernel [depth, W, mlp], bias [depth, mlp]}
  Transformer/encoderblock/MlpBlock_0/Dense_1/{kernel [depth, mlp, W], bias [depth, W]}
  Transformer/encoder_norm/{scale, bias} [W]             head/{kernel [W, D], bias [D]}
LayerNorm epsilon is 1e-6 and GELU uses the tanh approximation, as in SigLIP.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vpd_jax.models import attention as attention_lib
from vpd_jax.models import norms
from vpd_jax.models import sizes

_LN_EPS = 1e-6


def _init(initializer, names):
  return nn.with_logical_partitioning(initializer, names)


class LayerNorm(nn.Module):
  """LayerNorm with flax's parameter names (scale, bias) and the written-out backward pass of
  norms.layer_norm."""
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", _init(nn.initializers.ones_init(), ("vit_embed",)), (width,),
                       self.param_dtype)
    bias = self.param("bias", _init(nn.initializers.zeros_init(), ("vit_embed",)), (width,),
                      self.param_dtype)
    return norms.layer_norm(x.astype(self.dtype), scale, bias, _LN_EPS)


def _layer_norm(name: str, dtype, param_dtype) -> LayerNorm:
  return LayerNorm(dtype=dtype, param_dtype=param_dtype, name=name)


class _Projection(nn.Module):
  """kernel `shape` (+ bias over the output dims) applied by `eqn`, with logical `names`.

  Explicit parameters rather than nn.DenseGeneral: DenseGeneral initialises a flattened kernel,
  which cannot carry per-dimension logical names while a mesh is active.
  """
  shape: tuple
  names: tuple
  in_axis: object
  out_axis: object
  eqn: str
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform(in_axis=self.in_axis, out_axis=self.out_axis)
    kernel = self.param("kernel", _init(init, self.names), self.shape, self.param_dtype)
    out_dims = (self.out_axis,) if isinstance(self.out_axis, int) else self.out_axis
    bias_shape = tuple(self.shape[i] for i in out_dims)
    bias = self.param("bias", _init(nn.initializers.zeros_init(),
                                    tuple(self.names[i] for i in out_dims)),
                      bias_shape, self.param_dtype)
    y = jnp.einsum(self.eqn, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with big_vision's query/key/value/out parameter layout."""
  num_heads: int
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    heads, head_dim = self.num_heads, width // self.num_heads
    q, k, v = (
        _Projection((width, heads, head_dim), ("vit_embed", "vit_heads", "head_dim"), 0, (1, 2),
                    "btd,dnh->btnh", self.dtype, self.param_dtype, name=name)(x)
        for name in ("query", "key", "value"))
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    out = attention_lib.attention(q, k, v, None, impl=self.attention_impl)
    return _Projection((heads, head_dim, width), ("vit_heads", "head_dim", "vit_embed"), (0, 1), 2,
                       "btnh,nhd->btd", self.dtype, self.param_dtype, name="out")(out)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    # Dense layers on [B*N, W] rows, as in the decoder's MLP (gemma.FeedForward): XLA's CPU
    # backward pass is faster on 2-D operands.
    shape = x.shape
    width = shape[-1]
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_0",
                 kernel_init=_init(nn.initializers.xavier_uniform(), ("vit_embed", "vit_mlp")),
                 bias_init=_init(bias_init, ("vit_mlp",)))(x.reshape(-1, width))
    x = nn.gelu(x, approximate=True).reshape(*shape[:-1], self.mlp_dim)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_1",
                 kernel_init=_init(nn.initializers.xavier_uniform(), ("vit_mlp", "vit_embed")),
                 bias_init=_init(bias_init, ("vit_embed",)))(x.reshape(-1, self.mlp_dim))
    return y.reshape(shape)


class Encoder1DBlock(nn.Module):
  """One pre-LayerNorm transformer block; (x, None) -> (x, None) so that nn.scan can stack it."""
  config: sizes.VitConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, unused_scan_input=None):
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = _layer_norm("LayerNorm_0", self.dtype, self.param_dtype)(x)
    y = SelfAttention(self.config.num_heads, self.dtype, self.param_dtype, self.attention_impl,
                      name="MultiHeadDotProductAttention_0")(y)
    x = x + y
    y = _layer_norm("LayerNorm_1", self.dtype, self.param_dtype)(x)
    y = MlpBlock(self.config.mlp_dim, self.dtype, self.param_dtype, name="MlpBlock_0")(y)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
    return x, None


class Encoder(nn.Module):
  config: sizes.VitConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  remat: str = "none"
  scan_unroll: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.scan(
        sizes.remat_block(Encoder1DBlock, self.remat),
        variable_axes={"params": 0}, split_rngs={"params": True}, length=self.config.depth,
        unroll=self.config.depth if self.scan_unroll else 1,
        metadata_params={nn.PARTITION_NAME: None})
    x, _ = block(self.config, self.dtype, self.param_dtype, self.attention_impl,
                 name="encoderblock")(x, None)
    return _layer_norm("encoder_norm", self.dtype, self.param_dtype)(x)


class ViT(nn.Module):
  """images [N, H, W, 3] in [-1, 1] -> tokens [N, num_tokens, width or projection_width]."""
  config: sizes.VitConfig
  projection_width: Optional[int] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  remat: str = "none"
  scan_unroll: bool = False

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"ViT: images must be [N, {cfg.image_size}, {cfg.image_size}, 3], got "
                       f"shape {tuple(images.shape)}")
    patch = (cfg.patch_size, cfg.patch_size)
    x = nn.Conv(cfg.width, patch, strides=patch, padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding",
                kernel_init=_init(nn.initializers.lecun_normal(),
                                  (None, None, "patch", "vit_embed")),
                bias_init=_init(nn.initializers.zeros_init(), ("vit_embed",)))(
                    jnp.asarray(images, self.dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    pos = self.param("pos_embedding",
                     _init(nn.initializers.normal(stddev=1 / np.sqrt(c)),
                           (None, "vit_pos", "vit_embed")),
                     (1, h * w, c), self.param_dtype)
    x = x + jnp.asarray(pos, self.dtype)
    x = Encoder(cfg, self.dtype, self.param_dtype, self.attention_impl, self.remat,
                self.scan_unroll, name="Transformer")(x)
    if self.projection_width is not None:
      x = nn.Dense(self.projection_width, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head", kernel_init=_init(nn.initializers.lecun_normal(),
                                                  ("vit_embed", "embed")),
                   bias_init=_init(nn.initializers.zeros_init(), ("embed",)))(x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
