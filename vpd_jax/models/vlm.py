"""The PaliGemma-style VLM: image -> ViT -> linear projection -> image tokens -> Gemma decoder.

Inputs are the rows of vpd_jax.data.features.VLMFeatureConverter (all [B, L] int32 except images):
  images [B, I, H, W, 3] in [-1, 1]; tokens; image_slot; ar_flag; positions; segment_ids.
At a position with image_slot s >= 0 the decoder input is image token positions[t] of image
images[b, s] (image tokens come first in each example and positions restart at 0 per example, so a
packed row holding several examples and images gathers each example's own image); elsewhere it is
the token's embedding (times sqrt(width)). The mask is the prefix-LM + segment mask
(attention.prefix_lm_mask, equal to features.make_attention_mask): image and prefix tokens see each
other, suffix tokens see the prefix and earlier suffix tokens, nothing crosses segments, and RoPE
runs on `positions`, so every packed example gets exactly the logits it would get alone.

  model = VLM(sizes.get_size("tiny"))
  params = init_params(model, jax.random.key(0))      # boxed: nn.LogicallyPartitioned leaves
  logits = model.apply({"params": params}, **batch)   # batch: the six row features, [B, L, V] f32

Decoding (vpd_jax.models.decode drives these; rows unpacked, one image each, prompt = the image
and prefix tokens at the start of the row, right-padded):
  model.apply(v, images, tokens, image_slot, ar_flag, positions, segment_ids, cache_size=S,
              method=VLM.prefill)     -> (logits [B, V] at each row's last prompt token, cache)
  model.apply(v, next_tokens [B], cache, method=VLM.extend)   -> (logits [B, V], cache)
The cache is gemma.init_cache's dict; cache["end"] [B] counts each row's filled slots.

Parameter tree (names follow big_vision's PaliGemma with scan=True; "depth" axes are stacked
blocks; logical axis names in brackets, None = replicated):
  img/embedding/kernel [P, P, 3, Wv]  (None, None, patch, vit_embed)    img/embedding/bias [Wv]
  img/pos_embedding [1, Ni, Wv]  (None, vit_pos, vit_embed)
  img/Transformer/encoderblock/LayerNorm_0|LayerNorm_1/scale|bias [depth, Wv]  (None, vit_embed)
  img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query|key|value/kernel
      [depth, Wv, Hv, Wv/Hv] (None, vit_embed, vit_heads, head_dim);  .../bias [depth, Hv, Wv/Hv]
  img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel [depth, Hv, Wv/Hv, Wv]
      (None, vit_heads, head_dim, vit_embed);  .../out/bias [depth, Wv]
  img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel [depth, Wv, Mv] (None, vit_embed, vit_mlp)
  img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias [depth, Mv];  Dense_1/kernel [depth, Mv, Wv]
      (None, vit_mlp, vit_embed);  Dense_1/bias [depth, Wv]
  img/Transformer/encoder_norm/scale|bias [Wv]                          (vit_embed)
  img/head/kernel [Wv, D]  (vit_embed, embed);  img/head/bias [D]       -- the projection
  llm/embedder/input_embedding [V, D]  (vocab, embed)                   -- also the output layer
  llm/layers/pre_attention_norm|pre_ffw_norm/scale [depth, D]          (None, embed)
  llm/layers/post_attention_norm|post_ffw_norm/scale [depth, D]        (post_norms only)
  llm/layers/attn/q_einsum/w [depth, N, D, H]          (None, heads, embed, head_dim)
  llm/layers/attn/kv_einsum/w [depth, 2, K, D, H]      (None, None, kv_heads, embed, head_dim)
  llm/layers/attn/attn_vec_einsum/w [depth, N, H, D]   (None, heads, head_dim, embed)
  llm/layers/mlp/gating_einsum [depth, 2, D, F]        (None, None, embed, mlp)
  llm/layers/mlp/linear [depth, F, D]                  (None, mlp, embed)
  llm/final_norm/scale [D]                             (embed)
Norm scales of the decoder are used as (1 + scale) and initialised at 0.
"""

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models import attention as attention_lib
from vpd_jax.models import gemma
from vpd_jax.models import sizes
from vpd_jax.models import vit

ROW_FEATURES = ("tokens", "image_slot", "ar_flag", "positions", "segment_ids")


