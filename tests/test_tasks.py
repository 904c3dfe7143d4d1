"""Tests for vpd_jax.data.tasks: trace tasks, the VPD mixture, host sharding and bad records."""

import collections
import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import seqio
import tensorflow as tf

from vpd_jax.data import preprocessors as prep
from vpd_jax.data import tasks
from vpd_jax.programs import records

LENGTHS = {"prefix": 64, "suffix": 256}  # longer than any ShapesVQA prompt and rationale


@pytest.fixture(scope="module")
def trace_records(trace_dir):
  return {r.example_id: r for r in records.read_records(trace_dir)}


@pytest.fixture(scope="module")
def names(trace_dir, validation_trace_dir, vocab):
  return tasks.register_trace_tasks("shapes_t", {"train": trace_dir,
                                                 "validation": validation_trace_dir}, vocab)


def _examples(name, split="train", **kwargs):
  kwargs.setdefault("shuffle", False)
  ds = tasks.get_task_or_mixture(name).get_dataset(LENGTHS, split=split, **kwargs)
  return list(ds.as_numpy_iterator())


def test_cot_task_prompt_question_and_rationale(names, vocab, trace_records):
  got = _examples(names["cot"])
  with_program = {i for i, r in trace_records.items() if r.has_program}
  assert 0 < len(with_program) < len(trace_records)  # the fixture has both kinds
  assert sorted(ex["example_id"].decode() for ex in got) == sorted(with_program)
  for ex in got:
    record = trace_records[ex["example_id"].decode()]
    assert vocab.decode(ex["prefix"].tolist()) == f"answer with a rationale: {record.question}"
    assert ex["suffix"][-1] == vocab.eos_id and vocab.eos_id not in ex["suffix"][:-1]
    assert vocab.decode(ex["suffix"][:-1].tolist()) == record.rationale
    assert record.rationale.endswith(f"So the answer is {record.answer}.")
    assert ex["image"].shape == (224, 224, 3) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() < 0 < ex["image"].max() <= 1.0
    assert ex["answers"].decode() == "\x1f".join(record.answers)
    assert ex["family"].decode() == record.family


def test_direct_task_answer_and_image_values(names, vocab, trace_records):
  got = _examples(names["direct"])
  assert sorted(ex["example_id"].decode() for ex in got) == sorted(trace_records)
  for ex in got:
    record = trace_records[ex["example_id"].decode()]
    assert vocab.decode(ex["prefix"].tolist()) == f"answer: {record.question}"
    assert ex["suffix_pretokenized"].decode() == record.answer
    assert vocab.decode(ex["suffix"][:-1].tolist()) == record.answer
    pixels = np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB"), np.float32)
    np.testing.assert_allclose(ex["image"], pixels / 127.5 - 1.0, atol=1e-6)


def test_cot_all_task_rationale_prompt_on_every_record(names, vocab, trace_records):
  got = _examples(names["cot_all"])
  # Every record, also those no program solved, so it scores the questions NAME.direct scores.
  assert sorted(ex["example_id"].decode() for ex in got) == sorted(trace_records)
  for ex in got:
    record = trace_records[ex["example_id"].decode()]
    assert vocab.decode(ex["prefix"].tolist()) == f"answer with a rationale: {record.question}"
    assert ex["suffix_pretokenized"].decode() == record.answer
  mixture = seqio.get_mixture_or_task(names["vpd"])
  assert names["cot_all"] not in {t.name for t in mixture.tasks}


def test_validation_split_and_small_image_size(names, vocab, validation_trace_dir):
  ids = sorted(ex["example_id"].decode() for ex in _examples(names["direct"], "validation"))
  assert ids == [f"shapes-1-{i:07d}" for i in range(12)]
  small = tasks.register_trace_tasks("shapes_small", {"train": validation_trace_dir}, vocab,
                                     image_size=64, prompts={"direct": "Q: {question} A:"})
  (ex,) = _examples(small["direct"])[:1]
  assert ex["image"].shape == (64, 64, 3)
  assert ex["prefix_pretokenized"].decode().startswith("Q: ")
  assert ex["prefix_pretokenized"].decode().endswith(" A:")


