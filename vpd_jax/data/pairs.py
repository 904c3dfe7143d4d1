"""Preference-pair records and their seqio task: the DPO training data.

A pair record (a tf.train.Example in `pairs-*-of-*.tfrecord` shards, written by `vpd-jax pairs`)
holds one question and two of the model's own chains of thought for it, one whose final answer
matches the label (chosen) and one whose answer does not (rejected):

  example_id, image, question, family, prompt   bytes
  answers                                       bytes list (every reference answer)
  prompt_tokens, chosen_tokens, rejected_tokens int64 lists: the exact token ids that were sampled
                                                (a chain that stopped ends in EOS)
  chosen_text, rejected_text, chosen_answer, rejected_answer   bytes (for reading and auditing)
  ref_chosen_logp, ref_rejected_logp            float lists, empty or one value: the reference
                                                model's log-probability of each chain

Token ids are stored rather than text because DPO compares log-probabilities of exactly the
sampled sequences; decoding and re-encoding text need not give back the same ids.

`register_pair_task(name, {"train": dir}, vocab, image_size, with_reference)` registers a seqio
task whose examples are {"image", "prefix", "chosen", "rejected"[, "ref_logp"]}, and
`PairFeatureConverter` turns them into pair rows: each pair gives a chosen row and a rejected row
laid out as VLMFeatureConverter's unpacked rows (same prompt, same image), stacked to [2, L].
"""

import dataclasses
import functools
import os
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from vpd_jax.data import features
from vpd_jax.data import preprocessors as prep
from vpd_jax.data import tasks

FILE_PATTERN = "pairs-*-of-*.tfrecord"
SHARD_PATTERN = "pairs-{index:05d}-of-{count:05d}.tfrecord"
MANIFEST_FILE = "manifest.json"
_BYTES = ("example_id", "image", "question", "family", "prompt", "chosen_text", "rejected_text",
          "chosen_answer", "rejected_answer")
_TOKENS = ("prompt_tokens", "chosen_tokens", "rejected_tokens")
_REFERENCE = ("ref_chosen_logp", "ref_rejected_logp")
FEATURE_DESCRIPTION = {
    **{k: tf.io.RaggedFeature(tf.string) for k in _BYTES + ("answers",)},
    **{k: tf.io.RaggedFeature(tf.int64) for k in _TOKENS},
    **{k: tf.io.RaggedFeature(tf.float32) for k in _REFERENCE},
}
_REQUIRED_TEXT = ("example_id", "image", "question", "answers")
# The row features of a pair, int32 [2, L] (VLMFeatureConverter's, for the chosen and rejected row).
_ROW_FEATURES = ("tokens", "targets", "loss_mask", "ar_flag", "positions", "segment_ids",
                 "image_slot")


@dataclasses.dataclass
class PairRecord:
  """One preference pair; see the module docstring for the fields."""
  example_id: str
  image: bytes
  question: str
  answers: Sequence[str]
  family: str
  prompt: str
  prompt_tokens: Sequence[int]
  chosen_tokens: Sequence[int]
  rejected_tokens: Sequence[int]
  chosen_text: str
  rejected_text: str
  chosen_answer: str
  rejected_answer: str
  ref_chosen_logp: Optional[float] = None
  ref_rejected_logp: Optional[float] = None

  def to_example(self) -> tf.train.Example:
    def text(value):
      return tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[value if isinstance(value, bytes) else value.encode("utf-8")]))
    feature = {k: text(getattr(self, k)) for k in _BYTES}
    feature["answers"] = tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[a.encode("utf-8") for a in self.answers]))
    for k in _TOKENS:
      feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(getattr(self, k))))
    for k in _REFERENCE:
      value = getattr(self, k)
      feature[k] = tf.train.Feature(float_list=tf.train.FloatList(
          value=[] if value is None else [float(value)]))
    return tf.train.Example(features=tf.train.Features(feature=feature))

  def serialize(self) -> bytes:
    return self.to_example().SerializeToString()

  @classmethod
  def parse(cls, data: bytes) -> "PairRecord":
    feature = tf.train.Example.FromString(data).features.feature
    def text(k):
      values = feature[k].bytes_list.value
      return values[0] if k == "image" else values[0].decode("utf-8")
    kwargs = {k: text(k) for k in _BYTES}
    kwargs["answers"] = [a.decode("utf-8") for a in feature["answers"].bytes_list.value]
    kwargs.update({k: list(feature[k].int64_list.value) for k in _TOKENS})
    for k in _REFERENCE:
      values = feature[k].float_list.value
      kwargs[k] = float(values[0]) if values else None
    return cls(**kwargs)


