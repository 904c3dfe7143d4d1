"""Tests for vpd_jax/kernels/flash_attention.py: outputs and gradients against the dense reference
(kernels/reference.py) in Pallas interpret mode, block skipping, the model switch and sharding."""

import os

# Eight fake CPU devices for the sharded step; must be set before jax initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax import sharding as sh
from vpd_jax.kernels import flash_attention as fa
from vpd_jax.kernels import reference
from vpd_jax.models import attention
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib
from vpd_jax.train import steps


def _packed_rows(rng, batch, length, segments, pad):
  """(segment_ids, ar_flag, positions) [B, T]: `segments` prefix-LM examples per row, each a
  random-length bidirectional prefix then a causal suffix, then `pad` padding tokens."""
  seg = np.zeros((batch, length), np.int32)
  ar = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  used = length - pad
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(4, used - 3), segments - 1, replace=False))
    bounds = [0, *cuts, used]
    for s in range(segments):
      start, end = bounds[s], bounds[s + 1]
      seg[b, start:end] = s + 1
      prefix = int(rng.integers(1, end - start))
      ar[b, start + prefix:end] = 1
      pos[b, start:end] = np.arange(end - start)
  return seg, ar, pos


def _qkv(rng, batch, length, heads, kv_heads, head_dim, dtype):
  make = lambda h: jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), dtype)
  return make(heads), make(kv_heads), make(kv_heads)


# name: (length, heads, kv_heads, mask kind, dtype, block_q, block_k, extra kwargs)
CASES = {
    "causal_gqa": (64, 4, 2, "causal", jnp.float32, 16, 32, {}),
    "prefix_lm_padding_odd_length_mqa": (50, 4, 1, "prefix", jnp.float32, 16, 16, {}),
    "packed_3_segments_gqa": (96, 4, 2, "packed", jnp.float32, 32, 16, {}),
    "packed_bf16": (64, 4, 2, "packed", jnp.bfloat16, 16, 16, {}),
    "packed_softcap_window_odd_length": (75, 2, 1, "packed", jnp.float32, 16, 32,
                                         {"softcap": 3.0, "window": 5}),
    "bidirectional_scaled": (24, 2, 2, "full", jnp.float32, 16, 16, {"scale": 0.3}),
}


def _mask_inputs(kind, rng, batch, length):
  if kind == "causal":
    ones = np.ones((batch, length), np.int32)
    return {"segment_ids": ones, "ar_flag": ones, "positions": None}, {}
  if kind == "full":
    ones = np.ones((batch, length), np.int32)
    return {"segment_ids": ones, "ar_flag": 0 * ones, "positions": None}, {"causal": False}
  segments, pad = (1, 9) if kind == "prefix" else (3, 7)
  seg, ar, pos = _packed_rows(rng, batch, length, segments, pad)
  return {"segment_ids": seg, "ar_flag": ar, "positions": pos}, {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_dense_reference_outputs_and_gradients(case):
  length, heads, kv_heads, kind, dtype, block_q, block_k, extra = CASES[case]
  rng = np.random.default_rng(sorted(CASES).index(case))
  batch, head_dim = 2, 16
  q, k, v = _qkv(rng, batch, length, heads, kv_heads, head_dim, dtype)
  tokens, kernel_only = _mask_inputs(kind, rng, batch, length)
  positions = tokens["positions"]
  if positions is None:
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def kernel(q, k, v):
    kw = {name: value for name, value in tokens.items() if name != "positions" or
          value is not None}
    return fa.flash_attention(q, k, v, block_q=block_q, block_k=block_k, **kw, **kernel_only,
                              **extra)

  def dense(q, k, v):
    return reference.attention(q, k, v, tokens["segment_ids"], tokens["ar_flag"], positions,
                               **extra)

  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * d_out)
  got, got_grads = jax.jit(lambda *a: (kernel(*a), jax.grad(loss(kernel), (0, 1, 2))(*a)))(q, k, v)
  # The reference sees the inputs as rounded to `dtype`, in float32.
  as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = dense(*as_f32)
  want_grads = jax.grad(loss(dense), (0, 1, 2))(*as_f32)
  assert got.shape == q.shape and got.dtype == dtype
  tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, **tol)
  for name, g, w, x in zip("qkv", got_grads, want_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    scale = max(1.0, float(jnp.max(jnp.abs(w))))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w) / scale, **tol,
                               err_msg=f"d{name}")
  if kind in ("prefix", "packed"):
    # Padding queries see nothing: zero output, and they contribute no gradient.
    padding = tokens["segment_ids"] == 0
    assert np.all(np.asarray(got, np.float32)[padding] == 0)
    assert np.all(np.asarray(got_grads[0], np.float32)[padding] == 0)