def test_suffix_cut_to_length_loses_eos(names, vocab):
  ds = tasks.get_task_or_mixture(names["cot"]).get_dataset(
      {"prefix": 64, "suffix": 5}, shuffle=False)
  for ex in ds.take(3).as_numpy_iterator():
    assert len(ex["suffix"]) == 5 and vocab.eos_id not in ex["suffix"].tolist()


def test_mixture_default_rates_are_example_counts(names, trace_dir, trace_records):
  mixture = seqio.get_mixture_or_task(names["vpd"])
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  kept = sum(r.has_program for r in trace_records.values())
  assert rates == {names["cot"]: kept, names["direct"]: len(trace_records)}
  with open(os.path.join(trace_dir, records.STATISTICS_FILE)) as f:
    assert json.load(f)["all"]["kept"] == kept  # the counts come from statistics.json
  assert tasks.count_examples(trace_dir) == {"cot": kept, "direct": len(trace_records)}


def test_count_examples_without_statistics(tmp_path, trace_dir, trace_records):
  """Without statistics.json the counts come from the shards themselves."""
  for path in records.shard_paths(trace_dir):
    shutil.copy(path, tmp_path)
  kept = sum(r.has_program for r in trace_records.values())
  assert tasks.count_examples(str(tmp_path)) == {"cot": kept, "direct": len(trace_records)}


def test_mixture_samples_at_configured_rates(trace_dir, vocab):
  names = tasks.register_trace_tasks("shapes_rates", {"train": trace_dir}, vocab,
                                     rates={"cot": 1, "direct": 3})
  ds = tasks.get_task_or_mixture(names["vpd"]).get_dataset(LENGTHS, seed=5, num_epochs=None)
  cot_prompt = vocab.encode("answer with a rationale:")
  n = 600
  cot = sum(ex["prefix"][:len(cot_prompt)].tolist() == cot_prompt
            for ex in ds.take(n).as_numpy_iterator())
  # Binomial(600, 0.25): standard deviation 10.6; the bound is about 4 of them.
  assert abs(cot - n / 4) < 45, cot
  only = tasks.register_trace_tasks("shapes_only", {"train": trace_dir}, vocab,
                                    rates={"direct": 1})
  assert [t.name for t in seqio.get_mixture_or_task(only["vpd"]).tasks] == [only["direct"]]
  for bad, message in (({"cot": -1}, "finite number"), ({"explain": 1}, "unknown"),
                       ({"cot": 0}, "zero"), ([0.5, 0.5], "dict")):
    with pytest.raises(ValueError, match=message):
      tasks.register_trace_tasks("shapes_bad", {"train": trace_dir}, vocab, rates=bad)


def _ids(name, shard=None, seed=None, shuffle=True):
  ds = seqio.get_dataset(name, LENGTHS, seqio.PassThroughFeatureConverter(), shuffle=shuffle,
                         seed=seed, shard_info=shard)
  return [ex["example_id"].decode() for ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("hosts", [2, 3, 5])  # 4 files: whole files for 2 and 3, records for 5
def test_host_shards_are_disjoint_and_cover(names, trace_records, hosts):
  parts = [_ids(names["direct"], seqio.ShardInfo(i, hosts), seed=i) for i in range(hosts)]
  assert all(parts)
  flat = [i for part in parts for i in part]
  assert len(flat) == len(set(flat)) and set(flat) == set(trace_records)


def test_same_seed_same_order(names):
  first = _ids(names["direct"], seed=11)
  assert _ids(names["direct"], seed=11) == first
  assert _ids(names["direct"], seed=12) != first
  assert sorted(first) == sorted(_ids(names["direct"], shuffle=False))
  # The two tasks of the mixture get the same seed but visit the records in different orders.
  cot = _ids(names["cot"], seed=11)
  assert [i for i in first if i in set(cot)] != cot


def test_same_seed_same_batches_through_feature_converter(names):
  features = pytest.importorskip("vpd_jax.data.features")

  def batches(seed):
    ds = tasks.get_dataset(names["vpd"], LENGTHS, features.VLMFeatureConverter(16, pack=False),
                           shuffle=True, seed=seed, num_epochs=None, batch_size=4)
    return list(ds.take(3).as_numpy_iterator())

  a, b = batches(3), batches(3)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, batches(4)))


