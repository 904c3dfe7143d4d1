"""Tests for vpd_jax.models: sizes, attention and masks, ViT, Gemma, and the VLM on packed rows."""

import os

# A mesh test below wants several devices; this only takes effect if jax is not initialised yet.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # pylint: disable=g-import-not-at-top
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax.models import attention
from vpd_jax.models import gemma
from vpd_jax.models import sizes
from vpd_jax.models import vlm

GEMMA2_OPTIONS = dict(sliding_window=6, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                      post_norms=True, query_pre_attn_scalar=24)
PARAM_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "vit_embed", "vit_mlp",
               "vit_heads", "patch", "vit_pos", None}


@functools.lru_cache(maxsize=None)
def _params(config):
  """Initialised parameters (boxed) of VLM(config), made once per config."""
  return jax.jit(functools.partial(vlm.init_params, vlm.VLM(config)))(jax.random.key(0))


def _shapes(config):
  return jax.eval_shape(functools.partial(vlm.init_params, vlm.VLM(config)), jax.random.key(0))


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree), sep="/")


# ----------------------------------------------------------------------------------------- sizes

PUBLISHED = {
    # name: (parameters, {parameter: shape}); shapes from the released checkpoints' configs.
    "paligemma-3b": (2_923_466_480, {
        "llm/embedder/input_embedding": (257_216, 2048),
        "llm/layers/attn/kv_einsum/w": (18, 2, 1, 2048, 256),
        "llm/layers/mlp/gating_einsum": (18, 2, 2048, 16_384),
        "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
        "img/pos_embedding": (1, 256, 1152), "img/head/kernel": (1152, 2048)}),
    "paligemma2-3b": (3_032_242_416, {
        "llm/layers/attn/q_einsum/w": (26, 8, 2304, 256),
        "llm/layers/attn/kv_einsum/w": (26, 2, 4, 2304, 256),
        "llm/layers/post_ffw_norm/scale": (26, 2304), "img/head/kernel": (1152, 2304)}),
    "paligemma2-10b": (9_662_638_832, {
        "llm/layers/attn/q_einsum/w": (42, 16, 3584, 256),
        "llm/layers/mlp/gating_einsum": (42, 2, 3584, 14_336),
        "llm/embedder/input_embedding": (257_216, 3584)}),
}


@pytest.mark.parametrize("name", sorted(sizes.SIZES))
def test_every_size_has_consistent_shapes_without_allocating(name):
  config = sizes.get_size(name)
  model = vlm.VLM(config)
  shapes = _shapes(config)
  for path, leaf in flax.traverse_util.flatten_dict(shapes, sep="/").items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= PARAM_NAMES, (path, leaf.names)
  batch = vlm.example_inputs(config, batch_size=2)
  logits = jax.eval_shape(model.apply, {"params": shapes}, **batch)
  length = config.num_image_tokens + 8
  assert logits.shape == (2, length, config.llm.vocab_size) and logits.dtype == jnp.float32
  if name in PUBLISHED:
    count, expected = PUBLISHED[name]
    flat = _flat(shapes)
    assert {k: flat[k].shape for k in expected} == expected
    assert vlm.count_params(shapes) == count
    assert config.num_image_tokens == 256


def test_small_size_fits_a_cpu_demo():
  assert 20e6 <= vlm.count_params(_shapes(sizes.get_size("small"))) <= 30e6


