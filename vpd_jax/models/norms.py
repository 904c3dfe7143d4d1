"""RMSNorm (the decoder) and LayerNorm (the ViT) with their backward passes written out.

  rms_norm(x [..., D], scale [D], eps)         x / sqrt(mean(x^2) + eps) * (1 + scale)   (Gemma)
  layer_norm(x [..., D], scale, bias, eps)     (x - mean) / sqrt(var + eps) * scale + bias

Both normalise in float32 whatever x's dtype and return x's dtype; the variance is the two-pass
mean((x - mean)^2), as PyTorch's LayerNorm computes it. The backward passes are the closed forms
(with n = x / rms or (x - mean) / std, g the incoming gradient times the scale):
  d_x = (g - mean(g * n) * n) / rms                     d_x = (g - mean(g) - mean(g * n) * n) / std
so each is one reduction and one loop per row. Differentiated by JAX instead, XLA's CPU backward
pass fused the residual stream's gradients of several blocks into loops that recompute the
statistics (BENCHMARKS.md, "train").
"""

import functools

import jax
import jax.numpy as jnp


def _row_sum(x, like):
  """Sums x over every axis but the last, to the shape and dtype of the parameter `like`."""
  return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0).astype(like.dtype)


def _rms_stats(x, eps):
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return x32 * inv, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  normed, _ = _rms_stats(x, eps)
  return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def _rms_norm_fwd(x, scale, eps):
  return rms_norm(x, scale, eps), (x, scale)


def _rms_norm_bwd(eps, residuals, d_out):
  x, scale = residuals
  normed, inv = _rms_stats(x, eps)
  d32 = d_out.astype(jnp.float32)
  g = d32 * (1.0 + scale.astype(jnp.float32))
  d_x = (g - jnp.mean(g * normed, axis=-1, keepdims=True) * normed) * inv
  return d_x.astype(x.dtype), _row_sum(d32 * normed, scale)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _ln_stats(x, eps):
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  return centred * inv, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  normed, _ = _ln_stats(x, eps)
  out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return out.astype(x.dtype)


def _layer_norm_fwd(x, scale, bias, eps):
  return layer_norm(x, scale, bias, eps), (x, scale, bias)


def _layer_norm_bwd(eps, residuals, d_out):
  x, scale, bias = residuals
  normed, inv = _ln_stats(x, eps)
  d32 = d_out.astype(jnp.float32)
  g = d32 * scale.astype(jnp.float32)
  d_x = (g - jnp.mean(g, axis=-1, keepdims=True)
         - jnp.mean(g * normed, axis=-1, keepdims=True) * normed) * inv
  return d_x.astype(x.dtype), _row_sum(d32 * normed, scale), _row_sum(d32, bias)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
