"""Tests for vpd_jax/train/dpo.py: the DPO loss against hand-computed values, the pair layout, and
the DPO train step on a sharded 8-device mesh against one device."""

import math
import os

# Eight fake CPU devices; must be set before jax initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax import sharding as sh
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.train import dpo
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib
from vpd_jax.train import steps

CONFIG = sizes.get_size("tiny")
MODEL = vlm.VLM(CONFIG)
APPLY = steps.make_apply_fn(MODEL)
OPTIM = {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "eps": 1.0}


def _softplus(x):
  return math.log1p(math.exp(x))


# Two pairs: policy and reference log-probs (chosen, rejected) and target tokens per chain.
POLICY = np.array([[-3.0, -5.0], [-2.0, -1.0]], np.float32)
REFERENCE = np.array([[-4.0, -4.0], [-2.0, -2.0]], np.float32)
TOKENS = np.array([[3.0, 4.0], [2.0, 2.0]], np.float32)


def test_dpo_loss_hand_computed():
  loss, aux = dpo.dpo_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS),
                           beta=0.1)
  # Pair 0: r_c = 0.1 * (-3 + 4) = 0.1, r_r = 0.1 * (-5 + 4) = -0.1, margin 0.2.
  # Pair 1: r_c = 0.1 * (-2 + 2) = 0,   r_r = 0.1 * (-1 + 2) = 0.1,  margin -0.1.
  expected = (_softplus(-0.2) + _softplus(0.1)) / 2  # -log sigmoid(m) = log(1 + exp(-m))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(loss) == pytest.approx(0.6712677, abs=1e-6)
  assert float(aux["weight"]) == 2 and float(aux["tokens"]) == 11
  assert float(aux["reward_margin"]) == pytest.approx(0.05, abs=1e-7)
  assert float(aux["reward_accuracy"]) == 0.5
  assert float(aux["chosen_reward"]) == pytest.approx(0.05, abs=1e-7)
  assert float(aux["rejected_reward"]) == pytest.approx(0.0, abs=1e-7)
  assert float(aux["chosen_logp"]) == -2.5 and float(aux["rejected_logp"]) == -3.0
  assert "sft_nll" not in aux

  # beta = 0.5: margins 1.0 and -0.5.
  loss_05, _ = dpo.dpo_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS),
                            beta=0.5)
  assert float(loss_05) == pytest.approx((_softplus(-1.0) + _softplus(0.5)) / 2, rel=1e-6)


def test_sft_term_and_padding_pairs():
  # The chosen chains' per-token NLL: 3 / 3 and 2 / 2, mean 1.0.
  loss, aux = dpo.dpo_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS),
                           beta=0.1, sft_weight=0.5)
  assert float(aux["sft_nll"]) == pytest.approx(1.0)
  assert float(loss) == pytest.approx((_softplus(-0.2) + _softplus(0.1)) / 2 + 0.5, rel=1e-6)
  # A pair whose rejected row has no target tokens is padding: neither loss nor counts change.
  padded = [np.concatenate([x, [[-7.0, 0.0]]]) for x in (POLICY, REFERENCE)]
  padded_tokens = np.concatenate([TOKENS, [[5.0, 0.0]]])
  loss_p, aux_p = dpo.dpo_loss(*map(jnp.asarray, padded), jnp.asarray(padded_tokens), beta=0.1)
  assert float(loss_p) == pytest.approx((_softplus(-0.2) + _softplus(0.1)) / 2, rel=1e-6)
  assert float(aux_p["weight"]) == 2 and float(aux_p["tokens"]) == 11
  with pytest.raises(ValueError, match="beta must be > 0"):
    dpo.dpo_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS), beta=0.0)


def test_gradient_raises_chosen_and_lowers_rejected():
  grad = jax.grad(lambda p: dpo.dpo_loss(p, jnp.asarray(REFERENCE), jnp.asarray(TOKENS))[0])(
      jnp.asarray(POLICY))
  # d/dm softplus(-m) = -sigmoid(-m); dm/dlogp_c = beta / 2 pairs, dm/dlogp_r = -beta / 2.
  sig = lambda x: 1 / (1 + math.exp(-x))
  expected = np.array([[-sig(-0.2), sig(-0.2)], [-sig(0.1), sig(0.1)]]) * 0.1 / 2
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5)
  # The reference is a constant: no gradient flows into it.
  ref_grad = jax.grad(lambda r: dpo.dpo_loss(jnp.asarray(POLICY), r, jnp.asarray(TOKENS))[0])(
      jnp.asarray(REFERENCE))
  assert not np.any(np.asarray(ref_grad))


