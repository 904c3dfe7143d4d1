"""Training checkpoints: the sharded train state plus the input position, written asynchronously.

`Checkpointer` wraps an orbax `CheckpointManager` over `WORKDIR/checkpoints/STEP/` with two items:

  state  the TrainState pytree (StandardSave; every host writes its own shards)
  meta   JSON: the model size, the shape of every state leaf, the data input's `state()` (its
         position, i.e. batches consumed, and the stream's fingerprint) and the step

Saves are asynchronous: `save` returns once the arrays are copied off the devices, so the next step
may donate them, and the files are written in the background. orbax writes each step into a
temporary directory and renames it into place when every host has finished, so a run killed in the
middle of a save leaves the previous checkpoints intact and no half-written one is ever restored.
`max_to_keep` bounds how many steps stay on disk. Call `wait_until_finished()` (or `close()`) before
the process exits.

`restore` reads `meta` first and refuses a checkpoint of another model size (naming both sizes) or
with differently shaped leaves (naming the leaf), then reads the state straight into the target's
shardings, which may differ from the shardings it was saved with.

`PreemptionSignal` turns SIGTERM into a flag the training loop checks once per step, so that a
preempted job saves at a step boundary and exits cleanly.
"""

import os
import signal
import threading
from typing import Any, Mapping, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"
_ITEMS = ("state", "meta")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


def leaf_shapes(tree) -> dict:
  """{"params/llm/embedding": [V, D], ...}: each leaf's shape under its key path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): [int(d) for d in leaf.shape] for path, leaf in flat}


def _path_name(path) -> str:
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


def abstract_like(tree):
  """Shapes, dtypes and shardings of a tree of arrays or ShapeDtypeStructs (restore targets)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
  """Periodic, asynchronous, bounded checkpoints of one training run (see the module docstring)."""

  def __init__(self, directory: str, model_size: str, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep}: keep at least one checkpoint (or None for all)")
    if "://" not in directory:
      directory = os.path.abspath(directory)  # orbax refuses relative paths
    self.directory = directory
    self.model_size = model_size
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Optional[Mapping] = None) -> bool:
    """Starts writing checkpoint `step`; False when that step is already on disk."""
    if step in self._manager.all_steps():
      return False
    meta = {"step": int(step), "model_size": self.model_size, "shapes": leaf_shapes(state),
            "data": dict(data_state) if data_state is not None else None}
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=True)
    if saved:
      logging.info("checkpoint %d: saving to %s", step, self.directory)
    return saved

  def read_meta(self, step: Optional[int] = None) -> dict:
    """The JSON metadata of checkpoint `step` (default: the latest)."""
    step = self._resolve(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step` (default: the latest), laid out like `target`.

    `target` is a tree of arrays or of `jax.ShapeDtypeStruct`s carrying shardings (for instance
    `jax.eval_shape` of the initialiser with the state's shardings); the restored arrays take its
    shardings. ValueError when the checkpoint is of another model size or another shape.
    """
    step = self._resolve(step)
    meta = self.read_meta(step)
    where = f"checkpoint {os.path.join(self.directory, str(step))}"
    saved_size = meta.get("model_size")
    if saved_size != self.model_size:
      raise ValueError(f"{where} holds model size {saved_size!r}, but this run's config has model "
                       f"size {self.model_size!r}; point workdir elsewhere or set "
                       f"size={saved_size}")
    _check_shapes(meta.get("shapes", {}), leaf_shapes(target), where)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target))))
    logging.info("%s: restored (data position %s)", where, (meta.get("data") or {}).get("position"))
    return restored["state"], meta

  def _resolve(self, step: Optional[int]) -> int:
    steps = self._manager.all_steps()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in steps:
      raise FileNotFoundError(f"checkpoint step {step} is not in {self.directory}; it holds steps "
                              f"{sorted(steps)}")
    return step

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def _check_shapes(saved: Mapping[str, list], wanted: Mapping[str, list], where: str) -> None:
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing or extra:
    raise ValueError(f"{where} has a different state structure: leaves missing there "
                     f"{missing[:5]}, leaves this run lacks {extra[:5]}")
  for name, shape in wanted.items():
    if list(saved[name]) != list(shape):
      raise ValueError(f"{where}: leaf {name} has shape {tuple(saved[name])} there but "
                       f"{tuple(shape)} in this run's state")


class PreemptionSignal:
  """A flag raised by SIGTERM (or by jax's preemption service across hosts), polled every step.

  One process: a SIGTERM handler sets the flag; `reached(step)` reports it. Several processes: the
  hosts must all save at the same step, so `reached` defers to
  `multihost_utils.reached_preemption_sync_point`, whose service (started by
  `jax.distributed.initialize`) catches the signal on any host and agrees on a step; no Python
  handler is installed then, as it would take the signal from that service.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._flag = threading.Event()
    self._previous = {}
    self._multi_host = jax.process_count() > 1
    if not self._multi_host and threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint at the end of this step", signum)
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self._multi_host:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self) -> None:
    """Puts back the handlers that were installed before."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
