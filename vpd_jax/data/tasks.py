"""seqio tasks and mixtures over trace records: VPD's multitask tuning data.

`register_trace_tasks(name, {"train": dir, "validation": dir2}, vocab)` registers

  NAME.cot     prompt "answer with a rationale: {question}" -> the rationale, which ends in the
               answer ("... So the answer is 3."); only records with has_program=1
  NAME.direct  prompt "answer: {question}" -> the short answer (first label); every record
  NAME.vpd     the mixture of both, by default in proportion to their example counts (from the
               directory's statistics.json), or at the rates a caller gives
  NAME.cot_all the rationale prompt on every record -> the short answer: for evaluation only (not in
               the mixture), so a model prompted for a rationale is scored by its final answer on
               the same questions as NAME.direct, not only on those a program solved

Records come from the `traces-*-of-*.tfrecord` shards `vpd-jax traces` writes (programs/records.py).
Host sharding: `seqio.get_dataset(..., shard_info=seqio.ShardInfo(index, num_shards))` gives each host
whole shard files when there are at least as many files as hosts, otherwise every num_shards-th
record (read in a fixed order first, so the split does not depend on the seed). Shuffling happens on
the encoded records, before images are decoded, so the shuffle buffer holds compressed bytes rather
than float images.

Registration is idempotent: an existing task or mixture of the same name is replaced.
"""

import difflib
import functools
import json
import math
import os
from typing import Mapping, Optional, Union

from absl import logging
import seqio
import tensorflow as tf

from vpd_jax.data import preprocessors as prep
from vpd_jax.programs import records

FILE_PATTERN = "traces-*-of-*.tfrecord"
TASK_KINDS = ("cot", "direct")
MIXTURE_SUFFIX = "vpd"
# Evaluation-only kind: the rationale prompt over every record, target the short answer.
COT_ALL = "cot_all"
# Encoded records held for shuffling: a ShapesVQA record is about 3 KB, a photograph 50-200 KB.
DEFAULT_SHUFFLE_BUFFER = 1000
_STRING_FIELDS = ("example_id", "image", "question", "answers", "answer", "family", "rationale")
# Every field as a list, so that a missing field parses to an empty list (and is reported by name)
# instead of failing inside tf.io.parse_single_example with no record named. The candidate fields
# (candidate_programs, ...) are not needed for tuning and are not parsed.
FEATURE_DESCRIPTION = {
    **{field: tf.io.RaggedFeature(tf.string) for field in _STRING_FIELDS},
    "has_program": tf.io.RaggedFeature(tf.int64),
}
_REQUIRED = ("example_id", "image", "question", "answers", "answer", "family")
_NON_EMPTY = ("example_id", "question", "answer")
_BAD_RECORDS: dict[str, prep.BadRecords] = {}


class TraceDataSource(seqio.TFExampleDataSource):
  """trace shards of one directory per split; shards and shuffles itself (see the module docstring)."""

  def __init__(self, split_to_dir: Mapping[str, str], shuffle_buffer_size: int,
               seed_offset: int = 0):
    super().__init__(
        {split: os.path.join(d, FILE_PATTERN) for split, d in split_to_dir.items()},
        FEATURE_DESCRIPTION, performs_internal_shuffling=True)
    self._shuffle_buffer_size = shuffle_buffer_size
    # seqio gives every task of a mixture the same seed; tasks reading the same records add
    # different offsets so that they do not visit them in the same order.
    self._seed_offset = seed_offset

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    return sorted(tf.io.gfile.glob(self._split_to_filepattern[split]))

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **unused) -> tf.data.Dataset:
    if split not in self._split_to_filepattern:
      raise ValueError(f"split {split!r} is unknown; expected one of {sorted(self.splits)}")
    files = self.list_shards(split)
    if not files:
      raise FileNotFoundError(f"no trace shards match {self._split_to_filepattern[split]!r}")
    hosts, index = (shard_info.num_shards, shard_info.index) if shard_info else (1, 0)
    seed = None if seed is None else seed + self._seed_offset
    by_file = hosts > 1 and len(files) >= hosts
    by_record = hosts > 1 and not by_file
    if by_file:
      files = files[index::hosts]
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and not by_record:  # records are split in file order, the same on every host
      ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(16, len(files)), block_length=16,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if by_record:
      ds = ds.shard(hosts, index)
    if shuffle:
      ds = ds.shuffle(self._shuffle_buffer_size, seed=seed)
    return ds.map(self.parse_fn, num_parallel_calls=tf.data.AUTOTUNE)