def test_sequence_logp_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 2
  targets = rng.integers(0, 11, size=(3, 6)).astype(np.int32)
  mask = np.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
  got = np.asarray(dpo.sequence_logp(jnp.asarray(logits), targets, mask))
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  expected = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(-1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got[2] == 0.0


def pair_batch(num_pairs: int, seed: int) -> dict:
  """Synthetic pair rows: two different random rows per pair, one image per pair, random refs."""
  rows = steps.synthetic_batch(CONFIG.num_image_tokens, CONFIG.vit.image_size,
                               CONFIG.llm.vocab_size, 2 * num_pairs, seed, examples_per_row=1)
  batch = {k: rows[k].reshape((num_pairs, 2) + rows[k].shape[1:]) for k in dpo.PAIR_ROW_FEATURES}
  batch["images"] = rows["images"][0::2]
  batch["ref_logp"] = np.random.default_rng(seed).uniform(-60, -40, (num_pairs, 2)).astype(
      np.float32)
  return batch


@pytest.fixture(scope="module")
def params():
  init = jax.jit(lambda key: flax.core.meta.unbox(vlm.init_params(MODEL, key)))
  return jax.device_get(init(jax.random.key(0)))


def test_registered_loss_scores_chosen_and_rejected_rows(params):
  batch = pair_batch(3, seed=1)
  loss_fn = jax.jit(lambda p, b: steps.get_loss("dpo")(p, b, None, APPLY))
  loss, aux = loss_fn(params, batch)
  # Each chain scored on its own: rows [:, 0] are chosen, [:, 1] rejected, each with its image.
  row_logp = jax.jit(lambda p, rows: dpo.sequence_logp(APPLY(p, rows), rows["targets"],
                                                       rows["loss_mask"]))
  logps = np.zeros((3, 2), np.float32)
  for j in range(2):
    rows = {k: batch[k][:, j] for k in dpo.PAIR_ROW_FEATURES}
    rows["images"] = batch["images"]
    logps[:, j] = np.asarray(row_logp(params, rows))
  tokens = batch["loss_mask"].sum(-1).astype(np.float32)
  expected, _ = dpo.dpo_loss(jnp.asarray(logps), jnp.asarray(batch["ref_logp"]),
                             jnp.asarray(tokens))
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  assert float(aux["chosen_logp"]) == pytest.approx(logps[:, 0].mean(), rel=1e-5)
  # With the reference equal to the policy every margin is 0 and the loss is log 2.
  same = {**batch, "ref_logp": logps}
  assert float(loss_fn(params, same)[0]) == pytest.approx(
      math.log(2), rel=1e-5)
  missing = {k: v for k, v in batch.items() if k != "ref_logp"}
  with pytest.raises(ValueError, match="lacks 'ref_logp'"):
    steps.get_loss("dpo")(params, missing, None, APPLY)
  with pytest.raises(ValueError, match=r"must be \[pairs, 2, length\]"):
    dpo.pair_rows({**batch, "tokens": batch["tokens"][:, 0]})


def _run_steps(mesh, params, batches, grad_accum=1, sft_weight=0.0):
  tx = optim.make_optimizer(OPTIM, 10)
  _, shardings = state_lib.abstract_state(MODEL, vlm.example_inputs(CONFIG), tx, mesh)
  state, _ = state_lib.create_sharded_state(MODEL, vlm.example_inputs(CONFIG), tx, mesh, rng=0)
  state = state.replace(params=jax.device_put(params, shardings.params))
  loss_fn = functools.partial(steps.get_loss("dpo"), beta=0.1, sft_weight=sft_weight)
  step = steps.make_train_step(loss_fn, APPLY, tx, mesh, shardings, donate=False,
                               grad_accum_steps=grad_accum)
  reference = dpo.make_reference_fn(APPLY, mesh, shardings.params)
  history = []
  for batch in batches:
    batch = sh.shard_batch(batch, mesh)
    if "ref_logp" not in batch:  # on the fly: the frozen starting parameters
      batch = {**batch, "ref_logp": reference(jax.device_put(params, shardings.params), batch)}
    state, metrics = step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  return history


@pytest.mark.slow
def test_sharded_dpo_steps_match_one_device(params):
  batches = [{k: v for k, v in pair_batch(8, seed=s).items() if k != "ref_logp"}
             for s in range(3)]
  mesh = sh.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  single = sh.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  sharded = _run_steps(mesh, params, batches, sft_weight=0.1)
  one = _run_steps(single, params, batches, sft_weight=0.1)
  for key in ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp",
              "sft_nll", "grad_norm", "tokens"):
    np.testing.assert_allclose([h[key] for h in sharded], [h[key] for h in one], rtol=2e-5,
                               atol=1e-5, err_msg=key)
  # Step 1: policy == reference, so the DPO part is log 2 and the margin 0; then the margin grows.
  assert sharded[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
  assert sharded[0]["loss"] == pytest.approx(math.log(2) + 0.1 * sharded[0]["sft_nll"], rel=1e-5)
  assert sharded[2]["reward_margin"] != sharded[0]["reward_margin"]


def test_load_params_names_a_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    dpo.load_params(str(tmp_path / "sft"), "tiny", {})
  assert not os.path.exists(tmp_path / "sft")  # nothing is created on the way


@pytest.mark.slow
def test_dpo_grad_accumulation_equals_one_big_batch(params):
  batches = [pair_batch(8, seed=5)]
  mesh = sh.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  big = _run_steps(mesh, params, batches)
  micro = _run_steps(mesh, params, batches, grad_accum=2)
  for key in ("loss", "grad_norm", "reward_margin", "chosen_logp", "tokens"):
    assert micro[0][key] == pytest.approx(big[0][key], rel=1e-5, abs=1e-6), key
