"""Tests for vpd_jax/train/checkpoint.py and the resumable input of vpd_jax/train/data.py."""

import os
import signal
import threading

# A mesh needs several devices; on CPU they are faked, which must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import flax
import pytest

from vpd_jax.data import tasks
from vpd_jax.train import checkpoint
from vpd_jax.train import data


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array


def _mesh():
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices (XLA_FLAGS was set before this module), got {jax.device_count()}")
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _toy_state(mesh, seed=0, width=8):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "dense": {"kernel": jax.device_put(jax.random.normal(k1, (width, 16)),
                                         NamedSharding(mesh, P("fsdp", "data"))),
                "bias": jax.device_put(jax.random.normal(k2, (16,)), NamedSharding(mesh, P()))},
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # One update so that the moments are non-zero and differ from a fresh init.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return ToyState(jnp.asarray(7, jnp.int32), params, opt_state, jax.random.key(seed + 1))


def _arrays(tree):
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(tree)]


def test_round_trip_into_other_shardings(tmp_path):
  mesh = _mesh()
  state = _toy_state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), model_size="tiny")
  assert ckpt.save(7, state, {"position": 7})
  ckpt.close()

  # Restore in a fresh manager, into shardings unlike the saved ones.
  other = {"dense": {"kernel": NamedSharding(mesh, P(None, "fsdp")),
                     "bias": NamedSharding(mesh, P("fsdp"))}}
  target = checkpoint.abstract_like(state)
  target = target.replace(params=jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target.params, other))
  reader = checkpoint.Checkpointer(str(tmp_path / "ckpt"), model_size="tiny")
  restored, meta = reader.restore(target)
  assert meta["step"] == 7 and meta["data"] == {"position": 7}
  assert isinstance(restored, ToyState)
  for got, want in zip(_arrays(restored), _arrays(state)):
    np.testing.assert_array_equal(got, want)
  assert restored.params["dense"]["kernel"].sharding.spec == P(None, "fsdp")
  assert restored.params["dense"]["bias"].sharding.spec == P("fsdp")
  # The Adam moments follow the parameters' new layout only where asked; they keep their values.
  np.testing.assert_array_equal(np.asarray(restored.opt_state[0].mu["dense"]["kernel"]),
                                np.asarray(state.opt_state[0].mu["dense"]["kernel"]))
  assert int(restored.step) == 7
  reader.close()


def test_max_to_keep_and_latest(tmp_path):
  mesh = _mesh()
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, model_size="tiny", max_to_keep=2)
  for step in (2, 4, 6, 8):
    assert ckpt.save(step, _toy_state(mesh, seed=step), {"position": step})
  assert not ckpt.save(8, _toy_state(mesh), {"position": 8})  # already on disk
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [6, 8]
  assert ckpt.latest_step() == 8
  assert sorted(os.listdir(directory)) == ["6", "8"]  # no temporary directories left behind
  restored, meta = ckpt.restore(checkpoint.abstract_like(_toy_state(mesh)), step=6)
  for got, want in zip(_arrays(restored), _arrays(_toy_state(mesh, seed=6))):
    np.testing.assert_array_equal(got, want)
  assert meta["data"]["position"] == 6
  with pytest.raises(FileNotFoundError, match=r"step 2 is not in .*\[6, 8\]"):
    ckpt.restore(checkpoint.abstract_like(_toy_state(mesh)), step=2)
  ckpt.close()


def test_relative_directory(tmp_path, monkeypatch):
  # `make demo` passes a relative work directory; orbax itself accepts only absolute paths.
  monkeypatch.chdir(tmp_path)
  mesh = _mesh()
  ckpt = checkpoint.Checkpointer(os.path.join("work", "ckpt"), model_size="tiny")
  assert ckpt.directory == str(tmp_path / "work" / "ckpt")
  assert ckpt.save(3, _toy_state(mesh, seed=3), {"position": 3})
  ckpt.wait_until_finished()
  restored, meta = ckpt.restore(checkpoint.abstract_like(_toy_state(mesh)))
  for got, want in zip(_arrays(restored), _arrays(_toy_state(mesh, seed=3))):
    np.testing.assert_array_equal(got, want)
  assert meta["step"] == 3
  ckpt.close()


def test_unfinished_save_is_invisible(tmp_path):
  """A directory left by a save that never finished is neither listed nor restored."""
  mesh = _mesh()
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, model_size="tiny")
  ckpt.save(3, _toy_state(mesh), {"position": 3})
  ckpt.close()
  os.makedirs(os.path.join(directory, "5.orbax-checkpoint-tmp-1234567", "state"))
  reader = checkpoint.Checkpointer(directory, model_size="tiny")
  assert reader.latest_step() == 3
  _, meta = reader.restore(checkpoint.abstract_like(_toy_state(mesh)))
  assert meta["step"] == 3
  reader.close()


