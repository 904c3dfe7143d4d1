"""Tests for vpd_jax/train/pairs.py and vpd_jax/data/pairs.py: scoring and pairing chains, pair
records, the pair feature converter, and SFT -> pairs -> DPO end to end on the session's traces."""

import json
import math
import os

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import pytest
import tensorflow as tf

from vpd_jax.config_args import load_config_file
from vpd_jax.data import features
from vpd_jax.data import pairs as pair_data
from vpd_jax.data import tasks
from vpd_jax.train import loop
from vpd_jax.train import pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LENGTHS = "size=tiny,prefix_len=16,suffix_len=24,seed=3"


def test_scoring_uses_the_vqa_normalisation():
  assert pairs.is_correct("Two", ["2"])
  assert pairs.is_correct("the cube.", ["cube"])
  assert pairs.is_correct("yes", ["no", "Yes"])
  assert not pairs.is_correct("3", ["2"])
  assert not pairs.is_correct("", ["2"])


def test_pair_chains_pairs_each_right_chain_with_a_different_wrong_one():
  assert pairs.pair_chains([True, False, False, True, True], max_pairs=5) == [(0, 1), (3, 2)]
  assert pairs.pair_chains([True, False, False, True, True], max_pairs=1) == [(0, 1)]
  assert pairs.pair_chains([True, True], max_pairs=3) == []
  assert pairs.pair_chains([False, False], max_pairs=3) == []
  assert pairs.unique_chains([[5, 1], [6, 1], [5, 1], [5]]) == [0, 1, 3]


def _record(**overrides):
  fields = dict(
      example_id="shapes-0-000001", image=tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy(),
      question="How many circles?", answers=["2", "two"], family="count",
      prompt="answer with a rationale: How many circles?", prompt_tokens=[5, 6, 7],
      chosen_tokens=[11, 12, 13, 1], rejected_tokens=[21, 22], chosen_text="So the answer is 2.",
      rejected_text="So the answer", chosen_answer="2", rejected_answer="So the answer")
  fields.update(overrides)
  return pair_data.PairRecord(**fields)


def test_pair_record_round_trip():
  record = _record(ref_chosen_logp=-3.5, ref_rejected_logp=-7.25)
  assert pair_data.PairRecord.parse(record.serialize()) == record
  plain = _record()
  assert pair_data.PairRecord.parse(plain.serialize()).ref_chosen_logp is None


def _examples(with_reference):
  rng = np.random.default_rng(0)
  out = []
  for n in range(3):
    ex = {"image": rng.uniform(-1, 1, (32, 32, 3)).astype(np.float32),
          "prefix": rng.integers(2, 50, 3 + n).astype(np.int32),
          "chosen": rng.integers(2, 50, 4 + 2 * n).astype(np.int32),
          "rejected": rng.integers(2, 50, 7 - n).astype(np.int32)}
    if with_reference:
      ex["ref_logp"] = np.array([-1.0 - n, -2.0 - n], np.float32)
    out.append(ex)
  return out


def _dataset(examples):
  return tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={
          k: tf.TensorSpec(np.asarray(v).shape if k in ("image", "ref_logp") else [None],
                           tf.as_dtype(v.dtype)) for k, v in examples[0].items()})


def test_pair_converter_rows_are_the_unpacked_rows_of_each_chain():
  examples = _examples(with_reference=True)
  lengths = {"prefix": 6, "suffix": 6}  # the second and third chains are cut to 6 tokens
  got = list(pair_data.PairFeatureConverter(16, with_reference=True)(
      _dataset(examples), lengths).as_numpy_iterator())
  rows = features.VLMFeatureConverter(16, pack=False)
  for j, key in enumerate(("chosen", "rejected")):
    single = [{"image": e["image"], "prefix": e["prefix"], "suffix": e[key]} for e in examples]
    expected = list(rows(_dataset(single), lengths).as_numpy_iterator())
    assert len(got) == len(expected) == 3
    for pair, row in zip(got, expected):
      for name in pair_data._ROW_FEATURES:  # pylint: disable=protected-access
        np.testing.assert_array_equal(pair[name][j], row[name], err_msg=f"{key} {name}")
      np.testing.assert_array_equal(pair["images"], row["images"])
  assert got[0]["tokens"].shape == (2, 16 + 6 + 6) and got[0]["images"].shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(got[2]["ref_logp"], [-3.0, -4.0])
  # The chosen chain of example 0 has 4 targets, cut ones keep 6 (their EOS is lost with the cut).
  assert got[0]["loss_mask"].sum(-1).tolist() == [4, 6] and got[2]["loss_mask"][0].sum() == 6

  with pytest.raises(ValueError, match="carry no 'ref_logp'"):
    pair_data.PairFeatureConverter(16, with_reference=True)(
        _dataset(_examples(with_reference=False)), lengths)
  plain = next(pair_data.PairFeatureConverter(16)(
      _dataset(_examples(with_reference=False)), lengths).as_numpy_iterator())
  assert "ref_logp" not in plain


def _config(arg):
  return load_config_file(os.path.join(ROOT, "configs", "dpo.py"), arg)