class PairDataSource(tasks.TraceDataSource):
  """Pair shards of one directory per split, sharded over hosts and shuffled like trace shards."""

  def __init__(self, split_to_dir: Mapping[str, str], shuffle_buffer_size: int):
    seqio.TFExampleDataSource.__init__(
        self, {split: os.path.join(d, FILE_PATTERN) for split, d in split_to_dir.items()},
        FEATURE_DESCRIPTION, performs_internal_shuffling=True)
    self._shuffle_buffer_size = shuffle_buffer_size
    self._seed_offset = 0


def _pair_problem(f: dict, with_reference: bool) -> tf.Tensor:
  checks = [(tf.equal(tf.size(f[k]), 0), f"field {k} is missing") for k in _REQUIRED_TEXT]
  checks += [(tf.equal(tf.size(f[k]), 0), f"field {k} is empty") for k in _TOKENS]
  if with_reference:
    checks += [(tf.equal(tf.size(f[k]), 0),
                f"field {k} is missing (the pairs were written without reference log-probs; "
                "use reference=on_the_fly)") for k in _REFERENCE]
  image = prep.image_problem(prep.first(f["image"]))
  checks.append((tf.not_equal(image, ""), image))
  return prep.first_problem(checks)


def read_pair_records(dataset: tf.data.Dataset, task_name: str,
                      with_reference: bool) -> tf.data.Dataset:
  """Checks parsed pair records (stopping at a bad one, naming it) and flattens them."""
  dataset = prep.check_records(
      dataset, functools.partial(_pair_problem, with_reference=with_reference),
      lambda f: tf.strings.join(["pair record ", prep.first(f["example_id"])]), task_name,
      image_fn=lambda f: prep.first(f["image"]))

  def flatten(f):
    out = {"image": prep.first(f["image"]),
           "prefix": tf.cast(f["prompt_tokens"], tf.int32),
           "chosen": tf.cast(f["chosen_tokens"], tf.int32),
           "rejected": tf.cast(f["rejected_tokens"], tf.int32),
           "example_id": prep.first(f["example_id"]), "family": prep.first(f["family"]),
           "answers": tf.strings.reduce_join(f["answers"], separator=prep.ANSWER_SEPARATOR)}
    if with_reference:
      out["ref_logp"] = tf.stack([f["ref_chosen_logp"][0], f["ref_rejected_logp"][0]])
    return out
  return dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)


def register_pair_task(name: str, pair_dirs: Mapping[str, str], vocab: seqio.Vocabulary,
                       image_size: int, with_reference: bool,
                       shuffle_buffer_size: int = tasks.DEFAULT_SHUFFLE_BUFFER) -> str:
  """Registers (or replaces) the seqio task `name` over pair shards; returns `name`.

  pair_dirs: split -> directory written by `vpd-jax pairs` (a single path means {"train": path}).
  with_reference: also emit "ref_logp" [2] from the records (which must then carry them).
  """
  if isinstance(pair_dirs, str):
    pair_dirs = {"train": pair_dirs}
  for split, directory in pair_dirs.items():
    if not tf.io.gfile.glob(os.path.join(directory, FILE_PATTERN)):
      raise FileNotFoundError(f"pair directory {directory!r} (split {split!r}) holds no "
                              f"{FILE_PATTERN} shards; write them with `vpd-jax pairs`")
  output_features = {
      "image": seqio.ContinuousFeature(dtype=tf.float32, rank=3),
      "prefix": seqio.Feature(vocab, add_eos=False),
      "chosen": seqio.Feature(vocab, add_eos=False),
      "rejected": seqio.Feature(vocab, add_eos=False),
  }
  if with_reference:
    output_features["ref_logp"] = seqio.ContinuousFeature(dtype=tf.float32, rank=1)
  tasks.add_task(
      name, source=PairDataSource(pair_dirs, shuffle_buffer_size),
      output_features=output_features,
      preprocessors=[
          functools.partial(read_pair_records, task_name=name, with_reference=with_reference),
          functools.partial(prep.decode_images, image_size=image_size),
      ],
      shuffle_buffer_size=None)  # the source shuffles encoded records
  return name


