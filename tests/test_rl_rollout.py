"""Tests for vpd_jax.rl.conversation and rollout: multi-image rows, the KV cache, the turn loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.rl import conversation
from vpd_jax.rl import env as env_lib
from vpd_jax.rl import rollout as rollout_lib

VOCAB = 128


class CharVocab:
  """One id per printable character (ids 4..), enough for the tests' turns."""

  def encode(self, text):
    return [4 + min(max(ord(c) - 32, 0), VOCAB - 5) for c in text]

  def decode(self, ids):
    return "".join(chr(int(i) - 4 + 32) for i in ids if int(i) >= 4)


@functools.lru_cache(maxsize=None)
def _model():
  """Tiny model with random weights, sharpened so greedy tokens change from step to step (a fresh
  tied-embedding model mostly repeats its input), which makes a wrong cache slot visible."""
  return helpers.sharpened_tiny_model(VOCAB, 1)


def _task(seed=0):
  rng = np.random.default_rng(seed)
  return env_lib.Task(rng.integers(0, 255, (96, 96, 3)).astype(np.uint8), "What color?", ["red"],
                      task_id=f"t{seed}")


def _two_image_rows(config, vocab):
  episode = env_lib.Episode(_task(0))
  episode.step("look zoom_in(0.1, 0.1, 0.6, 0.6)", tokens=vocab.encode("look zoom_in(0.1, 0.1, "
                                                                       "0.6, 0.6)") + [1])
  other = env_lib.Episode(_task(1))
  rows = [conversation.build_row(e.task, e.segments, vocab.encode, config.num_image_tokens,
                                 config.vit.image_size).arrays() for e in (episode, other)]
  return conversation.pad_rows(rows, 112, 3, config.vit.image_size), rows


def test_row_layout_of_a_two_image_conversation():
  config = sizes.get_size("tiny", vocab_size=VOCAB)
  vocab = CharVocab()
  batch, rows = _two_image_rows(config, vocab)
  n_img, prompt = config.num_image_tokens, len(vocab.encode("Question: What color?\n"))
  turn = len(vocab.encode("look zoom_in(0.1, 0.1, 0.6, 0.6)")) + 1
  row = rows[0]
  assert row["tokens"].shape[0] == 2 * n_img + prompt + turn and len(row["images"]) == 2
  np.testing.assert_array_equal(row["positions"], np.arange(row["tokens"].shape[0]))
  second = slice(n_img + prompt + turn, 2 * n_img + prompt + turn)
  assert (row["image_slot"][second] == 1).all() and (row["ar_flag"][second] == 1).all()
  np.testing.assert_array_equal(row["image_index"][second], np.arange(n_img))
  assert (row["ar_flag"][:n_img + prompt] == 0).all()
  # The loss covers exactly the model's turn (its EOS included), predicted from one position back.
  assert row["loss_mask"].sum() == turn
  assert row["loss_mask"][n_img + prompt - 1] == 1 and row["targets"][second.start - 1] == 0
  assert batch["tokens"].shape == (2, 112) and batch["images"].shape[:2] == (2, 3)
  assert (batch["image_slot"][1, rows[1]["tokens"].shape[0]:] == -1).all()


def test_prefill_and_extend_match_the_full_forward_pass_on_several_images():
  config, params = _model()
  vocab = CharVocab()
  batch, rows = _two_image_rows(config, vocab)
  apply_fn = jax.jit(conversation.make_apply_fn(vlm.VLM(config)))
  full = np.asarray(apply_fn(params, batch))
  prefill = jax.jit(lambda p, b: conversation.prefill(vlm.VLM(config), p, b, 120))
  logits, cache = prefill(params, {k: batch[k] for k in conversation.MODEL_INPUTS})
  ends = [r["tokens"].shape[0] for r in rows]
  np.testing.assert_array_equal(np.asarray(cache["end"]), ends)
  np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [ends[0] - 1, ends[1] - 1]],
                             atol=2e-4)
  # Feed 3 more tokens through the cache; the full pass over the longer rows must agree.
  extra = np.array([[10, 20, 30], [40, 50, 60]], np.int32)
  longer = {k: v.copy() for k, v in batch.items()}
  for b, n in enumerate(ends):
    longer["tokens"][b, n:n + 3] = extra[b]
    longer["positions"][b, n:n + 3] = np.arange(n, n + 3)
    longer["segment_ids"][b, n:n + 3] = 1
    longer["ar_flag"][b, n:n + 3] = 1
  full = np.asarray(apply_fn(params, longer))
  extend = jax.jit(lambda p, t, c: vlm.VLM(config).apply({"params": p}, t, c,
                                                         method=vlm.VLM.extend))
  for i in range(3):
    logits, cache = extend(params, jnp.asarray(extra[:, i]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [ends[0] + i, ends[1] + i]],
                               atol=2e-4)


