"""Tests for vpd_jax/distributed.py and multi-host training.

The unit tests check where the cluster settings come from (flags, JAX_* environment, SLURM, Cloud
TPU VM). The multi-host tests start two `vpd-jax train` processes on this machine (a localhost
coordinator, gloo CPU collectives, 4 fake CPU devices each), i.e. one 8-device mesh over two hosts,
stop them with SIGTERM to one host, run them again to the end, and compare the whole run with one
process on 8 devices reading the same global batches (tests/multihost_reference.py).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import helpers
from vpd_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "vpd_sft.py")
_SMALL = ("size=tiny,batch_size=4,prefix_len=16,suffix_len=24,images_per_row=2,lr=1e-3,"
          "warmup_steps=2,seed=3,log_every=1,mesh=data:2+fsdp:2+tensor:2")
_STEPS = 12


# ---------------------------------------------------------------- where the settings come from

def test_flags_win_and_must_come_together():
  cluster = distributed.resolve(coordinator_address="10.0.0.2:1234", num_processes=4,
                                process_id=3, env={"JAX_COORDINATOR_ADDRESS": "x:1"})
  assert cluster == distributed.Cluster("flags", "10.0.0.2:1234", 4, 3)
  assert cluster.multi_process
  with pytest.raises(ValueError, match="--coordinator_address, --process_id missing"):
    distributed.resolve(num_processes=2, env={})
  with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, num_processes=2\)"):
    distributed.resolve(coordinator_address="h:1", num_processes=2, process_id=2, env={})
  with pytest.raises(ValueError, match="coordinator_address='h', expected HOST:PORT"):
    distributed.resolve(coordinator_address="h", num_processes=2, process_id=0, env={})


def test_jax_environment_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "head:4321", "JAX_NUM_PROCESSES": "16",
         "JAX_PROCESS_ID": "7", "SLURM_NTASKS": "16"}
  assert distributed.resolve(env=env) == distributed.Cluster("env", "head:4321", 16, 7)
  with pytest.raises(ValueError, match="JAX_PROCESS_ID not set"):
    distributed.resolve(env={"JAX_COORDINATOR_ADDRESS": "head:4321", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two': expected an integer"):
    distributed.resolve(env={"JAX_COORDINATOR_ADDRESS": "head:4321", "JAX_NUM_PROCESSES": "two",
                             "JAX_PROCESS_ID": "0"})


def test_slurm_job_step(tmp_path):
  env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "gpu[007-008,010],gpu2", "SLURM_STEP_NODELIST": "gpu[008,010]"}
  # The port derives from the job id (123456 % 20000 = 3456), the host is the step's first.
  assert distributed.resolve(env=env, sysfs_root=str(tmp_path)) == distributed.Cluster(
      "slurm", "gpu008:23456", 4, 2)
  env.pop("SLURM_STEP_NODELIST")
  env["VPD_JAX_COORDINATOR_PORT"] = "7777"
  assert distributed.resolve(env=env).coordinator_address == "gpu007:7777"
  # One task is a single process; mode "slurm" insists on being inside a job step.
  assert distributed.resolve(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"},
                             sysfs_root=str(tmp_path)).source == "none"
  with pytest.raises(ValueError, match="not inside a SLURM job step"):
    distributed.resolve("slurm", env={})


def test_expand_hostlist():
  assert distributed.expand_hostlist("node[1-3,10]") == ["node1", "node2", "node3", "node10"]
  assert distributed.expand_hostlist("a[09-11]-ib,b,c[2]") == ["a09-ib", "a10-ib", "a11-ib", "b",
                                                              "c2"]
  with pytest.raises(ValueError, match="'x-y' is not a number or a range"):
    distributed.expand_hostlist("n[x-y]")


def test_cloud_tpu_vm_is_detected_from_its_pci_devices(tmp_path):
  (tmp_path / "0000:00:04.0").mkdir()
  (tmp_path / "0000:00:04.0" / "vendor").write_text("0x8086\n")
  assert distributed.resolve(env={}, sysfs_root=str(tmp_path)) == distributed.Cluster("none")
  (tmp_path / "0000:00:05.0").mkdir()
  (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
  cluster = distributed.resolve(env={}, sysfs_root=str(tmp_path))
  assert cluster == distributed.Cluster("tpu") and cluster.multi_process
  assert distributed.resolve("none", env={}, sysfs_root=str(tmp_path)).source == "none"
  with pytest.raises(ValueError, match="distributed mode 'mpi'"):
    distributed.resolve("mpi")


def test_command_line_names_missing_flags():
  result = subprocess.run(
      [sys.executable, "-m", "vpd_jax.main", "train", "--config=configs/vpd_sft.py",
       "--workdir=/nonexistent", "--num_processes=2"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0
  assert "--coordinator_address, --process_id missing" in result.stderr


# ---------------------------------------------------------------- two hosts on this machine

def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(cache, **extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **extra)


def _start_hosts(arg, workdir, cache, port=None):
  """Two `vpd-jax train` processes forming one run; their stderr goes to WORKDIR/host-I.txt."""
  port = port or _free_port()
  os.makedirs(workdir, exist_ok=True)
  processes = []
  for i in range(2):
    log = open(os.path.join(workdir, f"host-{i}.txt"), "a")  # pylint: disable=consider-using-with
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "vpd_jax.main", "train", f"--config={CONFIG_FILE}:{arg}",
         f"--workdir={workdir}", f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={i}", "--cpu_devices=4"],
        cwd=ROOT, env=_env(cache), stdout=log, stderr=subprocess.STDOUT))
  return processes


def _log(workdir, host):
  with open(os.path.join(workdir, f"host-{host}.txt")) as f:
    return f.read()


def _stop(processes):
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def _wait_all(processes, workdir, timeout=400):
  deadline = time.time() + timeout
  codes = []
  try:
    for process in processes:
      codes.append(process.wait(timeout=max(deadline - time.time(), 1)))
  finally:
    _stop(processes)  # a host left waiting for a failed peer
  assert codes == [0, 0], (codes, _log(workdir, 0)[-3000:], _log(workdir, 1)[-3000:])


@pytest.fixture(scope="module")
def data_arg(trace_dir, vocab):
  return f"traces={trace_dir},vocab={vocab.sentencepiece_model_file}"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, data_arg, compile_cache):
  """A two-process run stopped by SIGTERM to host 1, then run again to the end.

  Returns (workdir, the step it stopped at, the checkpoint steps left by the first run).
  """
  workdir = str(tmp_path_factory.mktemp("two_hosts") / "run")
  arg = f"{_SMALL},{data_arg},total_steps={_STEPS},ckpt_every=4,keep=2"
  processes = _start_hosts(arg, workdir, compile_cache)
  deadline = time.time() + 400
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    while not (os.path.exists(metrics) and len(helpers.losses(workdir)) >= 3):
      assert all(p.poll() is None for p in processes), _log(workdir, 0)[-3000:]
      assert time.time() < deadline, "training did not start"
      time.sleep(0.05)
  except BaseException:
    _stop(processes)
    raise
  processes[1].send_signal(signal.SIGTERM)  # host 1 only: host 0 learns of it through jax
  _wait_all(processes, workdir)
  stopped, first_checkpoints = max(helpers.losses(workdir)), helpers.checkpoint_steps(workdir)
  with open(os.path.join(workdir, "host-0.txt")) as f:
    first_log = f.read()
  _wait_all(_start_hosts(arg, workdir, compile_cache), workdir)
  return workdir, stopped, first_checkpoints, first_log


@pytest.mark.slow
def test_sigterm_to_one_host_saves_there_and_both_exit_then_resume(preempted_run):
  workdir, stopped, first_checkpoints, first_log = preempted_run
  # Both hosts stopped at the same step, after saving it (and exited with status 0).
  assert 3 <= stopped < _STEPS, stopped
  assert max(first_checkpoints) == stopped
  assert f"step {stopped}: stopping after a termination signal" in first_log
  restored = re.findall(r"restored checkpoint step (\d+)", _log(workdir, 0))
  assert restored == [str(stopped)]
  assert sorted(helpers.losses(workdir)) == list(range(1, _STEPS + 1))
  assert helpers.checkpoint_steps(workdir) == [8, _STEPS]  # every 4 steps and the last; keep=2
  assert os.path.exists(os.path.join(workdir, "checkpoints", str(_STEPS), "_CHECKPOINT_METADATA"))
  # Host 0 alone writes metrics and prints the result; host 1 logs warnings only.
  assert "compiled and ran the first step" in _log(workdir, 0)
  assert "compiled and ran the first step" not in _log(workdir, 1)
  assert '"loss"' in _log(workdir, 0) and '"loss"' not in _log(workdir, 1)


@pytest.mark.slow
def test_two_hosts_match_one_process_and_checkpoint_restores(tmp_path, preempted_run, data_arg,
                                                             compile_cache):
  two_host_dir = preempted_run[0]
  workdir, result_path = str(tmp_path / "one_process"), str(tmp_path / "result.json")
  env = _env(compile_cache, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multihost_reference.py"),
                  CONFIG_FILE, f"{_SMALL},{data_arg},total_steps={_STEPS}", workdir,
                  two_host_dir, result_path], cwd=ROOT, env=env, check=True, timeout=400,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # The interrupted two-host run computed the losses of one uninterrupted process on the same
  # global batches (summation order differs: ~1e-7 apart).
  two_hosts, one_process = helpers.losses(two_host_dir), helpers.losses(workdir)
  assert sorted(two_hosts) == sorted(one_process) == list(range(1, _STEPS + 1))
  assert len(set(two_hosts.values())) == _STEPS  # the batches differ from step to step
  for step in two_hosts:
    assert two_hosts[step] == pytest.approx(one_process[step], abs=1e-5), step

  with open(result_path) as f:
    result = json.load(f)
  # The two-host checkpoint restored into one process's 8-device layout ...
  assert result["devices"] == 8 and result["processes"] == 1
  assert result["restored_step"] == _STEPS and result["shardings_match"]
  assert result["restored_input"]["position"] == _STEPS
  assert result["restored_input"]["process_count"] == 2
  # ... holds the parameters one process trained on the same batches (Adam turns
  # summation-order differences of ~1e-7 into ~1e-5).
  assert result["num_param_leaves"] > 10 and result["max_param_abs"] > 0.1
  assert result["max_param_diff"] < 1e-4, result
