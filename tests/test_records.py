"""Tests for vpd_jax.programs.records."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from vpd_jax.programs import records
from vpd_jax.programs.sources import encode_png


def _record(i, family="count", passed=True):
  return records.TraceRecord(
      example_id=f"ex-{i:03d}", image=encode_png(np.full((8, 8, 3), i, np.uint8)),
      question=f"How many circles are there? {i}", answers=["2", "two"], family=family,
      program="def execute_command(image):\n  return 2\n" if passed else "",
      rationale="I count. So the answer is 2." if passed else "",
      trace=json.dumps([{"call": "count"}]) if passed else "[]",
      candidate_programs=["p0", "p1", "p2"], candidate_statuses=["ok", "timeout", "ok"],
      candidate_answers=["2", "", "3"],
      candidate_outcomes=[3, 1, 2] if passed else [2, 1, 0])


def test_round_trip():
  r = _record(1)
  back = records.TraceRecord.parse(r.serialize())
  assert back == r
  assert back.answer == "2" and back.has_program and back.candidates_tried == 3
  assert back.candidates_passed == 1
  features = r.to_example().features.feature
  assert features["has_program"].int64_list.value == [1]
  assert features["candidates_passed"].int64_list.value == [1]


def test_malformed_records_are_named():
  example = _record(1).to_example()
  del example.features.feature["answer"]
  with pytest.raises(ValueError, match="trace record 17 in shard-3: field 'answer' is missing"):
    records.TraceRecord.parse(example.SerializeToString(), where="record 17 in shard-3")
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    records.TraceRecord.parse(b"\xff\xff garbage", where="record 0")


def test_write_shard_sorted_atomic_and_read(tmp_path):
  path = str(tmp_path / records.shard_name(0, 2))
  assert records.write_shard(path, [_record(3), _record(1), _record(2)]) == 3
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary left behind
  # A stray temporary file from an interrupted writer is not a shard.
  (tmp_path / (records.shard_name(1, 2) + ".tmp-123")).write_bytes(b"partial")
  got = list(records.read_records(str(tmp_path)))
  assert [r.example_id for r in got] == ["ex-001", "ex-002", "ex-003"]


def test_read_records_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    list(records.read_records(str(tmp_path / "missing")))
  with pytest.raises(FileNotFoundError, match="holds no traces"):
    list(records.read_records(str(tmp_path)))
  with tf.io.TFRecordWriter(str(tmp_path / records.shard_name(0, 1))) as w:
    w.write(_record(0).serialize())
    w.write(b"not an example")
  with pytest.raises(ValueError, match="record 1 in traces-00000-of-00001.tfrecord"):
    list(records.read_records(str(tmp_path)))


def test_statistics_hand_computed():
  stats = records.compute_statistics(
      [_record(0, "count"), _record(1, "count", passed=False), _record(2, "exist")])
  count = stats["count"]
  assert (count["examples"], count["sampled"], count["executed"], count["passed"],
          count["kept"]) == (2, 6, 4, 1, 1)
  # Record 0 fails one candidate by timeout and one by a wrong answer; record 1 fails all three, and
  # a candidate that ran ("ok") but did not pass counts as a wrong answer.
  assert count["failure_reasons"] == {"timeout": 2, "wrong_answer": 3}
  assert count["pass_rate"] == pytest.approx(1 / 6)
  assert count["kept_rate"] == pytest.approx(0.5)
  assert stats["all"]["examples"] == 3 and list(stats)[-1] == "all"
  table = records.format_statistics(stats)
  assert "family" in table.splitlines()[0] and "wrong_answer" in table
  assert any(line.startswith("count ") and " 16.7 " in line for line in table.splitlines())


def test_read_jsonl_keeps_file_order_and_names_a_bad_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2, "loss": 1.5}\n{"step": 1}\n')
  assert records.read_jsonl(str(path)) == [{"step": 2, "loss": 1.5}, {"step": 1}]
  path.write_text('{"step": 1}\n{"step": 2, "loss": \n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
    records.read_jsonl(str(path))