def test_decode_turn_with_the_cache_equals_greedy_recomputation():
  config, params = _model()
  vocab = CharVocab()
  batch, rows = _two_image_rows(config, vocab)
  inputs = {k: batch[k] for k in conversation.MODEL_INPUTS}
  sampling = rollout_lib.RolloutConfig(max_new_tokens=5, temperature=0.0, eos_id=-1).sampling
  tokens, lengths = rollout_lib._decode_turn(config, sampling, None, params, inputs,
                                             jax.random.key(0))
  apply_fn = jax.jit(conversation.make_apply_fn(vlm.VLM(config)))
  current = {k: v.copy() for k, v in batch.items()}
  ends = [r["tokens"].shape[0] for r in rows]
  for i in range(5):
    logits = np.asarray(apply_fn(params, current))
    for b, n in enumerate(ends):
      want = int(np.argmax(logits[b, n + i - 1]))
      assert int(tokens[b, i]) == want, (b, i)
      current["tokens"][b, n + i] = want
      current["positions"][b, n + i] = n + i
      current["segment_ids"][b, n + i] = 1
      current["ar_flag"][b, n + i] = 1
  np.testing.assert_array_equal(np.asarray(lengths), [5, 5])
  assert len(set(np.asarray(tokens)[0].tolist())) > 1  # the check is not vacuous


def test_rollout_runs_turns_through_the_environment(monkeypatch):
  """A scripted policy in place of the model: errors, a zoom, then answers; the final rows hold
  exactly the written turns."""
  config, params = _model()
  vocab = CharVocab()
  script = [["zoom_in(2, 0, 1)", "So the answer is red."],  # malformed, then the answer
            ["zoom_in(0.1, 0.1, 0.7, 0.7)", "zoom_in(0, 0, 1)", "So the answer is red."]]
  calls = []

  def fake_decode(model_config, sampling, vocab_size, params, batch, rng):
    turn = len(calls)
    calls.append(np.asarray(batch["segment_ids"]).sum(axis=1))
    out = np.zeros((2, sampling.max_new_tokens), np.int32)
    lengths = np.zeros(2, np.int32)
    for b in range(2):
      text = script[b][turn] if turn < len(script[b]) else "x"
      ids = vocab.encode(text)[:sampling.max_new_tokens - 1] + [1]
      out[b, :len(ids)], lengths[b] = ids, len(ids)
    return out, lengths

  monkeypatch.setattr(rollout_lib, "_decode_turn", fake_decode)
  cfg = rollout_lib.RolloutConfig(row_length=400, max_images=3, max_new_tokens=40)
  result = rollout_lib.rollout(config, params, [_task(0), _task(1)], vocab, jax.random.key(0), cfg)
  first, second = result.episodes
  assert first.done and first.num_errors == 1 and first.num_ops == 1 and first.correct
  assert second.done and second.num_ops == 2 and second.num_errors == 1 and second.correct
  assert result.turns == 3 and second.num_images == 2
  written = [sum(len(s.tokens) for s in e.segments if s.kind == "model") for e in result.episodes]
  np.testing.assert_array_equal(result.rows["loss_mask"].sum(axis=1), written)
  assert (result.rows["image_slot"][1] == 1).sum() == config.num_image_tokens
  assert result.model_seconds >= 0 and result.env_seconds > 0


def test_a_conversation_that_outgrows_its_row_stops_without_an_answer():
  config, params = _model()
  prompt = len(CharVocab().encode(conversation.prompt_text("What color?")))
  room = config.num_image_tokens + prompt + 8  # exactly one turn of 8 tokens fits
  for length, turns in ((room - 1, 0), (room, 1)):
    cfg = rollout_lib.RolloutConfig(row_length=length, max_images=2, max_new_tokens=8,
                                    temperature=0.0)
    result = rollout_lib.rollout(config, params, [_task(0)], CharVocab(), jax.random.key(0), cfg)
    episode = result.episodes[0]
    assert episode.done and result.turns == turns and episode.num_turns == turns
    assert result.rows["tokens"].shape == (1, length)
    if turns == 0:
      assert episode.answer is None and result.rows["loss_mask"].sum() == 0


def test_sampling_never_leaves_the_tokenizer_vocabulary():
  config, params = _model()
  batch, _ = _two_image_rows(config, CharVocab())
  inputs = {k: batch[k] for k in conversation.MODEL_INPUTS}
  cfg = rollout_lib.RolloutConfig(max_new_tokens=6, temperature=1.0, eos_id=-1, vocab_size=8)
  tokens, _ = rollout_lib._decode_turn(config, cfg.sampling, 8, params, inputs, jax.random.key(3))
  assert np.asarray(tokens).max() < 8 and len(set(np.asarray(tokens).ravel().tolist())) > 2
  with pytest.raises(ValueError, match="vocab_size"):
    rollout_lib.RolloutConfig(vocab_size=1)


def test_log_probs_of_are_the_targets_log_softmax_on_written_tokens():
  config, params = _model()
  batch, _ = _two_image_rows(config, CharVocab())
  apply_fn = conversation.make_apply_fn(vlm.VLM(config))
  got = np.asarray(jax.jit(lambda p, b: conversation.log_probs_of(apply_fn, p, b))(params, batch))
  logits = np.asarray(jax.jit(apply_fn)(params, batch), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - logz
  np.testing.assert_allclose(got, want * batch["loss_mask"], atol=1e-4)
  assert (got[batch["loss_mask"] == 0] == 0).all() and (got[batch["loss_mask"] == 1] < 0).all()
