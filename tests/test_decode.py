"""Tests for vpd_jax.models.decode: KV-cache decoding against recomputation, sampling, EOS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from vpd_jax.models import decode
from vpd_jax.models import vlm

VOCAB = 64
PREFIX_LENGTHS = (2, 5, 0)  # one prompt is the image alone
STEPS = 8
OPTIONS = {"gemma": {},
           "gemma2": dict(sliding_window=6, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                          post_norms=True)}


@functools.lru_cache(maxsize=None)
def _setup(variant):
  """(config, params) of the sharpened tiny model (helpers.sharpened_tiny_model) for `variant`."""
  return helpers.sharpened_tiny_model(VOCAB, 0, **OPTIONS[variant])


def _prompts(config, seed=0):
  """Unpacked prompt rows (image + prefix, right-padded) with different prompt lengths."""
  rng = np.random.default_rng(seed)
  n, batch = config.num_image_tokens, len(PREFIX_LENGTHS)
  length = n + max(PREFIX_LENGTHS) + 1
  rows = {k: np.zeros((batch, length), np.int32) for k in vlm.ROW_FEATURES}
  for b, prefix in enumerate(PREFIX_LENGTHS):
    rows["tokens"][b, n:n + prefix] = rng.integers(3, VOCAB, prefix)
    rows["segment_ids"][b, :n + prefix] = 1
    rows["positions"][b, :n + prefix] = np.arange(n + prefix)
  rows["image_slot"][:] = np.where(np.arange(length) < n, 0, -1)
  size = config.vit.image_size
  rows["images"] = rng.uniform(-1, 1, (batch, 1, size, size, 3)).astype(np.float32)
  return rows


def _full_rows(config, prompts, continuations):
  """Rows holding each prompt followed by its continuation (ar_flag 1), one shape for all."""
  n = config.num_image_tokens
  batch = len(PREFIX_LENGTHS)
  length = n + max(PREFIX_LENGTHS) + max(len(c) for c in continuations)
  rows = {k: np.zeros((batch, length), np.int32) for k in vlm.ROW_FEATURES}
  for b, prefix in enumerate(PREFIX_LENGTHS):
    seq = list(prompts["tokens"][b, :n + prefix]) + list(continuations[b])
    rows["tokens"][b, :len(seq)] = seq
    rows["ar_flag"][b, n + prefix:len(seq)] = 1
    rows["segment_ids"][b, :len(seq)] = 1
    rows["positions"][b, :len(seq)] = np.arange(len(seq))
  rows["image_slot"][:] = np.where(np.arange(length) < n, 0, -1)
  return {"images": prompts["images"], **rows}


@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_cached_steps_give_the_logits_of_a_full_forward(variant):
  config, params = _setup(variant)
  model = vlm.VLM(config)
  prompts = _prompts(config)
  forced = np.random.default_rng(1).integers(3, VOCAB, (len(PREFIX_LENGTHS), 6)).astype(np.int32)
  prefill = jax.jit(functools.partial(model.apply, method=vlm.VLM.prefill),
                    static_argnames="cache_size")
  extend = jax.jit(functools.partial(model.apply, method=vlm.VLM.extend))
  rows = {k: prompts[k] for k in vlm.ROW_FEATURES}
  logits, cache = prefill({"params": params}, prompts["images"], **rows,
                          cache_size=prompts["tokens"].shape[1] + forced.shape[1])
  stepped = [logits]
  for i in range(forced.shape[1] - 1):
    logits, cache = extend({"params": params}, forced[:, i], cache)
    stepped.append(logits)
  full = jax.jit(model.apply)({"params": params}, **_full_rows(config, prompts, forced[:, :-1]))
  n = config.num_image_tokens
  for b, prefix in enumerate(PREFIX_LENGTHS):
    expected = np.asarray(full)[b, n + prefix - 1:n + prefix - 1 + forced.shape[1]]
    np.testing.assert_allclose(np.stack([s[b] for s in stepped]), expected, atol=2e-5)
  np.testing.assert_array_equal(cache["end"], n + np.array(PREFIX_LENGTHS) + forced.shape[1] - 1)


def _greedy_by_recompute(config, params, prompts, steps):
  """Greedy decoding that runs the whole sequence through VLM.__call__ at every step."""
  apply = jax.jit(vlm.VLM(config).apply)
  n = config.num_image_tokens
  generated = [[] for _ in PREFIX_LENGTHS]
  for _ in range(steps):
    # The continuation so far plus one placeholder: its logits are not read.
    rows = _full_rows(config, prompts, [g + [0] for g in generated])
    logits = np.asarray(apply({"params": params}, **rows))
    for b, prefix in enumerate(PREFIX_LENGTHS):
      generated[b].append(int(np.argmax(logits[b, n + prefix - 1 + len(generated[b])])))
  return np.array(generated)


@functools.lru_cache(maxsize=None)
def _greedy(variant):
  config, params = _setup(variant)
  return decode.generate(config, params, _prompts(config), jax.random.key(0),
                         decode.SamplingConfig(STEPS, eos_id=None))


@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_greedy_with_cache_equals_greedy_by_recompute(variant):
  config, params = _setup(variant)
  out = _greedy(variant)
  expected = _greedy_by_recompute(config, params, _prompts(config), STEPS)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, [STEPS] * len(PREFIX_LENGTHS))
  # The outputs vary within rows, so the comparison exercises positions and cache slots.
  assert all(len(set(row)) > 1 for row in expected.tolist())


def test_sampling_is_deterministic_per_key():
  config, params = _setup("gemma")
  prompts = _prompts(config)
  sampling = decode.SamplingConfig(STEPS, temperature=1.0, top_p=0.95, eos_id=None)
  first = decode.generate(config, params, prompts, jax.random.key(7), sampling)
  again = decode.generate(config, params, prompts, jax.random.key(7), sampling)
  other = decode.generate(config, params, prompts, jax.random.key(8), sampling)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
  assert (np.asarray(first.tokens) != np.asarray(_greedy("gemma").tokens)).any()


@pytest.mark.parametrize("sampling", [dict(temperature=1.5, top_k=1),
                                      dict(temperature=1.0, top_p=1e-6)], ids=["top_k", "top_p"])
def test_filters_down_to_one_token_equal_greedy(sampling):
  config, params = _setup("gemma")
  out = decode.generate(config, params, _prompts(config), jax.random.key(3),
                        decode.SamplingConfig(STEPS, eos_id=None, **sampling))
  np.testing.assert_array_equal(out.tokens, _greedy("gemma").tokens)


def test_sample_tokens_keeps_the_top_k_and_the_top_p_mass():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  keys = jax.random.split(jax.random.key(0), 2000)

  def draws(**kw):
    sampling = decode.SamplingConfig(1, temperature=1.0, **kw)
    return np.asarray(jax.vmap(lambda k: decode.sample_tokens(logits, k, sampling)[0])(keys))

  assert set(draws(top_k=2)) == {0, 1}
  assert set(draws(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, then 0.5 + 0.3 reaches it
  assert set(draws(top_p=0.85)) == {0, 1, 2}
  frequencies = np.bincount(draws(), minlength=4) / len(keys)
  np.testing.assert_allclose(frequencies, probs, atol=0.04)
  greedy = decode.sample_tokens(logits, keys[0], decode.SamplingConfig(1))
  assert int(greedy[0]) == 0


def test_eos_stops_each_row_on_its_own():
  config, params = _setup("gemma")
  free = np.asarray(_greedy("gemma").tokens)
  # EOS = the token row 0 first emits at step 2 (a token it had not emitted before).
  step = next(i for i in range(2, STEPS) if free[0, i] not in free[0, :i])
  eos = int(free[0, step])
  out = decode.generate(config, params, _prompts(config), jax.random.key(0),
                        decode.SamplingConfig(STEPS, eos_id=eos, pad_id=VOCAB - 1))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for b in range(len(PREFIX_LENGTHS)):
    hits = np.flatnonzero(free[b] == eos)
    expected = hits[0] + 1 if hits.size else STEPS
    assert lengths[b] == expected
    np.testing.assert_array_equal(tokens[b, :expected], free[b, :expected])
    assert (tokens[b, expected:] == VOCAB - 1).all()
  assert lengths[0] == step + 1 < STEPS


def test_generate_rejects_bad_inputs():
  config, params = _setup("gemma")
  prompts = _prompts(config)
  two_images = dict(prompts, images=np.repeat(prompts["images"], 2, axis=1))
  with pytest.raises(ValueError, match=r"images must be \[B, 1, H, W, 3\]"):
    decode.generate(config, params, two_images, jax.random.key(0), decode.SamplingConfig(2))
  with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
    decode.SamplingConfig(0)
  with pytest.raises(ValueError, match="top_p must be in"):
    decode.SamplingConfig(4, top_p=0.0)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    decode.SamplingConfig(4, temperature=-1.0)