def _pad_to(tokens: tf.Tensor, width: int) -> tf.Tensor:
  return tf.ensure_shape(tf.pad(tokens, [[0, width - tf.shape(tokens)[0]]]), [width])


class PairFeatureConverter(seqio.FeatureConverter):
  """(image, prefix, chosen, rejected[, ref_logp]) examples -> pair rows (see the module docstring).

  Output per pair: the row features of VLMFeatureConverter's unpacked rows as int32 [2, L] (row 0
  chosen, row 1 rejected), "images" float32 [1, H, W, 3] and, with `with_reference`, "ref_logp"
  float32 [2]. L = num_image_tokens + P + S. Lengths may be given as {"prefix": P, "suffix": S}
  (the training input's lengths) or {"prefix": P, "chosen": S, "rejected": S}. Over-long
  sequences are cut like VLMFeatureConverter cuts them.
  """

  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                   for k in ("prefix", "chosen", "rejected")}

  def __init__(self, num_image_tokens: int, with_reference: bool = False):
    self._rows = features.VLMFeatureConverter(num_image_tokens, pack=False)
    self._with_reference = bool(with_reference)
    spec = seqio.FeatureConverter.FeatureSpec
    model = {k: spec(dtype=tf.int32, rank=2, sequence_dim=1) for k in _ROW_FEATURES}
    model["images"] = spec(dtype=tf.float32, rank=4)
    if with_reference:
      model["ref_logp"] = spec(dtype=tf.float32, rank=1)
    self.MODEL_FEATURES = model  # pylint: disable=invalid-name
    super().__init__(pack=False, apply_length_check=False)

  @property
  def with_reference(self) -> bool:
    return self._with_reference

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    lengths = dict(task_feature_lengths)
    if "suffix" in lengths:
      suffix = lengths.pop("suffix")
      lengths.setdefault("chosen", suffix)
      lengths.setdefault("rejected", suffix)
    lengths = {k: v for k, v in lengths.items() if k in self.TASK_FEATURES}
    if self._with_reference and "ref_logp" not in ds.element_spec:
      raise ValueError("PairFeatureConverter(with_reference=True): the pair examples carry no "
                       f"'ref_logp'; their features are {sorted(ds.element_spec)}")
    return super().__call__(ds, lengths)

  def _lengths(self, task_feature_lengths):
    prefix = task_feature_lengths["prefix"]
    suffix = task_feature_lengths["chosen"]
    if task_feature_lengths["rejected"] != suffix:
      raise ValueError(f"PairFeatureConverter: chosen and rejected lengths must be equal, got "
                       f"{suffix} and {task_feature_lengths['rejected']}")
    return int(prefix), int(suffix)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    prefix, suffix = self._lengths(task_feature_lengths)
    row_length = self._rows.get_model_feature_lengths({"prefix": prefix, "suffix": suffix})
    lengths = {k: row_length[k] for k in _ROW_FEATURES}
    lengths["images"] = 1
    if self._with_reference:
      lengths["ref_logp"] = 2
    return lengths

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    prefix_len, suffix_len = self._lengths(task_feature_lengths)
    image_shape = features._check_image_spec(ds.element_spec)  # pylint: disable=protected-access

    def convert(ex):
      image = tf.ensure_shape(ex["image"], image_shape)
      prefix = ex["prefix"][:prefix_len]
      rows = []
      for key in ("chosen", "rejected"):
        suffix = ex[key][:suffix_len]
        rows.append(self._rows._pad_example({  # pylint: disable=protected-access
            "image": image, "prefix": _pad_to(prefix, prefix_len),
            "suffix": _pad_to(suffix, suffix_len), "prefix_len": tf.shape(prefix)[0],
            "suffix_len": tf.shape(suffix)[0]}))
      out = {k: tf.stack([rows[0][k], rows[1][k]]) for k in _ROW_FEATURES}
      out["images"] = image[None]
      if self._with_reference:
        out["ref_logp"] = tf.ensure_shape(tf.cast(ex["ref_logp"], tf.float32), [2])
      return out
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
