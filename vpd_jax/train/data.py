"""The training input: host-local numpy batches of a seqio task or mixture, resumable exactly.

`TrainInput` reads `seqio.get_dataset(name, ..., feature_converter=VLMFeatureConverter(...))` with
host sharding `seqio.ShardInfo(jax.process_index(), jax.process_count())`; each host gets
`batch_size // process_count` rows per batch, and `sharding.shard_batch` assembles the global batch.

Position. `position` counts the batches handed out. The pipeline is deterministic for a given seed
(seeded shuffles and mixture sampling, order-preserving parallel maps), so a resumed run re-creates
it with the same seed and skips `position` batches inside tf.data: it then sees exactly the batches
an uninterrupted run would have seen. tf.data's own iterator checkpoints are not used because a
pipeline that skips bad records (a `tf.py_function` filter) cannot be serialised. Skipping costs a
pass over the consumed batches, decoding included, at tf.data speed (no model work).

`state()` holds the position with a fingerprint of the stream (task, split, seed, batch size,
lengths, packing, host count); `restore(state)` refuses a state whose stream differs, because its
position would then point at different batches.
"""

import dataclasses
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf

from vpd_jax.data import features
from vpd_jax.data import pairs
from vpd_jax.data import tasks


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What fixes a stream of batches; two runs with equal InputConfigs see the same batches."""
  name: str  # seqio task or mixture
  task_feature_lengths: Mapping[str, int]  # {"prefix": P, "suffix": S}
  batch_size: int  # global, over all hosts
  num_image_tokens: int
  split: str = "train"
  seed: int = 0
  shuffle: bool = True
  pack: bool = True
  max_images_per_row: int = 4
  num_epochs: Optional[int] = None  # None repeats forever
  # The rows: "vlm" (VLMFeatureConverter), "pairs" or "pairs_with_reference" (data/pairs.py's
  # PairFeatureConverter, for DPO).
  converter: str = "vlm"

  def fingerprint(self, process_count: int) -> dict:
    # "converter" only when not the default, so that positions saved before it existed still match.
    extra = {} if self.converter == "vlm" else {"converter": self.converter}
    return {**extra, "name": self.name, "split": self.split, "seed": int(self.seed),
            "shuffle": bool(self.shuffle), "batch_size": int(self.batch_size),
            "task_feature_lengths": {k: int(v)
                                     for k, v in sorted(self.task_feature_lengths.items())},
            "num_image_tokens": int(self.num_image_tokens), "pack": bool(self.pack),
            "max_images_per_row": int(self.max_images_per_row),
            "num_epochs": self.num_epochs, "process_count": int(process_count)}


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows per host; every host feeds the same number of rows."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"batch_size {global_batch_size} must be a positive multiple of the number "
                     f"of hosts ({process_count})")
  return global_batch_size // process_count


def make_dataset(config: InputConfig, process_index: int, process_count: int,
                 skip_batches: int = 0) -> tf.data.Dataset:
  """This host's batched dataset of `config`, starting after `skip_batches` batches."""
  if config.converter == "vlm":
    converter = features.VLMFeatureConverter(
        config.num_image_tokens, pack=config.pack, max_images_per_row=config.max_images_per_row)
  elif config.converter in ("pairs", "pairs_with_reference"):
    converter = pairs.PairFeatureConverter(
        config.num_image_tokens, with_reference=config.converter == "pairs_with_reference")
  else:
    raise ValueError(f"input converter {config.converter!r} is unknown; expected vlm, pairs or "
                     "pairs_with_reference")
  ds = tasks.get_dataset(
      config.name, dict(config.task_feature_lengths), converter, dataset_split=config.split,
      shuffle=config.shuffle, seed=config.seed, num_epochs=config.num_epochs,
      shard_info=seqio.ShardInfo(process_index, process_count),
      batch_size=local_batch_size(config.batch_size, process_count), verbose=False)
  options = tf.data.Options()
  options.deterministic = True  # the exact-resume guarantee rests on a fixed order
  ds = ds.with_options(options)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.prefetch(2)


class TrainInput:
  """An iterator of host-local numpy batches whose position can be saved and restored.

  next(input) -> {"images": [b, M, H, W, 3] float32, "tokens", "targets", "loss_mask", "ar_flag",
  "positions", "segment_ids", "image_slot": [b, L] int32}, b = batch_size / process_count.
  """

  def __init__(self, config: InputConfig, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self.config = config
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_batch_size = local_batch_size(config.batch_size, self.process_count)
    self._position = 0
    self._iterator: Optional[Iterator] = None

  @property
  def position(self) -> int:
    """Batches handed out so far (restored ones included)."""
    return self._position

  def state(self) -> dict:
    """The position and the stream's fingerprint, JSON-serialisable."""
    return {"position": self._position, **self.config.fingerprint(self.process_count)}

  def restore(self, state: Mapping) -> None:
    """Continues after the batches `state` counts; ValueError if `state` is of another stream."""
    if not isinstance(state, Mapping):
      raise ValueError(f"expected a saved input position (a dict from TrainInput.state()), got "
                       f"{state!r}")
    expected = self.config.fingerprint(self.process_count)
    for key, value in expected.items():
      saved = state.get(key)
      if saved != value:
        raise ValueError(
            f"the saved input position is for a different stream: {key} was {saved!r} there and "
            f"is {value!r} in this run's config; resuming would not see the same batches")
    position = state.get("position")
    if not isinstance(position, int) or position < 0:
      raise ValueError(f"the saved input position {position!r} is not a count of batches")
    self._position = position
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      ds = make_dataset(self.config, self.process_index, self.process_count,
                        skip_batches=self._position)
      self._iterator = ds.as_numpy_iterator()
    batch = next(self._iterator)
    self._position += 1
    return batch


class EvalInput:
  """The first `num_batches` host-local batches of `config`, unshuffled; iterable again and again.

  Every host yields the same number of batches, so a sharded evaluation step never waits for a host
  that ran out; a split smaller than `num_batches` batches is read again from its start. The
  pipeline is built once and each iteration starts a fresh pass over it.
  """

  def __init__(self, config: InputConfig, num_batches: int, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    if num_batches < 1:
      raise ValueError(f"an evaluation needs at least one batch, got num_batches={num_batches}")
    self.config = dataclasses.replace(config, shuffle=False, num_epochs=None)
    self.num_batches = num_batches
    self._process_index = jax.process_index() if process_index is None else process_index
    self._process_count = jax.process_count() if process_count is None else process_count
    self._dataset: Optional[tf.data.Dataset] = None

  def __iter__(self) -> Iterator[dict]:
    if self._dataset is None:
      self._dataset = make_dataset(self.config, self._process_index,
                                   self._process_count).take(self.num_batches)
    return self._dataset.as_numpy_iterator()


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding positions of a batch (image tokens included): the tokens/s numerator."""
  return int(np.count_nonzero(batch["segment_ids"]))