def test_dpo_config():
  config = _config("beta=0.2,sft_weight=0.5,reference=on_the_fly,lr=1e-5,init_from=/sft")
  assert config.loss == "dpo" and dict(config.loss_args) == {"beta": 0.2, "sft_weight": 0.5}
  assert config.optim.lr == 1e-5 and config.init_from == "/sft"
  assert config.data.converter == "pairs" and config.eval.every == 0
  default = _config("")
  assert default.loss_args.beta == 0.1 and default.optim.lr == 5e-7
  assert default.reference == "stored" and default.data.converter == "pairs_with_reference"
  with pytest.raises(ValueError, match="reference='both'"):
    _config("reference=both")
  with pytest.raises(ValueError, match="'bogus' does not exist.*DPO keys: beta"):
    _config("bogus=1")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, trace_dir, vocab):
  """(data arguments, workdir) of the tiny model after 3 SFT steps on the session's traces."""
  data = f"traces={trace_dir},vocab={vocab.sentencepiece_model_file}"
  workdir = str(tmp_path_factory.mktemp("sft"))
  sft = load_config_file(os.path.join(ROOT, "configs", "vpd_sft.py"),
                         f"{_LENGTHS},{data},batch_size=8,lr=1e-3,warmup_steps=1,total_steps=3,"
                         "ckpt_every=3,eval_every=0,log_every=1")
  loop.train(sft, workdir)
  return data, workdir


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


@pytest.mark.slow
def test_sft_to_pairs_to_dpo(tmp_path, sft_run, monkeypatch):
  data, sft_workdir = sft_run
  # A model trained 3 steps never writes a right answer; score chains by a fixed rule instead, so
  # that both outcomes occur (the scoring itself is tested above).
  monkeypatch.setattr(pairs, "is_correct", lambda answer, labels: len(answer) % 2 == 0)
  arg = (f"{_LENGTHS},{data},num_questions=12,samples=4,max_pairs=2,pair_batch=16,pair_shards=2,"
         f"temperature=1.0,init_from={sft_workdir}")
  pair_dir = str(tmp_path / "pairs")
  manifest = pairs.build_pairs(_config(arg), sft_workdir, pair_dir)

  stats = manifest["statistics"]
  written = pairs.read_pairs(pair_dir)
  assert manifest == json.load(open(os.path.join(pair_dir, "manifest.json")))
  assert manifest["shards"] == ["pairs-00000-of-00002.tfrecord", "pairs-00001-of-00002.tfrecord"]
  assert manifest["checkpoint_step"] == 3 and manifest["with_reference"]
  assert stats["questions"] == 12 and stats["pairs"] == len(written) > 0
  assert stats["questions_with_pair"] == len({p.example_id for p in written})
  assert stats["questions_with_pair"] + stats["questions_all_correct"] + \
      stats["questions_all_wrong"] == 12
  assert sum(f["pairs"] for f in stats["by_family"].values()) == stats["pairs"]
  assert not [n for n in os.listdir(pair_dir) if ".tmp-" in n]
  for p in written:
    assert len(p.chosen_answer) % 2 == 0 and len(p.rejected_answer) % 2 == 1
    assert p.chosen_tokens != p.rejected_tokens and 0 < len(p.chosen_tokens) <= 24
    assert p.prompt.startswith("answer with a rationale: ") and len(p.prompt_tokens) <= 16
    assert p.ref_chosen_logp < 0 and p.ref_rejected_logp < 0
  by_question = {}
  for p in written:
    by_question.setdefault(p.example_id, []).append(p)
  assert max(len(v) for v in by_question.values()) <= 2

  # DPO from the SFT parameters, reference log-probs stored vs computed on the fly: the same run.
  train = f"{arg},pairs={pair_dir},batch_size=8,total_steps=2,lr=1e-3,warmup_steps=0,log_every=1"
  runs = {}
  for mode in ("stored", "on_the_fly"):
    workdir = str(tmp_path / mode)
    loop.train(_config(f"{train},reference={mode}"), workdir)
    runs[mode] = _losses(workdir)
  for stored, fly in zip(runs["stored"], runs["on_the_fly"]):
    for key in ("loss", "reward_margin", "chosen_logp", "rejected_logp", "tokens"):
      assert stored[key] == pytest.approx(fly[key], rel=1e-4, abs=1e-4), key
  first, second = runs["stored"]
  # Step 1 starts from the reference itself: every margin is 0 and the loss log 2.
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
  assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
  assert second["reward_margin"] != pytest.approx(0.0, abs=1e-6)
  assert tasks.get_task_or_mixture("shapes.pairs").splits == ("train",)

  # Scored by the reference itself the margin is 0; after two DPO steps on these pairs it is not.
  config = _config(arg)
  before = pairs.score_pairs(config, sft_workdir, pair_dir)
  assert before["pairs"] == len(written) and before["reward_margin"] == pytest.approx(0, abs=1e-5)
  assert before["logp_gap"] == pytest.approx(before["reference_logp_gap"], abs=1e-4)
  after = pairs.score_pairs(config, str(tmp_path / "stored"), pair_dir)
  assert after["step"] == 2 and after["reward_margin"] > 0