class VLM(nn.Module):
  """ViT + projection + Gemma; see the module docstring."""
  config: sizes.VLMConfig

  def setup(self):
    cfg = self.config
    common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  attention_impl=cfg.attention_impl, remat=cfg.remat, scan_unroll=cfg.scan_unroll)
    self.img = vit.ViT(cfg.vit, projection_width=cfg.llm.width, **common)
    self.llm = gemma.Gemma(cfg.llm, **common)

  def embed_image(self, images):
    """images [B, I, H, W, 3] -> projected image tokens [B, I, num_image_tokens, D]."""
    if images.ndim != 5:
      raise ValueError(f"VLM.embed_image: images must be [B, I, H, W, 3], got shape "
                       f"{tuple(images.shape)}")
    b, i = images.shape[:2]
    tokens = self.img(images.reshape(b * i, *images.shape[2:]))
    return tokens.reshape(b, i, *tokens.shape[1:])

  def embed_inputs(self, images, tokens, image_slot, positions):
    """Decoder inputs [B, L, D]: gathered image tokens where image_slot >= 0, token embeddings
    elsewhere."""
    image_tokens = self.embed_image(images)
    _, num_images, num_image_tokens, _ = image_tokens.shape
    rows = jnp.arange(tokens.shape[0])[:, None]
    gathered = image_tokens[rows, jnp.clip(image_slot, 0, num_images - 1),
                            jnp.clip(positions, 0, num_image_tokens - 1)]
    text = self.llm.embed(tokens)
    return jnp.where((image_slot >= 0)[..., None], gathered.astype(text.dtype), text)

  def __call__(self, images, tokens, image_slot, ar_flag, positions, segment_ids, *,
               return_hidden: bool = False):
    """Logits [B, L, V] float32 of every position of the rows (or, with `return_hidden`, the
    final-normed hidden states [B, L, D]; `VLM.logits` turns them into logits)."""
    _check_rows(images, tokens=tokens, image_slot=image_slot, ar_flag=ar_flag,
                positions=positions, segment_ids=segment_ids)
    x = self.embed_inputs(images, tokens, image_slot, positions)
    cfg = self.config
    if attention_lib.resolve_impl(cfg.attention_impl, tokens.shape[1]) == "pallas":
      # The kernel builds the mask blocks itself from these per-token inputs.
      mask = attention_lib.SegmentMask(ar_flag, segment_ids, block_q=cfg.flash_block_q,
                                       block_k=cfg.flash_block_k)
    else:
      mask = attention_lib.prefix_lm_mask(ar_flag, segment_ids)
    out, _ = self.llm(x, positions, mask, return_hidden=return_hidden)
    return out

  def logits(self, hidden):
    return self.llm.logits(hidden)

  def prefill(self, images, tokens, image_slot, ar_flag, positions, segment_ids, *,
              cache_size: int):
    """Runs the prompts and fills a fresh cache of `cache_size` slots.

    The prompt of a row is its leading run of real tokens with ar_flag 0 (image and prefix); any
    suffix tokens in the row are ignored. Returns (logits [B, V] float32 at each row's last prompt
    token, cache with "end" = prompt lengths).
    """
    _check_rows(images, tokens=tokens, image_slot=image_slot, ar_flag=ar_flag,
                positions=positions, segment_ids=segment_ids)
    batch, length = tokens.shape
    if cache_size < length:
      raise ValueError(f"VLM.prefill: cache_size {cache_size} is smaller than the row length "
                       f"{length}")
    in_prompt = (segment_ids > 0) & (ar_flag == 0)
    prompt_len = jnp.sum(in_prompt, axis=-1).astype(jnp.int32)
    # Prompt tokens sit at slots 0..n-1, which are also their positions; padding gets the later,
    # distinct slots, masked out and overwritten as tokens are generated.
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
    x = self.embed_inputs(images, tokens, image_slot, slots)
    mask = attention_lib.prefix_lm_mask(jnp.zeros_like(ar_flag), in_prompt.astype(jnp.int32))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, cache_size - length)))
    cache = gemma.init_cache(self.config.llm, batch, cache_size, self.config.dtype)
    hidden, cache = self.llm(x, slots, mask, cache, return_hidden=True)
    last = jnp.take_along_axis(hidden, jnp.maximum(prompt_len - 1, 0)[:, None, None], axis=1)
    return self.llm.logits(last)[:, 0], {**cache, "end": prompt_len}

  def extend(self, tokens, cache):
    """Feeds one token per row [B] at slot cache["end"]; returns (logits [B, V], cache)."""
    position = cache["end"]
    slots = cache["k"].shape[2]
    x = self.llm.embed(tokens[:, None])
    mask = jnp.arange(slots)[None, None, :] <= position[:, None, None]
    logits, cache = self.llm(x, position[:, None], mask, cache)
    return logits[:, 0], {**cache, "end": position + 1}


def _check_rows(images, **rows):
  shapes = {name: tuple(value.shape) for name, value in rows.items()}
  first = shapes["tokens"]
  if len(first) != 2 or any(shape != first for shape in shapes.values()):
    raise ValueError(f"VLM: the row features must all be [B, L]; got {shapes}")
  if images.ndim != 5 or images.shape[0] != first[0]:
    raise ValueError(f"VLM: images must be [B, I, H, W, 3] with B = {first[0]}, got shape "
                     f"{tuple(images.shape)}")


def example_inputs(config: sizes.VLMConfig, batch_size: int = 1, length: Optional[int] = None,
                   images_per_row: int = 1) -> dict:
  """Zero inputs of the right shapes and dtypes for VLM.__call__ (for init and eval_shape).

  `length` defaults to the image tokens plus 8 text tokens.
  """
  length = config.num_image_tokens + 8 if length is None else length
  size = config.vit.image_size
  row = np.zeros((batch_size, length), np.int32)
  return {"images": np.zeros((batch_size, images_per_row, size, size, 3), np.float32),
          **{name: row for name in ROW_FEATURES}}


def init_params(model: VLM, rng: jax.Array) -> dict:
  """Fresh parameters of `model`, boxed with their logical axis names (nn.LogicallyPartitioned).

  jax.eval_shape(functools.partial(init_params, model), rng) gives shapes and names without
  allocating; nn.get_partition_spec(...) gives the logical specs; model.apply accepts the boxed
  tree as it is (flax.core.meta.unbox gives plain arrays).
  """
  return model.init(rng, **example_inputs(model.config))["params"]


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays, boxes or jax.ShapeDtypeStructs)."""
  leaves = jax.tree_util.tree_leaves(flax.core.meta.unbox(params))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