def _trace_problem(features: dict, kind: str) -> tf.Tensor:
  """"" for a usable record, else the first problem ("field answer is missing")."""
  checks = [(tf.equal(tf.size(features[k]), 0), f"field {k} is missing") for k in _REQUIRED]
  checks += [(tf.equal(prep.first(features[k]), ""), f"field {k} is empty") for k in _NON_EMPTY]
  image = prep.image_problem(prep.first(features["image"]))
  checks.append((tf.not_equal(image, ""), image))
  if kind == "cot":
    has_program = tf.equal(prep.first(features["has_program"], 0), 1)
    checks.append((tf.logical_and(has_program, tf.equal(prep.first(features["rationale"]), "")),
                   "field rationale is empty although has_program=1"))
  return prep.first_problem(checks)


def _trace_label(features: dict) -> tf.Tensor:
  return tf.where(
      tf.size(features["example_id"]) > 0,
      tf.strings.join(["trace record ", prep.first(features["example_id"])]),
      tf.strings.join(["trace record with no example_id (question ",
                       prep.first(features["question"]), ")"]))


def read_trace_records(dataset: tf.data.Dataset, kind: str, task_name: str, skip: bool,
                       counter: prep.BadRecords) -> tf.data.Dataset:
  """Checks parsed records and flattens them to scalars; "cot" keeps has_program=1 only."""
  dataset = prep.check_records(
      dataset, functools.partial(_trace_problem, kind=kind), _trace_label, task_name,
      skip=skip, counter=counter, image_fn=lambda f: prep.first(f["image"]))

  def flatten(f):
    out = {k: prep.first(f[k]) for k in _STRING_FIELDS if k != "answers"}
    out["answers"] = tf.strings.reduce_join(f["answers"], separator=prep.ANSWER_SEPARATOR)
    out["has_program"] = prep.first(f["has_program"], 0)
    return out

  dataset = dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)
  if kind == "cot":
    dataset = dataset.filter(lambda f: tf.equal(f["has_program"], 1))
  return dataset


def add_task(name: str, **kwargs) -> seqio.Task:
  """seqio.TaskRegistry.add, replacing a task already registered under `name`."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def add_mixture(name: str, tasks, **kwargs) -> seqio.Mixture:
  """seqio.MixtureRegistry.add, replacing a mixture already registered under `name`."""
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, **kwargs)


def new_bad_records(task_name: str) -> prep.BadRecords:
  """A fresh skipped-record counter for `task_name` (re-registering a task starts it at zero)."""
  _BAD_RECORDS[task_name] = prep.BadRecords(task_name)
  return _BAD_RECORDS[task_name]


def bad_records(name: str) -> dict:
  """Records skipped so far by a task, or by every task of a mixture: {"count", "records"}.

  "records" lists (task, record label, reason) for the first skipped records of each task.
  """
  provider = get_task_or_mixture(name)
  names = [t.name for t in seqio.get_subtasks(provider)]
  counters = [_BAD_RECORDS[n] for n in names if n in _BAD_RECORDS]
  return {"count": sum(c.count for c in counters),
          "records": [(c.task_name, label, reason) for c in counters for label, reason in c.records]}


def get_task_or_mixture(name: str) -> Union[seqio.Task, seqio.Mixture]:
  """The registered task or mixture `name`; ValueError listing close names when there is none."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
  hint = f"close names: {', '.join(close)}" if close else f"{len(known)} are registered"
  raise ValueError(f"no seqio task or mixture is named {name!r}; {hint}")


def get_dataset(name: str, task_feature_lengths: Mapping[str, int],
                feature_converter: seqio.FeatureConverter, **kwargs) -> tf.data.Dataset:
  """seqio.get_dataset with an error naming close names for an unknown task or mixture."""
  return seqio.get_dataset(get_task_or_mixture(name), task_feature_lengths, feature_converter,
                           **kwargs)


def _check_trace_dirs(trace_dirs) -> dict:
  if isinstance(trace_dirs, str):
    trace_dirs = {"train": trace_dirs}
  if not isinstance(trace_dirs, Mapping) or not trace_dirs:
    raise ValueError(f"trace_dirs must map split names to directories, got {trace_dirs!r}")
  for split, directory in trace_dirs.items():
    if not tf.io.gfile.isdir(directory):
      raise FileNotFoundError(f"trace directory {directory!r} (split {split!r}) does not exist")
    if not tf.io.gfile.glob(os.path.join(directory, FILE_PATTERN)):
      raise FileNotFoundError(
          f"trace directory {directory!r} (split {split!r}) holds no {FILE_PATTERN} shards")
  return dict(trace_dirs)


