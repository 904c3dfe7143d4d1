"""Tests for launch/: the TPU pod launcher's gcloud commands and the SLURM batch script."""

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from launch import tpu_pod
from vpd_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = "configs/vpd_sft.py:size=small,mesh=data:-1+fsdp:16"
_BASE = ["--tpu=vpd-v5e", "--zone=us-west4-a", "--project=my-project"]
_LOCATION = ["--zone=us-west4-a", "--project=my-project"]


def _dry_run(*flags):
  """(comment lines, commands as argument lists) that `tpu_pod.py --dry_run` prints."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_pod.py"), *_BASE,
                           *flags, "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  return ([line for line in lines if line.startswith("#")],
          [shlex.split(line) for line in lines if not line.startswith("#")])


def _remote(command):
  """The shell command an `ssh --command=...` runs on the workers."""
  (flag,) = [arg for arg in command if arg.startswith("--command=")]
  return flag[len("--command="):]


def test_v5e_64_launch_prints_the_commands_a_tpu_user_runs():
  comments, commands = _dry_run("--accelerator_type=v5litepod-64", f"--config={_CONFIG}",
                                "--workdir=gs://my-bucket/runs/vpd")
  assert comments[0].startswith("# v5litepod-64: 16 worker(s)")
  create, wheel, mkdir, scp, install, start, logs = commands
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vpd-v5e", *_LOCATION,
                    "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]
  assert wheel[1:4] == ["-m", "pip", "wheel"] and wheel[-1] == ROOT
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vpd-v5e", *_LOCATION]
  for command in (mkdir, install, start):
    assert command[:-1] == ssh + ["--worker=all"]
  assert _remote(mkdir) == "mkdir -p ~/vpd_jax"
  # The wheel, the pinned versions and the config file go to every worker.
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert [os.path.basename(path) for path in scp[5:8]] == [
      "vpd_jax-0.1.0-py3-none-any.whl", "constraints.txt", "vpd_sft.py"]
  assert scp[8:] == ["vpd-v5e:vpd_jax/", *_LOCATION, "--worker=all"]
  install_steps = _remote(install).split(" && ")
  assert install_steps[0] == "cd ~/vpd_jax"
  assert "uv venv -q --allow-existing --python=3.11 .venv" in install_steps[2]
  assert shlex.split(install_steps[3])[-4:] == ["--python=.venv/bin/python", "-c",
                                                "constraints.txt",
                                                "vpd_jax-0.1.0-py3-none-any.whl[tpu]"]
  # Every worker starts the same training command, detached, logging to one file.
  remote = _remote(start)
  assert remote.startswith("cd ~/vpd_jax && setsid nohup ") and remote.endswith(
      "> ~/vpd_jax/train.log 2>&1 < /dev/null &")
  train = shlex.split(remote[len("cd ~/vpd_jax && setsid nohup "):remote.index(" > ")])
  assert train == [".venv/bin/python", "-m", "vpd_jax.main", "train",
                   "--config=vpd_sft.py:size=small,mesh=data:-1+fsdp:16",
                   "--workdir=gs://my-bucket/runs/vpd", "--distributed=tpu"]
  assert logs == ssh + ["--worker=0", "--command=tail -n +1 -F ~/vpd_jax/train.log"]


def test_queued_spot_slice_and_resume_without_create():
  comments, commands = _dry_run("--accelerator_type=v4-32", f"--config={_CONFIG}",
                                "--workdir=gs://b/r", "--queued", "--spot", "--no_follow")
  assert commands[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "vpd-v5e",
                         "--node-id=vpd-v5e", *_LOCATION, "--accelerator-type=v4-32",
                         "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert comments[1] == ("# poll until it prints ACTIVE: gcloud compute tpus queued-resources "
                         "describe vpd-v5e --zone=us-west4-a --project=my-project "
                         "'--format=value(state.state)'")
  assert "tail" not in _remote(commands[-1])  # --no_follow: the last command starts training
  _, resumed = _dry_run("--accelerator_type=v4-32", f"--config={_CONFIG}", "--workdir=gs://b/r",
                        "--skip_create", "--version=my-image")
  assert not any("create" in command for command in resumed)
  assert "--distributed=tpu" in _remote(resumed[-2])


def test_logs_status_and_delete():
  _, (logs,) = _dry_run("--logs", "--log_worker=3")
  assert logs[-2:] == ["--worker=3", "--command=tail -n +1 -F ~/vpd_jax/train.log"]
  _, (status,) = _dry_run("--status")
  assert status == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "vpd-v5e", *_LOCATION]
  _, (delete,) = _dry_run("--delete")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vpd-v5e", *_LOCATION,
                    "--quiet"]
  _, (delete,) = _dry_run("--delete", "--queued")
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "vpd-v5e",
                    *_LOCATION, "--force", "--quiet"]


@pytest.mark.parametrize("flags, message", [
    (["--accelerator_type=v5litepod-64", f"--config={_CONFIG}", "--workdir=/home/me/run"],
     "v5litepod-64 has 16 workers, which must share the workdir; give a gs:// path"),
    (["--accelerator_type=v9-8", f"--config={_CONFIG}", "--workdir=gs://b/r"],
     "--accelerator_type='v9-8': expected GENERATION-SIZE"),
    (["--accelerator_type=v4-8", "--config=configs/missing.py", "--workdir=gs://b/r"],
     "config file 'configs/missing.py' does not exist"),
    (["--accelerator_type=v4-8", "--workdir=gs://b/r"], "--config is required"),
])
def test_bad_launch_flags_are_named(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tpu_pod.main([*_BASE, *flags, "--dry_run"])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_bad_tpu_name_is_named(capsys):
  with pytest.raises(SystemExit):
    tpu_pod.main(["--tpu=Bad_Name", "--zone=z", "--delete", "--dry_run"])
  assert "--tpu='Bad_Name': expected a TPU name" in capsys.readouterr().err


def test_accelerator_types():
  assert tpu_pod.parse_accelerator("v5litepod-64") == ("v5litepod", 64, 16)
  assert tpu_pod.parse_accelerator("v5litepod-8") == ("v5litepod", 8, 1)
  assert tpu_pod.parse_accelerator("v4-32") == ("v4", 16, 4)
  assert tpu_pod.parse_accelerator("v4-8") == ("v4", 4, 1)
  assert tpu_pod.parse_accelerator("v5p-128") == ("v5p", 64, 16)
  assert tpu_pod.parse_accelerator("v6e-256") == ("v6e", 256, 64)


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_sets_what_jax_distributed_needs(tmp_path):
  """Runs the batch script with stand-ins for scontrol, srun and Python."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "scontrol", '#!/bin/bash\n[[ "$1 $2 $3" == "show hostnames gpu[03-04]" ]]'
              ' && printf "gpu03\\ngpu04\\n"\n')
  # srun starts SLURM_NTASKS tasks of its command (options dropped), each with its SLURM_PROCID.
  _executable(bin_dir / "srun", '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
              'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit 1; done\n')
  _executable(bin_dir / "fake-python", f"""#!{sys.executable}
import json, os, sys
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
name = "task-" + os.environ["SLURM_PROCID"] + ".json"
with open(os.path.join({str(tmp_path)!r}, name), "w") as f:
  json.dump({{"env": {{k: os.environ[k] for k in keys}}, "argv": sys.argv[1:]}}, f)
""")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             SLURM_JOB_NODELIST="gpu[03-04]", SLURM_NTASKS="2", SLURM_JOB_ID="4242",
             VPD_JAX_PYTHON=str(bin_dir / "fake-python"))
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"),
                           "configs/vpd_sft.py:size=small", "/shared/run"], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "2 processes, coordinator gpu03:24242" in result.stdout
  for task in range(2):
    with open(tmp_path / f"task-{task}.json") as f:
      seen = json.load(f)
    assert seen["argv"] == ["-m", "vpd_jax.main", "train", "--config=configs/vpd_sft.py:size=small",
                            "--workdir=/shared/run", "--distributed=env"]
    assert distributed.resolve("env", env=seen["env"]) == distributed.Cluster(
        "env", "gpu03:24242", 2, task)
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch")], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "usage: sbatch" in result.stderr