def test_get_size_overrides_and_errors():
  config = sizes.get_size("tiny", vocab_size=1300, vit_width=32, llm_depth=3, remat="full",
                          image_size=64)
  assert (config.llm.vocab_size, config.vit.width, config.llm.depth, config.remat) == (
      1300, 32, 3, "full")
  assert config.num_image_tokens == 64
  with pytest.raises(ValueError, match="unknown model size 'huge'.*tiny"):
    sizes.get_size("huge")
  with pytest.raises(ValueError, match="unknown model size override 'colour'"):
    sizes.get_size("tiny", colour=1)
  with pytest.raises(ValueError, match="'width' is ambiguous.*vit_width or llm_width"):
    sizes.get_size("tiny", width=8)
  with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
    sizes.get_size("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="remat must be one of"):
    sizes.get_size("tiny", remat="sometimes")


# ------------------------------------------------------------------------------ attention, masks

def _numpy_mask(ar_flag, segment_ids):
  """Prefix-LM + segment mask by its definition, one (query, key) pair at a time."""
  batch, length = ar_flag.shape
  mask = np.zeros((batch, length, length), bool)
  for b in range(batch):
    for q in range(length):
      for k in range(length):
        same = segment_ids[b, q] > 0 and segment_ids[b, q] == segment_ids[b, k]
        # Keys before the query, or any key of a bidirectional run with no ar token in between.
        visible = k <= q or not ar_flag[b, q + 1:k + 1].any()
        mask[b, q, k] = same and visible
  return mask


def _random_rows(rng, batch, length):
  segment_ids = np.sort(rng.integers(0, 4, (batch, length)), axis=1)
  ar_flag = rng.integers(0, 2, (batch, length))
  return ar_flag.astype(np.int32), segment_ids.astype(np.int32)


def test_prefix_lm_mask_matches_definition_and_the_data_layer():
  from vpd_jax.data import features  # pylint: disable=g-import-not-at-top
  ar_flag, segment_ids = _random_rows(np.random.default_rng(0), 3, 13)
  expected = _numpy_mask(ar_flag, segment_ids)
  np.testing.assert_array_equal(attention.prefix_lm_mask(ar_flag, segment_ids), expected)
  np.testing.assert_array_equal(features.make_attention_mask(ar_flag, segment_ids), expected)


def _numpy_attention(q, k, v, mask, softcap, scale):
  batch, q_len, heads, _ = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      logits = q[b, :, h] @ k[b, :, h // group].T * scale
      if softcap:
        logits = softcap * np.tanh(logits / softcap)
      probs = np.where(mask[b], np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
      out[b, :, h] = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-30) @ v[b, :, h // group]
  return out


@pytest.mark.parametrize("heads,kv_heads,softcap", [(4, 4, None), (6, 2, 5.0), (4, 1, 2.0)])
def test_attention_matches_numpy_reference(heads, kv_heads, softcap):
  rng = np.random.default_rng(heads + kv_heads)
  batch, length, dim = 2, 11, 8
  ar_flag, segment_ids = _random_rows(rng, batch, length)
  mask = _numpy_mask(ar_flag, segment_ids)
  q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
  k, v = (rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32) for _ in range(2))
  got = attention.attention(q, k, v, jnp.asarray(mask), impl="auto", softcap=softcap, scale=0.7)
  expected = _numpy_attention(q, k, v, mask, softcap, 0.7)
  rows = mask.any(-1)  # queries with no visible key are padding
  np.testing.assert_allclose(np.asarray(got)[rows], expected[rows], atol=1e-5)


def _autodiff_attention(q, k, v, mask, softcap, scale):
  """Dense attention in the [B, T, K, G, D] layout, differentiated by JAX (the dense path's
  written-out backward pass is checked against this)."""
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k) * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None, None], logits, -2.3819763e38)
  out = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(logits, axis=-1), v)
  return out.reshape(batch, length, heads, dim)


