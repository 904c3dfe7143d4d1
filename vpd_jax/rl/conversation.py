"""Multi-turn conversations with several images as model rows, and the forward pass that reads them.

A conversation row is one segment (segment id 1), laid out in order:

  [first view: N image tokens][prompt text][model turn + EOS][image or error text][model turn]...

Per position (all int32 [L], padding zero except image_slot -1):
  tokens       text token ids; 0 on image tokens
  image_slot   on image tokens, which image of the row (0 = the first view, 1, 2, ... = operation
               outputs in order); -1 elsewhere
  image_index  on image tokens, the token's index within its image (0..N-1); 0 elsewhere
  positions    0, 1, 2, ... along the whole conversation: RoPE positions and KV-cache slots
  ar_flag      0 on the first view and the prompt (full attention among them), 1 afterwards
  segment_ids  1 on the conversation, 0 on padding
  targets      tokens[i + 1]; loss_mask 1 exactly where targets[i] is a token the model wrote
               (its turns and their EOS), never environment text or images
plus "images" float32 [max_images, S, S, 3] in [-1, 1].

Why `image_index` beside `positions`: the data layer's single-image rows use `positions` both as
RoPE position and as image-token index (vlm.VLM.embed_inputs). A second image in the same row would
then restart its RoPE positions at 0, and with a KV cache (slot = position) overwrite the first
image's keys. So conversations keep positions strictly increasing and carry the image-token index
separately; `make_apply_fn` and `forward_with_cache` feed the VLM's own submodules that way.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vpd_jax.models import attention as attention_lib
from vpd_jax.models import gemma
from vpd_jax.rl import env as env_lib

ROW_KEYS = ("tokens", "image_slot", "image_index", "positions", "ar_flag", "segment_ids",
            "targets", "loss_mask")
MODEL_INPUTS = ("images", "tokens", "image_slot", "image_index", "ar_flag", "positions",
                "segment_ids")


def prepare_image(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [-1, 1]; area averaging when shrinking, so a
  target smaller than a model pixel only tints it, as a real resize does."""
  image = Image.fromarray(np.asarray(pixels, np.uint8))
  image = image.resize((size, size), Image.BOX if min(image.size) >= size else Image.BICUBIC)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def prompt_text(question: str) -> str:
  return f"Question: {question}\n"


class ConversationRow:
  """One conversation's row before padding: a builder appending segments."""

  def __init__(self, num_image_tokens: int, image_size: int):
    self.num_image_tokens = num_image_tokens
    self.image_size = image_size
    self.columns = {k: [] for k in ("tokens", "image_slot", "image_index", "ar_flag", "written")}
    self.images: list[np.ndarray] = []

  def __len__(self) -> int:
    return len(self.columns["tokens"])

  def _append(self, tokens, image_slot, image_index, ar_flag, written):
    for key, values in (("tokens", tokens), ("image_slot", image_slot),
                        ("image_index", image_index), ("ar_flag", ar_flag), ("written", written)):
      self.columns[key].extend(int(v) for v in values)

  def add_image(self, pixels: np.ndarray) -> None:
    n = self.num_image_tokens
    ar = 0 if not self.images else 1
    self._append([0] * n, [len(self.images)] * n, range(n), [ar] * n, [0] * n)
    self.images.append(prepare_image(pixels, self.image_size))

  def add_text(self, tokens: Sequence[int], ar_flag: int, written: bool) -> None:
    n = len(tokens)
    self._append(tokens, [-1] * n, [0] * n, [ar_flag] * n, [int(written)] * n)

  def arrays(self) -> dict:
    """Unpadded int32 [n] features (see the module docstring) and the images."""
    cols = {k: np.asarray(v, np.int32) for k, v in self.columns.items()}
    n = len(self)
    written = cols.pop("written")
    cols["positions"] = np.arange(n, dtype=np.int32)
    cols["segment_ids"] = np.ones(n, np.int32)
    cols["targets"] = np.concatenate([cols["tokens"][1:], [0]]).astype(np.int32)
    cols["loss_mask"] = np.concatenate([written[1:], [0]]).astype(np.int32)
    return {**cols, "images": list(self.images)}