def count_examples(trace_dir: str) -> dict:
  """{"direct": labelled records, "cot": records with has_program=1} of one trace directory.

  Read from statistics.json when the trace stage wrote one, otherwise counted from the shards.
  """
  path = os.path.join(trace_dir, records.STATISTICS_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      overall = json.load(f).get("all")
    if overall:
      return {"direct": int(overall["examples"]), "cot": int(overall["kept"])}
  description = {"has_program": tf.io.RaggedFeature(tf.int64)}
  ds = tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(trace_dir, FILE_PATTERN)))
  ds = ds.map(lambda s: prep.first(tf.io.parse_single_example(s, description)["has_program"], 0))
  counts = ds.reduce((tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
                     lambda acc, h: (acc[0] + 1, acc[1] + tf.cast(h == 1, tf.int64)))
  return {"direct": int(counts[0]), "cot": int(counts[1])}


def mixing_rates(rates: Optional[Mapping[str, float]], counts: Mapping[str, int]) -> dict:
  """Rates per task kind: `counts` when `rates` is None, else `rates` (a missing kind means 0)."""
  if rates is None:
    rates = dict(counts)
  elif not isinstance(rates, Mapping):
    raise ValueError(f"rates must be None or a dict over {TASK_KINDS}, got {rates!r}")
  unknown = set(rates) - set(TASK_KINDS)
  if unknown:
    raise ValueError(f"rates {sorted(unknown)} are unknown; expected keys from {TASK_KINDS}")
  out = {}
  for kind in TASK_KINDS:
    rate = rates.get(kind, 0)
    if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
      raise ValueError(f"rate {kind!r} = {rate!r} must be a finite number >= 0")
    out[kind] = float(rate)
  if not any(out.values()):
    raise ValueError(f"every mixing rate is zero ({out}); nothing to sample")
  return out


def register_trace_tasks(name: str, trace_dirs: Mapping[str, str], vocab: seqio.Vocabulary,
                         image_size: int = 224, prompts: Optional[Mapping[str, str]] = None,
                         rates: Optional[Mapping[str, float]] = None,
                         skip_bad_records: bool = False,
                         shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER) -> dict:
  """Registers NAME.cot, NAME.direct, the mixture NAME.vpd and the evaluation task NAME.cot_all;
  returns {"cot", "direct", "vpd", "cot_all"}.

  trace_dirs: split -> trace directory (a single path means {"train": path}). prompts: overrides of
  `preprocessors.DEFAULT_PROMPTS`. rates: {"cot": r1, "direct": r2}; by default the example counts
  of the "train" split (or the first split). A task with rate 0 is left out of the mixture.
  skip_bad_records: skip and count malformed records (`bad_records(name)`) instead of stopping.
  """
  trace_dirs = _check_trace_dirs(trace_dirs)
  templates = prep.resolve_prompts(prompts)
  if not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  count_split = "train" if "train" in trace_dirs else next(iter(trace_dirs))
  counts = count_examples(trace_dirs[count_split]) if rates is None else {}
  kind_rates = mixing_rates(rates, counts)
  names = {}
  # (kind, records kept as for, prompt, target field)
  specs = [("cot", "cot", "cot", "rationale"), ("direct", "direct", "direct", "answer"),
           (COT_ALL, "direct", "cot", "answer")]
  for offset, (kind, records_kind, prompt, target) in enumerate(specs):
    task_name = f"{name}.{kind}"
    counter = new_bad_records(task_name)
    add_task(
        task_name, source=TraceDataSource(trace_dirs, shuffle_buffer_size, seed_offset=offset),
        output_features=prep.output_features(vocab),
        preprocessors=[
            functools.partial(read_trace_records, kind=records_kind, task_name=task_name,
                              skip=skip_bad_records, counter=counter),
            functools.partial(prep.format_prompt, template=templates[prompt],
                              suffix_key=target),
            functools.partial(prep.decode_images, image_size=image_size),
            *prep.TOKENIZE_STEPS,
        ],
        shuffle_buffer_size=None)  # the source shuffles encoded records
    names[kind] = task_name
  mixture = f"{name}.{MIXTURE_SUFFIX}"
  members = [(names[k], r) for k, r in kind_rates.items() if r > 0]
  for kind, rate in kind_rates.items():
    if rate == 0:
      logging.warning("mixture %s: task %s has rate 0 and is left out", mixture, names[kind])
  add_mixture(mixture, members)
  names[MIXTURE_SUFFIX] = mixture
  return names
