"""Trace records: one verified (or unverified) example, stored as a `tf.train.Example` in TFRecord shards.

A shard is written whole, under a temporary name, and renamed into place, so a reader never sees half a
shard and an interrupted run leaves only complete shards behind. The statistics of a run are computed
from the records themselves (`compute_statistics`), so a run resumed over several invocations reports the
same numbers as one that ran straight through.

Fields of a record (feature name: type):
  example_id: bytes; image: PNG bytes; question: bytes; answers: bytes list; answer: bytes (first label);
  family: bytes; has_program: int (1 when a candidate passed); program, rationale, trace: bytes (the kept
  program, its chain of thought, its trace as JSON; empty when none passed); candidates_tried,
  candidates_passed: int; candidate_programs, candidate_statuses, candidate_answers: bytes lists;
  candidate_outcomes: int list (`verify.Outcome`, for ranking programs later).
"""

import collections
import dataclasses
import json
import os
from typing import Iterable, Iterator

import tensorflow as tf

SHARD_PATTERN = "traces-{index:05d}-of-{count:05d}.tfrecord"
STATISTICS_FILE = "statistics.json"

_BYTES = ("example_id", "image", "question", "answer", "family", "program", "rationale", "trace")
_BYTES_LISTS = ("answers", "candidate_programs", "candidate_statuses", "candidate_answers")
_INTS = ("has_program", "candidates_tried", "candidates_passed")
_INT_LISTS = ("candidate_outcomes",)
_REQUIRED = ("example_id", "image", "question", "answers", "answer", "family")
_TEXT = ("example_id", "question", "answer", "family", "program", "rationale", "trace")


@dataclasses.dataclass
class TraceRecord:
  example_id: str
  image: bytes  # PNG
  question: str
  answers: list[str]
  family: str
  program: str = ""
  rationale: str = ""
  trace: str = "[]"
  candidate_programs: list[str] = dataclasses.field(default_factory=list)
  candidate_statuses: list[str] = dataclasses.field(default_factory=list)
  candidate_answers: list[str] = dataclasses.field(default_factory=list)
  candidate_outcomes: list[int] = dataclasses.field(default_factory=list)

  @property
  def answer(self) -> str:
    return self.answers[0] if self.answers else ""

  @property
  def has_program(self) -> bool:
    return bool(self.program)

  @property
  def candidates_tried(self) -> int:
    return len(self.candidate_programs)

  @property
  def candidates_passed(self) -> int:
    return sum(1 for o in self.candidate_outcomes if o == 3)

  def to_example(self) -> tf.train.Example:
    def b(values):
      return tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]))

    def i(values):
      return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))

    feature = {name: b([getattr(self, name)]) for name in _BYTES}
    feature.update({name: b(getattr(self, name)) for name in _BYTES_LISTS})
    feature.update({name: i([getattr(self, name)]) for name in _INTS})
    feature.update({name: i(getattr(self, name)) for name in _INT_LISTS})
    return tf.train.Example(features=tf.train.Features(feature=feature))

  def serialize(self) -> bytes:
    return self.to_example().SerializeToString()

  @classmethod
  def parse(cls, data: bytes, where: str = "record") -> "TraceRecord":
    """Parses a serialised record; `where` names it in errors ("record 17 in traces-00003-...")."""
    example = tf.train.Example()
    try:
      example.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
      raise ValueError(f"trace {where}: not a tf.train.Example ({e})") from None
    feature = example.features.feature
    for name in _REQUIRED:
      if name not in feature:
        raise ValueError(f"trace {where}: field {name!r} is missing")

    def values(name):
      if name not in feature:
        return []
      f = feature[name]
      return list(f.int64_list.value) if name in _INTS + _INT_LISTS else list(f.bytes_list.value)

    def text(name):
      got = values(name)
      return got[0].decode("utf-8") if got else ""

    record = cls(
        example_id=text("example_id"),
        image=values("image")[0] if values("image") else b"",
        question=text("question"),
        answers=[v.decode("utf-8") for v in values("answers")],
        family=text("family"),
        program=text("program"),
        rationale=text("rationale"),
        trace=text("trace") or "[]",
        candidate_programs=[v.decode("utf-8") for v in values("candidate_programs")],
        candidate_statuses=[v.decode("utf-8") for v in values("candidate_statuses")],
        candidate_answers=[v.decode("utf-8") for v in values("candidate_answers")],
        candidate_outcomes=[int(v) for v in values("candidate_outcomes")],
    )
    if not record.image:
      raise ValueError(f"trace {where}: field 'image' is empty")
    if not record.answers:
      raise ValueError(f"trace {where}: field 'answers' is empty")
    return record


