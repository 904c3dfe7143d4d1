"""Model sizes: the ViT, Gemma and VLM configs, and a registry of named sizes.

  get_size("tiny")                                   tests: 0.4M parameters, milliseconds on CPU
  get_size("small")                                  CPU demo: 24M parameters, 112px images
  get_size("paligemma-3b")                           SigLIP So400m/14 + Gemma 2B (PaliGemma 1)
  get_size("paligemma2-3b"), get_size("paligemma2-10b")   SigLIP So400m/14 + Gemma 2 2B / 9B
  get_size("paligemma-3b", image_size=448, remat="full", dtype="bfloat16")

`get_size(name, **overrides)` takes any field of `VLMConfig` (dtype, param_dtype, attention_impl,
remat), of `VitConfig` or of `GemmaConfig`. A field name both towers have (width, depth, mlp_dim,
num_heads) must carry the tower's prefix: `vit_width=...`, `llm_depth=...`; any field may carry it.

The published sizes follow the released checkpoints' configs (big_vision's `So400m/14` and Gemma
variants, Hugging Face's google/paligemma-3b-pt-224 and google/paligemma2-{3b,10b}-pt-224). All
use a 257,216-row embedding: Gemma's 256,000 tokens, 1,024 location and 128 segmentation tokens,
and 64 rows of padding.
"""

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "pallas", "auto")
REMAT_POLICIES = ("none", "full", "save_dots")
HIDDEN_ACTS = ("gelu_tanh", "gelu")


