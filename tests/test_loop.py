"""Tests for vpd_jax/train/loop.py: kill -9 and resume, SIGTERM, and errors before training.

The subprocess tests train the tiny model on the session's small trace directories
(tests/conftest.py) with short rows, on 4 fake CPU devices, so that checkpoints hold sharded arrays.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
from vpd_jax.config_args import load_config_file
from vpd_jax.train import checkpoint
from vpd_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SMALL = ("size=tiny,batch_size=4,prefix_len=16,suffix_len=24,images_per_row=2,lr=1e-3,"
          "warmup_steps=2,seed=3")
# `python -c _RUNNER CONFIG_FILE ARG WORKDIR` trains CONFIG_FILE:ARG into WORKDIR.
_RUNNER = """
import importlib.util, sys
from absl import logging
spec = importlib.util.spec_from_file_location("vpd_sft", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
logging.set_verbosity(logging.INFO)
from vpd_jax.train import loop
loop.train(module.get_config(sys.argv[2]), sys.argv[3])
"""


def _config(arg):
  return load_config_file(os.path.join(ROOT, "configs", "vpd_sft.py"), arg)


@pytest.fixture(scope="module")
def data_arg(trace_dir, validation_trace_dir, vocab):
  return (f"traces={trace_dir},val_traces={validation_trace_dir},"
          f"vocab={vocab.sentencepiece_model_file}")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by the subprocesses: only the first run compiles (~25 s)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _start(arg, workdir, cache, devices=4):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  os.makedirs(workdir, exist_ok=True)
  stderr = open(os.path.join(workdir, "stderr.txt"), "a")  # pylint: disable=consider-using-with
  return subprocess.Popen(
      [sys.executable, "-c", _RUNNER, os.path.join(ROOT, "configs", "vpd_sft.py"), arg, workdir],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def _stderr(workdir):
  with open(os.path.join(workdir, "stderr.txt")) as f:
    return f.read()


def _wait(process, workdir, timeout=240):
  try:
    rc = process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert rc == 0, _stderr(workdir)[-4000:]


def test_missing_vocab_is_an_error(tmp_path, trace_dir):
  config = _config(f"{_SMALL},traces={trace_dir},total_steps=1")
  with pytest.raises(ValueError, match="data.vocab is required with data.traces"):
    loop.train(config, str(tmp_path / "run"))


def test_checkpoint_of_another_size_is_refused(tmp_path, data_arg):
  workdir = str(tmp_path / "run")
  writer = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), model_size="small")
  writer.save(5, {"w": np.zeros(3, np.float32)}, {"position": 5})
  writer.close()
  with pytest.raises(ValueError, match=r"model size 'small'.*model size 'tiny'"):
    loop.train(_config(f"{_SMALL},{data_arg},total_steps=10"), workdir)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _run_arg(data_arg):
  # 4 devices: parameters sharded over fsdp and tensor, rows over fsdp.
  return (f"{_SMALL},{data_arg},total_steps=30,keep=3,log_every=1,eval_every=15,eval_steps=2,"
          "mesh=data:1+fsdp:2+tensor:2")


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, data_arg, compile_cache):
  arg = _run_arg(data_arg) + ",ckpt_every=4"
  reference_dir, resumed_dir = str(tmp_path / "reference"), str(tmp_path / "resumed")
  reference = _start(arg, reference_dir, compile_cache)
  # The second run starts once the first has compiled its step, so that it reads the cache.
  deadline = time.time() + 240
  while "compiled and ran the first step" not in _stderr(reference_dir):
    assert reference.poll() is None, _stderr(reference_dir)[-4000:]
    assert time.time() < deadline, "the reference run did not start training"
    time.sleep(0.1)
  interrupted = _start(arg, resumed_dir, compile_cache)

  # Kill the second run without warning as soon as a checkpoint past the first is on disk.
  while not [s for s in helpers.checkpoint_steps(resumed_dir) if s >= 8]:
    assert interrupted.poll() is None, _stderr(resumed_dir)[-4000:]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  interrupted.send_signal(signal.SIGKILL)
  assert interrupted.wait(timeout=60) == -signal.SIGKILL
  assert max(helpers.checkpoint_steps(resumed_dir)) < 30, "the run finished before it was killed"

  _wait(reference, reference_dir)
  expected = helpers.losses(reference_dir)
  assert sorted(expected) == list(range(1, 31))
  assert len(set(expected.values())) > 25  # the losses do move from step to step
  assert helpers.checkpoint_steps(reference_dir) == [24, 28, 30]  # keep=3
  records = _records(reference_dir)
  expected_eval = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  assert sorted(expected_eval) == [15, 30]
  assert all(0 < value < 20 for value in expected_eval.values())
  assert any(r.get("steps_per_sec", 0) > 0 and r.get("tokens_per_sec", 0) > 0 for r in records)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(reference_dir))

  restarted = _start(arg, resumed_dir, compile_cache)
  _wait(restarted, resumed_dir)
  restored = re.findall(r"restored checkpoint step (\d+)", _stderr(resumed_dir))
  assert len(restored) == 1, _stderr(resumed_dir)[-4000:]
  restored = int(restored[0])
  assert 8 <= restored < 30 and restored % 4 == 0
  resumed = helpers.losses(resumed_dir)
  assert sorted(resumed) == list(range(1, 31))
  # Same data, same state, same program: the losses after the restored step are identical.
  for step in range(restored + 1, 31):
    assert resumed[step] == expected[step], (step, resumed[step], expected[step])
  resumed_eval = {r["step"]: r["eval_loss"] for r in _records(resumed_dir) if "eval_loss" in r}
  assert resumed_eval[30] == expected_eval[30]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, data_arg, compile_cache):
  workdir = str(tmp_path / "run")
  # The same program as above (so the compile cache serves it), with no periodic checkpoint.
  process = _start(_run_arg(data_arg) + ",ckpt_every=1000", workdir, compile_cache)
  deadline = time.time() + 240
  metrics = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(metrics) and len(helpers.losses(workdir)) >= 3):
    assert process.poll() is None, _stderr(workdir)[-4000:]
    assert time.time() < deadline, "training did not start"
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  _wait(process, workdir, timeout=120)
  steps = helpers.checkpoint_steps(workdir)
  last_step = max(helpers.losses(workdir))
  assert steps == [last_step] and 3 <= last_step < 30, (steps, last_step)
  assert f"step {last_step}: stopping after a termination signal" in _stderr(workdir)
  # The checkpoint is complete: no temporary directory is left and orbax marked it committed.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(last_step)]
  assert os.path.exists(
      os.path.join(workdir, "checkpoints", str(last_step), "_CHECKPOINT_METADATA"))