def test_blocks_the_mask_empties_are_skipped_not_computed():
  """Keys and values of padding blocks are NaN: touching them at all (even to zero the result)
  would turn outputs and gradients NaN, so finite results show those blocks never ran."""
  rng = np.random.default_rng(0)
  batch, length, used = 2, 64, 32
  q, k, v = _qkv(rng, batch, length, 2, 1, 16, jnp.float32)
  seg, ar, _ = _packed_rows(rng, batch, length, 2, length - used)
  k = k.at[:, used:].set(jnp.nan)
  v = v.at[:, used:].set(jnp.nan)
  run = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, ar_flag=ar, block_q=16,
                                           block_k=16)
  out, grads = jax.jit(lambda *a: (run(*a), jax.grad(lambda *b: jnp.sum(run(*b)), (0, 1, 2))(*a))
                       )(q, k, v)
  want = reference.attention(q[:, :used], k[:, :used], v[:, :used], seg[:, :used], ar[:, :used])
  np.testing.assert_allclose(out[:, :used], want, atol=2e-5)
  assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g[:, :used])) for g in grads)
  # The same rows with one block size spanning real and NaN keys do read them: NaN appears, so
  # the check above can fail.
  wide = fa.flash_attention(q, k, v, segment_ids=seg, ar_flag=ar, block_q=16, block_k=64)
  assert np.isnan(np.asarray(wide)).any()


def test_loops_cover_exactly_the_live_block_ranges():
  # Blocks of 2 tokens: [example 1 prefix], [example 1 suffix], [example 2], [padding].
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 0, 0]])
  cum = jnp.cumsum(jnp.array([[0, 0, 1, 1, 0, 1, 0, 0]]), axis=1)
  key_ranges, query_ranges = fa.live_block_ranges(seg, cum, 2, 2)
  # Per query block, the key blocks it loops over; per key block, the query blocks.
  np.testing.assert_array_equal(key_ranges[0], [[0, 1], [0, 2], [2, 3], [0, 0]])
  np.testing.assert_array_equal(query_ranges[0], [[0, 2], [1, 2], [2, 3], [0, 0]])