def _check_positive(owner: str, **values) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """A SigLIP-style ViT: patch embedding, learned positions, pre-LN blocks, final LayerNorm."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int

  def __post_init__(self):
    _check_positive("VitConfig", image_size=self.image_size, patch_size=self.patch_size,
                    width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                    num_heads=self.num_heads)
    if self.image_size % self.patch_size:
      raise ValueError(f"VitConfig: image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"VitConfig: width {self.width} is not a multiple of num_heads "
                       f"{self.num_heads}")

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """A Gemma (1 or 2) decoder.

  Gemma 2 options: `attn_logit_softcap`, `final_logit_softcap` (tanh soft-capping), `sliding_window`
  (even layers 0, 2, ... attend locally, odd layers globally), `post_norms` (RMSNorm on the
  attention and feed-forward outputs too) and `query_pre_attn_scalar` (queries are scaled by its
  inverse square root; None means head_dim).
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  final_logit_softcap: Optional[float] = None
  attn_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None
  post_norms: bool = False
  query_pre_attn_scalar: Optional[float] = None
  hidden_act: str = "gelu_tanh"
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    _check_positive("GemmaConfig", vocab_size=self.vocab_size, width=self.width,
                    depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"GemmaConfig: num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"GemmaConfig: head_dim {self.head_dim} must be even for RoPE")
    if self.sliding_window is not None:
      _check_positive("GemmaConfig", sliding_window=self.sliding_window)
    for name in ("final_logit_softcap", "attn_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"GemmaConfig.{name} must be positive or None, got {value!r}")
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"GemmaConfig.hidden_act must be one of {HIDDEN_ACTS}, got "
                       f"{self.hidden_act!r}")

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """ViT -> linear projection -> Gemma, plus the numerics and memory settings of the whole model."""
  vit: VitConfig
  llm: GemmaConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  # Flash-attention block sizes (queries, keys) for attention_impl "pallas"/"auto"; None picks
  # the backend's default (kernels.flash_attention.DEFAULT_BLOCKS). Multiples of 8.
  flash_block_q: Optional[int] = None
  flash_block_k: Optional[int] = None
  remat: str = "none"
  # Unroll the layer scans (same parameters and numerics): on CPU the rolled loop spends time
  # zero-filling its carry buffers; unrolling trades compile time for step time.
  scan_unroll: bool = False

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        jnp.dtype(value)
      except TypeError:
        raise ValueError(f"VLMConfig.{name}: {value!r} is not a dtype name") from None
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"VLMConfig.attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"VLMConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name in ("flash_block_q", "flash_block_k"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
        raise ValueError(f"VLMConfig.{name} must be None or a positive multiple of 8, got "
                         f"{value!r}")

  @property
  def num_image_tokens(self) -> int:
    return self.vit.num_tokens


def remat_block(block_cls, remat: str):
  """`block_cls` rematerialised as VLMConfig.remat names: none, full (recompute everything in the
  backward pass) or save_dots (keep the weight matmuls, recompute attention and elementwise ops)."""
  if remat == "none":
    return block_cls
  if remat == "full":
    policy = None
  elif remat == "save_dots":
    policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  else:
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
  # Blocks run under nn.scan, where common-subexpression elimination cannot undo the remat.
  return nn.remat(block_cls, policy=policy, prevent_cse=False)


SIZES: dict[str, Callable[[], VLMConfig]] = {}


def register(name: str):
  """Decorator: adds a function returning a VLMConfig to SIZES under `name`."""
  def wrap(fn):
    if name in SIZES:
      raise ValueError(f"model size {name!r} is registered twice")
    SIZES[name] = fn
    return fn
  return wrap


_SO400M_14 = dict(patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16)
_PALIGEMMA_VOCAB = 257_216


@register("tiny")
def _tiny() -> VLMConfig:
  # Grouped-query attention (4 heads over 2 kv heads) so that the tests exercise it. The vocabulary
  # holds any trained ShapesVQA vocabulary (at most 4,000 pieces by default).
  return VLMConfig(
      vit=VitConfig(image_size=32, patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4),
      llm=GemmaConfig(vocab_size=4096, width=64, depth=2, mlp_dim=128, num_heads=4,
                      num_kv_heads=2, head_dim=16))


@register("small")
def _small() -> VLMConfig:
  return VLMConfig(
      vit=VitConfig(image_size=112, patch_size=14, width=256, depth=6, mlp_dim=1024, num_heads=4),
      llm=GemmaConfig(vocab_size=4096, width=384, depth=8, mlp_dim=1536, num_heads=6,
                      num_kv_heads=2, head_dim=64))


@register("paligemma-3b")
def _paligemma_3b() -> VLMConfig:
  return VLMConfig(
      vit=VitConfig(image_size=224, **_SO400M_14),
      llm=GemmaConfig(vocab_size=_PALIGEMMA_VOCAB, width=2048, depth=18, mlp_dim=16_384,
                      num_heads=8, num_kv_heads=1, head_dim=256))


def _gemma2(**kw) -> GemmaConfig:
  return GemmaConfig(vocab_size=_PALIGEMMA_VOCAB, head_dim=256, final_logit_softcap=30.0,
                     attn_logit_softcap=50.0, sliding_window=4096, post_norms=True,
                     query_pre_attn_scalar=256, **kw)


@register("paligemma2-3b")
def _paligemma2_3b() -> VLMConfig:
  return VLMConfig(vit=VitConfig(image_size=224, **_SO400M_14),
                   llm=_gemma2(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4))


@register("paligemma2-10b")
def _paligemma2_10b() -> VLMConfig:
  return VLMConfig(vit=VitConfig(image_size=224, **_SO400M_14),
                   llm=_gemma2(width=3584, depth=42, mlp_dim=14_336, num_heads=16,
                               num_kv_heads=8))


def get_size(name: str, **overrides) -> VLMConfig:
  """The registered size `name`, with `overrides` applied (see the module docstring)."""
  if name not in SIZES:
    raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(sorted(SIZES))}")
  config = SIZES[name]()
  top, towers = {}, {"vit": {}, "llm": {}}
  fields = {"vit": _field_names(VitConfig), "llm": _field_names(GemmaConfig)}
  top_fields = _field_names(VLMConfig) - {"vit", "llm"}
  for key, value in overrides.items():
    if key in top_fields:
      top[key] = value
      continue
    tower, field = _tower_field(key, fields)
    if tower is None:
      owners = [t for t in fields if key in fields[t]]
      if len(owners) > 1:
        raise ValueError(f"model size override {key!r} is ambiguous: both towers have it; "
                         f"write vit_{key} or llm_{key}")
      raise ValueError(
          f"unknown model size override {key!r}; known keys: {', '.join(sorted(top_fields))}, "
          f"vit_* / llm_* fields, or unprefixed {', '.join(sorted(_unique_fields(fields)))}")
    towers[tower][field] = value
  return dataclasses.replace(
      config, vit=dataclasses.replace(config.vit, **towers["vit"]),
      llm=dataclasses.replace(config.llm, **towers["llm"]), **top)


# The keys of a training config's `model` section (configs/vpd_sft.py) that are VLMConfig fields.
_MODEL_SECTION_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "scan_unroll",
                         "flash_block_q", "flash_block_k")


def from_model_section(model) -> VLMConfig:
  """The VLMConfig a training config's `model` section names: its `size` with the section's
  numerics, memory and attention settings applied (keys the section lacks keep their defaults)."""
  return get_size(model["size"], **{k: model[k] for k in _MODEL_SECTION_FIELDS if k in model})


def _field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _unique_fields(fields: dict[str, set[str]]) -> set[str]:
  return fields["vit"] ^ fields["llm"]


def _tower_field(key: str, fields: dict[str, set[str]]):
  """(tower, field) that override `key` names, or (None, None)."""
  for tower in fields:
    prefix = tower + "_"
    if key.startswith(prefix) and key[len(prefix):] in fields[tower]:
      return tower, key[len(prefix):]
  if key in _unique_fields(fields):
    return ("vit" if key in fields["vit"] else "llm"), key
  return None, None