def build_row(task: env_lib.Task, segments: Sequence[env_lib.Segment], encode: Callable,
              num_image_tokens: int, image_size: int, eos_id: int = 1) -> ConversationRow:
  """The row of a conversation: first view, prompt, then `segments` (model turns end with EOS).

  A model segment's `tokens`, when set, are used as they are (the ids the model sampled); its text
  is encoded otherwise.
  """
  row = ConversationRow(num_image_tokens, image_size)
  row.add_image(task.overview)
  row.add_text(encode(prompt_text(task.question)), ar_flag=0, written=False)
  for seg in segments:
    if seg.kind == "image":
      row.add_image(seg.image)
    elif seg.kind == "env":
      row.add_text(encode(seg.text), ar_flag=1, written=False)
    elif seg.kind == "model":
      tokens = list(seg.tokens) if seg.tokens is not None else list(encode(seg.text)) + [eos_id]
      row.add_text(tokens, ar_flag=1, written=True)
    else:
      raise ValueError(f"unknown conversation segment kind {seg.kind!r}")
  return row


def pad_rows(rows: Sequence[dict], length: int, max_images: int, image_size: int) -> dict:
  """Stacks unpadded conversations (ConversationRow.arrays) into a batch of [B, length] rows."""
  batch = len(rows)
  out = {k: np.zeros((batch, length), np.int32) for k in ROW_KEYS}
  out["image_slot"][:] = -1
  out["images"] = np.zeros((batch, max_images, image_size, image_size, 3), np.float32)
  for b, row in enumerate(rows):
    n = row["tokens"].shape[0]
    if n > length:
      raise ValueError(f"conversation {b} has {n} tokens; rows hold {length}")
    if len(row["images"]) > max_images:
      raise ValueError(f"conversation {b} has {len(row['images'])} images; rows hold {max_images}")
    for key in ROW_KEYS:
      out[key][b, :n] = row[key]
    for i, image in enumerate(row["images"]):
      out["images"][b, i] = image
  return out


def _embed(module, images, tokens, image_slot, image_index):
  return module.embed_inputs(images, tokens, image_slot, image_index)


def _forward(module, images, tokens, image_slot, image_index, ar_flag, positions, segment_ids):
  x = _embed(module, images, tokens, image_slot, image_index)
  logits, _ = module.llm(x, positions, attention_lib.prefix_lm_mask(ar_flag, segment_ids))
  return logits


def make_apply_fn(model: nn.Module) -> Callable:
  """apply_fn(params, batch, rng) -> logits [B, L, V] for conversation rows (the apply_fn that
  train/steps.py's losses call)."""
  def apply_fn(params, batch, rng=None):
    missing = [k for k in MODEL_INPUTS if k not in batch]
    if missing:
      raise ValueError(f"conversation batch lacks {missing}; it has {sorted(batch)}")
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), method=_forward,
                       rngs=rngs)
  return apply_fn


def _prefill(module, images, tokens, image_slot, image_index, ar_flag, positions, segment_ids,
             cache_size):
  batch, length = tokens.shape
  x = _embed(module, images, tokens, image_slot, image_index)
  mask = attention_lib.prefix_lm_mask(ar_flag, segment_ids)
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, cache_size - length)))
  cache = gemma.init_cache(module.config.llm, batch, cache_size, module.config.dtype)
  # Conversation positions are 0..n-1, so they equal the slots; padding gets the later, distinct
  # slots too (with its own position 0 it would overwrite slot 0), masked out and overwritten as
  # tokens are generated.
  slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
  hidden, cache = module.llm(x, jnp.where(segment_ids > 0, positions, slots), mask, cache,
                             return_hidden=True)
  ends = jnp.sum(segment_ids > 0, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(hidden, jnp.maximum(ends - 1, 0)[:, None, None], axis=1)
  return module.llm.logits(last)[:, 0], {**cache, "end": ends}


def prefill(model: nn.Module, params, batch: Mapping[str, jax.Array], cache_size: int):
  """Runs whole conversations into a fresh KV cache of `cache_size` slots.

  Returns (logits [B, V] at each row's last token, cache with "end" = conversation lengths); the
  model's `VLM.extend` then continues each row at slot "end".
  """
  length = batch["tokens"].shape[1]
  if cache_size < length:
    raise ValueError(f"prefill: cache_size {cache_size} is smaller than the row length {length}")
  return model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), cache_size,
                     method=_prefill)


def log_probs_of(apply_fn: Callable, params, batch: Mapping[str, jax.Array]) -> jax.Array:
  """float32 [B, L]: log p(targets) under `params` (zero where loss_mask is 0)."""
  logits = apply_fn(params, batch, None).astype(jnp.float32)
  picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return (picked - jax.nn.logsumexp(logits, axis=-1)) * batch["loss_mask"]