def test_bad_inputs_raise_clear_errors():
  q = jnp.zeros((1, 16, 4, 8))
  k = jnp.zeros((1, 16, 3, 8))
  with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 kv heads"):
    fa.flash_attention(q, k, k)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 15\), expected \(1, 16\)"):
    fa.flash_attention(q, q, q, segment_ids=jnp.ones((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="block_q must be a positive multiple of 8, got 12"):
    fa.flash_attention(q, q, q, block_q=12)
  with pytest.raises(ValueError, match="window must be a positive integer"):
    fa.flash_attention(q, q, q, window=0)
  with pytest.raises(ValueError, match="VLMConfig.flash_block_k must be None or a positive "
                                       "multiple of 8"):
    sizes.get_size("tiny", flash_block_k=20)


def test_kernels_lower_for_gpu_through_triton():
  """The same kernels, forward and backward, lower for CUDA (Pallas -> Triton) on this host."""
  q = jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((2, 200), jnp.int32)
  run = lambda q, k, v, s, a: fa.flash_attention(q, k, v, segment_ids=s, ar_flag=a, softcap=50.0,
                                                 backend="gpu")
  grad = jax.grad(lambda *a: jnp.sum(run(*a).astype(jnp.float32)), (0, 1, 2))
  text = jax.jit(grad).trace(q, k, k, row, row).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward (recomputed by the VJP), dK/dV, dQ


def test_auto_picks_the_kernel_on_accelerators_for_long_rows_only():
  assert attention.resolve_impl("auto", 4096, "gpu") == "pallas"
  assert attention.resolve_impl("auto", 128, "tpu") == "pallas"
  assert attention.resolve_impl("auto", 127, "gpu") == "xla"
  assert attention.resolve_impl("auto", 1, "tpu") == "xla"  # single-token decoding
  assert attention.resolve_impl("auto", 4096, "cpu") == "xla"
  assert attention.resolve_impl("pallas", 1, "cpu") == "pallas"
  with pytest.raises(ValueError, match="unknown attention_impl 'cuda'"):
    attention.resolve_impl("cuda")


def _tiny_batch(config, batch_size, seed):
  return steps.synthetic_batch(config.num_image_tokens, config.vit.image_size,
                               config.llm.vocab_size, batch_size, seed, examples_per_row=3)


@pytest.mark.slow
def test_vlm_logits_with_the_kernel_match_the_dense_path_gemma2():
  """Gemma 2 options (soft-capping, a sliding window on even layers) through the whole model."""
  config = sizes.get_size("tiny", sliding_window=6, attn_logit_softcap=5.0,
                          final_logit_softcap=30.0, post_norms=True)
  batch = _tiny_batch(config, 1, seed=3)
  inputs = {name: batch[name] for name in steps.MODEL_INPUTS}
  params = vlm.init_params(vlm.VLM(config), jax.random.key(0))
  dense = vlm.VLM(config).apply({"params": params}, **inputs)
  kernel_model = vlm.VLM(dataclasses.replace(config, attention_impl="pallas", flash_block_q=16,
                                             flash_block_k=32))
  got = jax.jit(lambda p: kernel_model.apply({"params": p}, **inputs))(params)
  # Without the window the logits differ, so the comparison sees the window.
  no_window = vlm.VLM(dataclasses.replace(config, llm=dataclasses.replace(
      config.llm, sliding_window=None))).apply({"params": params}, **inputs)
  real = batch["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(dense)[real], atol=2e-4)
  assert np.abs(np.asarray(no_window) - np.asarray(dense))[real].max() > 1e-3


@pytest.mark.slow
def test_sharded_sft_step_with_the_kernel_matches_xla():
  """One SFT step on a 2x2x2 mesh of fake CPU devices: same loss and gradient norm with the kernel
  (under shard_map over batch and heads) as with the dense path."""
  assert jax.device_count() >= 8
  config = sizes.get_size("tiny")
  mesh = sh.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  tx = optim.make_optimizer({"lr": 1e-3, "warmup_steps": 0}, 10)
  batch = sh.shard_batch(_tiny_batch(config, 8, seed=5), mesh)
  # The parameters do not depend on the attention implementation: one state serves both.
  state, shardings = state_lib.create_sharded_state(vlm.VLM(config), vlm.example_inputs(config),
                                                    tx, mesh, rng=0)
  results = {}
  for impl in ("xla", "pallas"):
    model = vlm.VLM(dataclasses.replace(config, attention_impl=impl))
    step = steps.make_train_step(steps.get_loss("sft"), steps.make_apply_fn(model), tx, mesh,
                                 shardings, donate=False)
    if impl == "pallas":
      with jax.set_mesh(mesh), nn.logical_axis_rules(sh.DEFAULT_RULES):
        jaxpr = str(jax.make_jaxpr(step.jitted)(state, batch))
      assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    _, metrics = step(state, batch)
    results[impl] = {name: float(metrics[name]) for name in ("loss", "grad_norm")}
  np.testing.assert_allclose(results["pallas"]["loss"], results["xla"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(results["pallas"]["grad_norm"], results["xla"]["grad_norm"],
                             rtol=1e-4)


def test_attention_bench_counts_unmasked_pairs_and_agrees():
  from bench import attention as bench_attention  # pylint: disable=g-import-not-at-top
  seg, ar = bench_attention.packed_prefix_lm_row(64, seed=1)
  assert seg.max() == 2 and (seg == 0).sum() == 3  # two examples, 5 % padding
  cum = np.cumsum(ar[0])
  brute = sum(1 for t in range(64) for s in range(64)
              if seg[0, t] == seg[0, s] > 0 and cum[s] <= cum[t])
  assert bench_attention.unmasked_pairs(seg, ar) == brute
  row = bench_attention.measure_length(64, jnp.float32, timed=True, repeats=1)
  assert row["unmasked_pairs"] == bench_attention.unmasked_pairs(
      *bench_attention.packed_prefix_lm_row(64))
  assert max(row["max_abs_diff"].values()) < 1e-4
  assert row["pallas"]["tflop_per_s"] > 0 and row["xla"]["peak_memory_bytes"] > 0