@pytest.mark.parametrize("heads,kv_heads,softcap", [(4, 4, None), (6, 2, 5.0), (4, 1, None)])
def test_dense_attention_gradients_match_autodiff(heads, kv_heads, softcap):
  rng = np.random.default_rng(10 + heads + kv_heads)
  batch, length, dim = 2, 11, 8
  ar_flag, segment_ids = _random_rows(rng, batch, length)
  segment_ids[:, :2] = 0  # padding queries that see no key at all
  mask = jnp.asarray(_numpy_mask(ar_flag, segment_ids))
  q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
  k, v = (rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32) for _ in range(2))
  weights = rng.normal(size=q.shape).astype(np.float32)

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  got = grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, softcap=softcap,
                                                              scale=0.6))
  expected = grads(lambda q, k, v: _autodiff_attention(q, k, v, mask, softcap, 0.6))
  for name, g, e in zip("qkv", got, expected):
    assert g.shape == e.shape, name
    np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")
  assert float(jnp.abs(got[0]).max()) > 0.1  # the check is not between two zero gradients
  # bfloat16 inputs get bfloat16 gradients close to the float32 ones.
  low = grads(lambda q, k, v: attention.dot_product_attention(
      q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask,
      softcap=softcap, scale=0.6).astype(jnp.float32))
  for g, e in zip(low, expected):
    np.testing.assert_allclose(g, e, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("approximate", [True, False])
def test_geglu_gradients_match_autodiff(approximate):
  rng = np.random.default_rng(3)
  gate, up, weights = (rng.normal(scale=2.0, size=(7, 13)).astype(np.float32) for _ in range(3))
  plain = lambda g, u: nn.gelu(g, approximate=approximate) * u
  np.testing.assert_allclose(gemma.geglu(gate, up, approximate), plain(gate, up), atol=1e-6)
  got = jax.grad(lambda g, u: jnp.sum(gemma.geglu(g, u, approximate) * weights), (0, 1))(gate, up)
  expected = jax.grad(lambda g, u: jnp.sum(plain(g, u) * weights), (0, 1))(gate, up)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_norms_match_their_definitions_and_autodiff():
  from vpd_jax.models import norms  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x, weights = (rng.normal(loc=0.5, scale=2.0, size=(3, 5, 16)).astype(np.float32)
                for _ in range(2))
  scale, bias = (rng.normal(size=16).astype(np.float32) for _ in range(2))

  def plain_rms(x, scale):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)

  def plain_ln(x, scale, bias):
    centred = x - jnp.mean(x, -1, keepdims=True)
    return centred / jnp.sqrt(jnp.mean(centred ** 2, -1, keepdims=True) + 1e-6) * scale + bias

  flax_ln = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  np.testing.assert_allclose(norms.layer_norm(x, scale, bias, 1e-6), flax_ln.apply(
      {"params": {"scale": scale, "bias": bias}}, x), atol=1e-5)
  cases = [(lambda x, s: norms.rms_norm(x, s, 1e-6), plain_rms, (x, scale)),
           (lambda x, s, b: norms.layer_norm(x, s, b, 1e-6), plain_ln, (x, scale, bias))]
  for ours, plain, args in cases:
    np.testing.assert_allclose(ours(*args), plain(*args), atol=1e-5)
    argnums = tuple(range(len(args)))
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), argnums)(*args)
    expected = jax.grad(lambda *a: jnp.sum(plain(*a) * weights), argnums)(*args)
    for g, e in zip(got, expected):
      assert g.shape == e.shape
      np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5)
  # bfloat16 inputs keep their dtype, forward and backward.
  low = x.astype(jnp.bfloat16)
  d_low = jax.grad(lambda v: jnp.sum(norms.rms_norm(v, scale, 1e-6).astype(jnp.float32)))(low)
  assert norms.rms_norm(low, scale, 1e-6).dtype == d_low.dtype == jnp.bfloat16


def test_attention_impl_switch():
  assert attention.resolve_impl("auto") == attention.resolve_impl("xla") == "xla"
  assert attention.resolve_impl("pallas") == "pallas"
  with pytest.raises(ValueError, match="unknown attention_impl 'cuda'"):
    attention.resolve_impl("cuda")
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    sizes.get_size("tiny", attention_impl="flash")


def test_sliding_window_mask_keeps_the_window_and_the_prefix_block():
  ar_flag, segment_ids = _random_rows(np.random.default_rng(3), 2, 17)
  positions = np.broadcast_to(np.arange(17), (2, 17))
  mask = _numpy_mask(ar_flag, segment_ids)
  got = attention.sliding_window_mask(jnp.asarray(mask), positions, positions, 3,
                                      attention.mutual_pairs(jnp.asarray(mask)))
  # Hugging Face's rule: (causal AND q - k < window) OR (q, k in the same bidirectional block).
  near = np.abs(positions[:, :, None] - positions[:, None, :]) < 3
  expected = mask & (near | np.swapaxes(mask, 1, 2))
  np.testing.assert_array_equal(got, expected)
  assert (np.asarray(got) != mask).any()


def test_gemma_local_layers_see_only_the_window_and_global_layers_see_everything():
  length, window = 12, 3
  positions = jnp.arange(length)[None]
  # Five prefix tokens (bidirectional) then causal tokens.
  mask = attention.prefix_lm_mask(jnp.array([[0] * 5 + [1] * 7]), jnp.ones((1, length), int))
  x = jax.random.normal(jax.random.key(0), (1, length, 16))

  models = {}
  for depth in (1, 2):
    config = sizes.GemmaConfig(vocab_size=8, width=16, depth=depth, mlp_dim=32, num_heads=2,
                               num_kv_heads=1, head_dim=8, sliding_window=window)
    model = gemma.Gemma(config)
    models[depth] = (jax.jit(functools.partial(model.apply, return_hidden=True)),
                     model.init(jax.random.key(1), x, positions, mask))

  def changed(depth, source, target):
    apply, params = models[depth]
    before = apply(params, x, positions, mask)[0][0, target]
    after = apply(params, x.at[0, source].add(1.0), positions, mask)[0][0, target]
    return not np.allclose(before, after, atol=1e-6)

  # One layer: layer 0 is local. A causal query at 11 sees 9..11 only.
  assert changed(1, 9, 11) and not changed(1, 8, 11)
  # Prefix tokens see each other across the window.
  assert changed(1, 0, 4)
  # Two layers: layer 1 is global and sees position 8 directly.
  assert changed(2, 8, 11)