def shard_name(index: int, count: int) -> str:
  return SHARD_PATTERN.format(index=index, count=count)


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename (works on local disk and GCS)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_jsonl(path: str) -> list[dict]:
  """The objects of a JSON-lines file (one per line, e.g. a training run's metrics.jsonl), in file
  order; a line that is not JSON raises ValueError naming the file and the line."""
  entries = []
  with tf.io.gfile.GFile(path) as f:
    for n, line in enumerate(f, 1):
      try:
        entries.append(json.loads(line))
      except ValueError as e:
        raise ValueError(f"{path}, line {n}: not JSON ({e})") from e
  return entries


def write_shard(path: str, records: Iterable[TraceRecord]) -> int:
  """Writes records, sorted by example id, to one TFRecord shard atomically; returns the count."""
  ordered = sorted(records, key=lambda r: r.example_id)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in ordered:
      writer.write(record.serialize())
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return len(ordered)


def shard_paths(directory: str) -> list[str]:
  """The complete shards in `directory`, sorted (temporary files are ignored)."""
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(f"trace directory {directory!r} does not exist")
  names = [n for n in tf.io.gfile.listdir(directory)
           if n.startswith("traces-") and n.endswith(".tfrecord")]
  return [os.path.join(directory, n) for n in sorted(names)]


def read_records(directory: str) -> Iterator[TraceRecord]:
  """Every record of every complete shard in `directory`."""
  paths = shard_paths(directory)
  if not paths:
    raise FileNotFoundError(f"trace directory {directory!r} holds no traces-*.tfrecord shards")
  for path in paths:
    name = os.path.basename(path)
    for n, data in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
      yield TraceRecord.parse(data, where=f"record {n} in {name}")


def compute_statistics(records: Iterable[TraceRecord]) -> dict:
  """Per-family and overall counts: examples, sampled, executed, passed, kept, failure reasons."""
  per_family = collections.defaultdict(lambda: {
      "examples": 0, "sampled": 0, "executed": 0, "passed": 0, "kept": 0,
      "failure_reasons": collections.Counter()})
  for record in records:
    for key in (record.family, "all"):
      s = per_family[key]
      s["examples"] += 1
      s["sampled"] += record.candidates_tried
      s["executed"] += sum(1 for st in record.candidate_statuses if st == "ok")
      s["passed"] += record.candidates_passed
      s["kept"] += int(record.has_program)
      for status, outcome in zip(record.candidate_statuses, record.candidate_outcomes):
        if outcome != 3:
          s["failure_reasons"]["wrong_answer" if status == "ok" else status] += 1
  result = {}
  for family in sorted(per_family, key=lambda f: (f == "all", f)):
    s = per_family[family]
    s["failure_reasons"] = dict(sorted(s["failure_reasons"].items()))
    s["pass_rate"] = s["passed"] / s["sampled"] if s["sampled"] else 0.0
    s["kept_rate"] = s["kept"] / s["examples"] if s["examples"] else 0.0
    result[family] = s
  return result


def format_statistics(stats: dict) -> str:
  """A plain-text table of `compute_statistics` output."""
  reasons = sorted({r for s in stats.values() for r in s["failure_reasons"]})
  header = ["family", "examples", "sampled", "executed", "passed", "pass%", "kept", "kept%"] + reasons
  rows = []
  for family, s in stats.items():
    rows.append([family, s["examples"], s["sampled"], s["executed"], s["passed"],
                 f"{100 * s['pass_rate']:.1f}", s["kept"], f"{100 * s['kept_rate']:.1f}"]
                + [s["failure_reasons"].get(r, 0) for r in reasons])
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

  def line(cells):
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))

  out = [line(header), line(["-" * w for w in widths])]
  out += [line(r) for r in rows]
  if reasons:
    out.append("failure reasons count candidates; pass% = passed/sampled, kept% = kept/examples.")
  return "\n".join(out)


def write_statistics(directory: str, stats: dict) -> str:
  path = os.path.join(directory, STATISTICS_FILE)
  write_atomic(path, json.dumps(stats, indent=2, sort_keys=True).encode("utf-8"))
  return path