def test_registration_is_idempotent(trace_dir, vocab):
  tasks.register_trace_tasks("shapes_twice", {"train": trace_dir}, vocab)
  again = tasks.register_trace_tasks("shapes_twice", {"train": trace_dir}, vocab,
                                     prompts={"direct": "say: {question}"})
  ex = _examples(again["direct"])[0]
  assert ex["prefix_pretokenized"].decode().startswith("say: ")


def test_unknown_task_lists_close_names(names):
  with pytest.raises(ValueError, match=r"'shapes_t\.cto'.*close names: shapes_t\.cot"):
    tasks.get_task_or_mixture("shapes_t.cto")
  with pytest.raises(ValueError, match="close names"):
    tasks.get_dataset("shapes_t.vdp", LENGTHS, seqio.PassThroughFeatureConverter())


def test_missing_or_empty_directory_is_named(tmp_path, vocab):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"{missing}.*'train'.*does not exist"):
    tasks.register_trace_tasks("shapes_missing", {"train": missing}, vocab)
  with pytest.raises(FileNotFoundError, match="holds no traces-"):
    tasks.register_trace_tasks("shapes_missing", {"validation": str(tmp_path)}, vocab)


def _write_shard(directory, serialized):
  with tf.io.TFRecordWriter(os.path.join(directory, records.shard_name(0, 1))) as writer:
    for data in serialized:
      writer.write(data)
  return str(directory)


@pytest.fixture(scope="module")
def bad_records_(tmp_path_factory, trace_records):
  """Six good records, one without 'answer' and one with garbage image bytes (serialised)."""
  good = sorted(trace_records.values(), key=lambda r: r.example_id)[:6]
  no_answer = good[0].to_example()
  del no_answer.features.feature["answer"]
  no_answer.features.feature["example_id"].bytes_list.value[:] = [b"bad-no-answer"]
  garbage = records.TraceRecord(**{**good[1].__dict__, "example_id": "bad-garbage-image",
                                   "image": b"\x00\x01 these bytes are no image"})
  return ([r.serialize() for r in good], no_answer.SerializeToString(), garbage.serialize(),
          sorted(r.example_id for r in good))


def test_bad_records_stop_the_run_naming_record_and_field(tmp_path, bad_records_, vocab):
  good, no_answer, garbage, _ = bad_records_
  for name, bad, message in (
      ("answer", no_answer, "trace record bad-no-answer: field answer is missing"),
      ("image", garbage, "trace record bad-garbage-image: field image is not a PNG")):
    (tmp_path / name).mkdir()
    directory = _write_shard(tmp_path / name, [*good[:3], bad, *good[3:]])
    names = tasks.register_trace_tasks(f"shapes_strict_{name}", {"train": directory}, vocab,
                                       rates={"cot": 1, "direct": 1})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"task shapes_strict_{name}.direct: {message}"):
      _examples(names["direct"])


def test_bad_records_skipped_and_counted(tmp_path, bad_records_, vocab):
  good, no_answer, garbage, good_ids = bad_records_
  directory = _write_shard(tmp_path, [*good[:3], no_answer, garbage, *good[3:]])
  names = tasks.register_trace_tasks("shapes_lenient", {"train": directory}, vocab,
                                     rates={"cot": 1, "direct": 1}, skip_bad_records=True)
  got = sorted(ex["example_id"].decode() for ex in _examples(names["direct"]))
  assert got == good_ids
  report = tasks.bad_records(names["direct"])
  assert report["count"] == 2
  reasons = {label: reason for _, label, reason in report["records"]}
  assert reasons == {"trace record bad-no-answer": "field answer is missing",
                     "trace record bad-garbage-image":
                         f"field image is not a {prep.IMAGE_FORMATS} image"}
  _examples(names["cot"])
  assert tasks.bad_records(names["vpd"])["count"] == 4  # both tasks read both bad records
  counts = collections.Counter(t for t, _, _ in tasks.bad_records(names["vpd"])["records"])
  assert counts == {names["cot"]: 2, names["direct"]: 2}
  # Registering again starts the counts afresh.
  tasks.register_trace_tasks("shapes_lenient", {"train": directory}, vocab,
                             rates={"cot": 1, "direct": 1}, skip_bad_records=True)
  assert tasks.bad_records(names["vpd"])["count"] == 0