def test_rope_follows_the_rotate_half_convention():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 7, 30]])
  inv_freq = 1.0 / (10_000 ** (np.arange(0, 8, 2) / 8))
  angles = np.concatenate([positions[..., None] * inv_freq] * 2, axis=-1)[:, :, None, :]
  rotated = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
  expected = x * np.cos(angles) + rotated * np.sin(angles)
  np.testing.assert_allclose(gemma.apply_rope(x, positions, 10_000.0), expected, atol=1e-5)


def test_rope_gradient_matches_autodiff():
  rng = np.random.default_rng(1)
  x, weights = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(2))
  positions = jnp.asarray(rng.integers(0, 50, (2, 5)))

  def plain(x):
    inv_freq = 1.0 / (10_000 ** (jnp.arange(0, 8, 2) / 8))
    angles = jnp.concatenate([positions[..., None] * inv_freq] * 2, axis=-1)[:, :, None, :]
    rotated = jnp.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)

  got = jax.grad(lambda x: jnp.sum(gemma.apply_rope(x, positions, 10_000.0) * weights))(x)
  expected = jax.grad(lambda x: jnp.sum(plain(x) * weights))(x)
  np.testing.assert_allclose(got, expected, atol=1e-5)


# --------------------------------------------------------------------------------------- the VLM

def _example(rng, config, prefix, suffix):
  n = config.num_image_tokens
  text = rng.integers(3, config.llm.vocab_size, prefix + suffix)
  return {"image": rng.uniform(-1, 1, (config.vit.image_size,) * 2 + (3,)).astype(np.float32),
          "tokens": np.concatenate([np.zeros(n, np.int32), text]),
          "ar_flag": np.array([0] * (n + prefix) + [1] * suffix, np.int32), "image_tokens": n}


def _rows(examples, length, slots):
  """Feature-converter rows: `examples` packed in order into one row; example i uses image slot
  slots[i]."""
  num = max(slots) + 1
  size = examples[0]["image"].shape[0]
  row = {k: np.zeros((1, length), np.int32) for k in vlm.ROW_FEATURES}
  row["image_slot"][:] = -1
  images = np.zeros((1, num, size, size, 3), np.float32)
  offset = 0
  for i, (ex, slot) in enumerate(zip(examples, slots)):
    n = len(ex["tokens"])
    span = slice(offset, offset + n)
    row["tokens"][0, span] = ex["tokens"]
    row["ar_flag"][0, span] = ex["ar_flag"]
    row["positions"][0, span] = np.arange(n)
    row["segment_ids"][0, span] = i + 1
    row["image_slot"][0, span] = np.where(np.arange(n) < ex["image_tokens"], slot, -1)
    images[0, slot] = ex["image"]
    offset += n
  return {"images": images, **row}


@pytest.mark.parametrize("options", [{}, GEMMA2_OPTIONS], ids=["gemma", "gemma2"])
def test_packed_row_gives_each_example_its_unpacked_logits(options):
  config = sizes.get_size("tiny", **options)
  params = _params(config)
  apply = jax.jit(vlm.VLM(config).apply)
  rng = np.random.default_rng(0)
  examples = [_example(rng, config, 3, 4), _example(rng, config, 0, 6), _example(rng, config, 5, 2)]
  # Slots out of order: the gather must follow image_slot, not the example's rank in the row.
  packed = _rows(examples, 80, slots=[2, 0, 1])
  packed_logits = np.asarray(apply({"params": params}, **packed))
  offset = 0
  for ex in examples:
    n = len(ex["tokens"])
    alone = np.asarray(apply({"params": params}, **_rows([ex], n + 5, slots=[0])))
    np.testing.assert_allclose(packed_logits[0, offset:offset + n], alone[0, :n], atol=2e-5)
    offset += n
  # The comparison is sensitive: a row whose examples share a segment, or whose image slots are
  # swapped, gives the last example other logits.
  first = len(examples[0]["tokens"])
  leaky = dict(packed, segment_ids=np.where(packed["segment_ids"] > 0, 1, 0).astype(np.int32))
  swapped = dict(packed, images=packed["images"][:, [1, 0, 2]])
  for variant in (leaky, swapped):
    logits = np.asarray(apply({"params": params}, **variant))
    assert not np.allclose(logits[0, first:offset], packed_logits[0, first:offset], atol=1e-3)