def test_other_model_size_is_refused(tmp_path):
  mesh = _mesh()
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, model_size="small")
  ckpt.save(1, _toy_state(mesh), None)
  ckpt.close()
  reader = checkpoint.Checkpointer(directory, model_size="tiny")
  with pytest.raises(ValueError, match=r"model size 'small'.*model size 'tiny'"):
    reader.restore(checkpoint.abstract_like(_toy_state(mesh)))
  reader.close()


def test_other_shapes_are_refused(tmp_path):
  mesh = _mesh()
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, model_size="tiny")
  ckpt.save(1, _toy_state(mesh, width=8), None)
  ckpt.close()
  reader = checkpoint.Checkpointer(directory, model_size="tiny")
  with pytest.raises(ValueError, match=r"params/dense/kernel has shape \(8, 16\) there but "
                                       r"\(16, 16\)"):
    reader.restore(checkpoint.abstract_like(_toy_state(mesh, width=16)))
  reader.close()


def test_preemption_signal_sets_flag_and_restores_handler():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be installed from the main thread")
  before = signal.getsignal(signal.SIGTERM)
  watcher = checkpoint.PreemptionSignal()
  assert not watcher.reached(0)
  os.kill(os.getpid(), signal.SIGTERM)
  assert watcher.reached(1)
  watcher.close()
  assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture(scope="module")
def trace_task(trace_dir, vocab):
  return tasks.register_trace_tasks("ckpt_test", {"train": trace_dir}, vocab, image_size=16)


def _input_config(name, batch_size=4, seed=5):
  return data.InputConfig(name, {"prefix": 16, "suffix": 32}, batch_size, num_image_tokens=4,
                          seed=seed, max_images_per_row=2)


def _same(a, b):
  return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_data_position_survives_a_checkpoint(tmp_path, trace_task):
  mesh = _mesh()
  config = _input_config(trace_task["vpd"])
  reference = data.TrainInput(config, 0, 1)
  expected = [next(reference) for _ in range(9)]
  assert not _same(expected[0], expected[1])  # the stream moves on

  run = data.TrainInput(config, 0, 1)
  for _ in range(4):
    next(run)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), model_size="tiny")
  ckpt.save(4, _toy_state(mesh), run.state())
  ckpt.close()

  _, meta = checkpoint.Checkpointer(str(tmp_path / "ckpt"), model_size="tiny").restore(
      checkpoint.abstract_like(_toy_state(mesh)))
  resumed = data.TrainInput(config, 0, 1)
  resumed.restore(meta["data"])
  assert resumed.position == 4
  for want in expected[4:]:
    assert _same(next(resumed), want)
  assert resumed.position == 9


def test_input_batches_and_host_split(trace_task):
  config = _input_config(trace_task["direct"], batch_size=4)
  whole = next(data.TrainInput(config, 0, 1))
  assert whole["tokens"].shape == (4, 4 + 16 + 32)
  assert whole["images"].shape == (4, 2, 16, 16, 3)
  halves = [next(data.TrainInput(config, i, 2)) for i in range(2)]
  assert [h["tokens"].shape[0] for h in halves] == [2, 2]
  assert not np.array_equal(halves[0]["tokens"], halves[1]["tokens"])
  assert data.count_tokens(whole) == int(np.count_nonzero(whole["segment_ids"]))
  with pytest.raises(ValueError, match="batch_size 5 must be a positive multiple of the number "
                                       r"of hosts \(2\)"):
    data.TrainInput(_input_config(trace_task["direct"], batch_size=5), 0, 2)


def test_restoring_another_stream_is_refused(trace_task):
  run = data.TrainInput(_input_config(trace_task["vpd"], batch_size=4), 0, 1)
  next(run)
  other = data.TrainInput(_input_config(trace_task["vpd"], batch_size=8), 0, 1)
  with pytest.raises(ValueError, match="batch_size was 4 there and is 8"):
    other.restore(run.state())
  reseeded = data.TrainInput(_input_config(trace_task["vpd"], seed=6), 0, 1)
  with pytest.raises(ValueError, match="seed was 5 there and is 6"):
    reseeded.restore(run.state())


def test_eval_input_is_fixed_and_repeats(trace_task):
  config = _input_config(trace_task["direct"], batch_size=4)
  evaluation = data.EvalInput(config, 3, 0, 1)
  first, again = list(evaluation), list(evaluation)
  assert len(first) == 3 and all(_same(a, b) for a, b in zip(first, again))
  assert all(_same(a, b) for a, b in zip(first, data.EvalInput(config, 3, 0, 1)))
  # 40 records at 4 per batch (packed 2 per row): 30 batches exceed the split, which then repeats.
  assert len(list(data.EvalInput(config, 30, 0, 1))) == 30
  with pytest.raises(ValueError, match="num_batches=0"):
    data.EvalInput(config, 0, 0, 1)