def _loss(params, model, batch, targets, loss_mask):
  logits = model.apply({"params": params}, **batch)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * loss_mask) / jnp.sum(loss_mask)


def test_remat_policies_give_the_same_loss_and_gradients():
  config = sizes.get_size("tiny")
  params = flax.core.meta.unbox(_params(config))
  rng = np.random.default_rng(1)
  examples = [_example(rng, config, 2, 5), _example(rng, config, 4, 3)]
  batch = _rows(examples, 50, slots=[0, 1])
  targets = np.roll(batch["tokens"], -1, axis=1)
  loss_mask = (np.roll(batch["ar_flag"], -1, axis=1) == 1).astype(np.float32)
  results = {}
  for remat in sizes.REMAT_POLICIES:
    model = vlm.VLM(dataclasses.replace(config, remat=remat))
    results[remat] = jax.jit(jax.value_and_grad(_loss), static_argnums=1)(
        params, model, batch, targets, loss_mask)
  reference_loss, reference_grads = results["none"]
  assert np.isfinite(reference_loss) and reference_loss > 0
  for remat in ("full", "save_dots"):
    loss, grads = results[remat]
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads, reference_grads)


def test_unrolled_layer_scans_give_the_same_loss_and_gradients():
  config = sizes.get_size("tiny")
  params = flax.core.meta.unbox(_params(config))
  examples = [_example(np.random.default_rng(4), config, 3, 4)]
  batch = _rows(examples, 30, slots=[0])
  targets = np.roll(batch["tokens"], -1, axis=1)
  loss_mask = (np.roll(batch["ar_flag"], -1, axis=1) == 1).astype(np.float32)
  rolled, unrolled = (
      jax.jit(jax.value_and_grad(_loss), static_argnums=1)(
          params, vlm.VLM(dataclasses.replace(config, scan_unroll=unroll)), batch, targets,
          loss_mask)
      for unroll in (False, True))
  np.testing.assert_allclose(unrolled[0], rolled[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               unrolled[1], rolled[1])


def test_bfloat16_compute_stays_close_to_float32():
  config = sizes.get_size("tiny")
  params = _params(config)
  batch = _rows([_example(np.random.default_rng(2), config, 3, 3)], 24, slots=[0])
  full = jax.jit(vlm.VLM(config).apply)({"params": params}, **batch)
  half = jax.jit(vlm.VLM(dataclasses.replace(config, dtype="bfloat16")).apply)(
      {"params": params}, **batch)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.1)
  bf16_params = _shapes(dataclasses.replace(config, param_dtype="bfloat16"))
  leaves = jax.tree.leaves(bf16_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert {leaf.value.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_activation_constraints_compile_on_a_mesh():
  devices = jax.device_count()
  mesh = jax.make_mesh((1, devices, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vit_embed", "fsdp"),
           ("mlp", "tensor"), ("vit_mlp", "tensor"), ("heads", "tensor"), ("vit_heads", "tensor"),
           ("kv_heads", "tensor"), ("vocab", "tensor"))
  config = sizes.get_size("tiny")
  model = vlm.VLM(config)
  batch = vlm.example_inputs(config, batch_size=devices)
  # Initialisation and the forward pass both run with the mesh and rules in force, as in training.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(functools.partial(vlm.init_params, model))(jax.random.key(0))
    logits = jax.jit(model.apply)({"params": params}, **batch)
  assert logits.shape == (devices, config.num_image_tokens + 8, config.llm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()


def test_input_shape_errors_name_the_inputs():
  config = sizes.get_size("tiny")
  model = vlm.VLM(config)
  batch = vlm.example_inputs(config)
  with pytest.raises(ValueError, match="row features must all be"):
    model.apply({"params": _params(config)}, **dict(batch, positions=batch["positions"][:, :-1]))
  with pytest.raises(ValueError, match=r"ViT: images must be \[N, 32, 32, 3\]"):
    model.apply({"params": _params(config)}, **dict(batch, images=np.zeros((1, 1, 16, 16, 3))))
