"""Train on a Cloud TPU slice: create it, install vpd_jax on every worker, start, follow, delete.

  python launch/tpu_pod.py --tpu=vpd-v5e --zone=us-west4-a --accelerator_type=v5litepod-64 \\
      --config=configs/vpd_sft.py:size=paligemma-3b,mesh=data:-1+fsdp:16 \\
      --workdir=gs://BUCKET/runs/vpd [--project=P] [--queued] [--spot] [--dry_run]
  python launch/tpu_pod.py --tpu=vpd-v5e --zone=us-west4-a --logs        # follow worker 0's log
  python launch/tpu_pod.py --tpu=vpd-v5e --zone=us-west4-a --delete      # release the slice

A launch runs these `gcloud` steps (`--dry_run` prints them instead, one per line):
  1. create the TPU VM (`tpu-vm create`), or with --queued a queued resource, then wait until it
     is ACTIVE (spot capacity and large slices often queue)
  2. copy a wheel of this checkout, constraints.txt and the config file to every worker and
     install them into a Python 3.11 virtual environment there (made with uv) with the TPU extra
     (jax[tpu]), versions pinned by constraints.txt
  3. start `python -m vpd_jax.main train --config=... --workdir=gs://... --distributed=tpu` on
     all workers at once, detached, logging to ~/vpd_jax/train.log; jax.distributed finds the
     other workers from the VM metadata, each worker reads its own shard of the data
  4. follow worker 0's log (the only one that logs progress and writes metrics)

Resume: run the same command again with --skip_create (the slice is still there) or without it
(the slice was preempted and deleted): training restores the latest checkpoint in the workdir.
The workdir must be on GCS when the slice has more than one worker, since all of them write the
same checkpoints.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "vpd_jax"  # under the worker's home directory
LOG_FILE = f"{REMOTE_DIR}/train.log"
VENV = ".venv"  # inside REMOTE_DIR
PYTHON_VERSION = "3.11"

# The TPU VM software version each generation boots by default (Cloud TPU docs).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}
# (what the number in the type counts, chips per host in multi-host slices, cores per chip)
_TOPOLOGY = {
    "v2": ("cores", 4, 2), "v3": ("cores", 4, 2), "v4": ("cores", 4, 2),
    "v5p": ("cores", 4, 2), "v5litepod": ("chips", 4, 1), "v6e": ("chips", 4, 1),
}
# Slices of this many chips or fewer sit on one host (v5e and v6e have 8-chip hosts).
_SINGLE_HOST_CHIPS = {"v2": 4, "v3": 4, "v4": 4, "v5p": 4, "v5litepod": 8, "v6e": 8}


def parse_accelerator(accelerator_type: str) -> tuple[str, int, int]:
  """"v5litepod-64" -> ("v5litepod", 64 chips, 16 hosts)."""
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
  if not match:
    raise ValueError(f"--accelerator_type={accelerator_type!r}: expected GENERATION-SIZE with a "
                     f"generation among {', '.join(_TOPOLOGY)}, e.g. v5litepod-64 or v4-32")
  generation, size = match.group(1), int(match.group(2))
  unit, chips_per_host, cores_per_chip = _TOPOLOGY[generation]
  chips = size // cores_per_chip if unit == "cores" else size
  if chips < 1:
    raise ValueError(f"--accelerator_type={accelerator_type!r} has no whole chip")
  hosts = 1 if chips <= _SINGLE_HOST_CHIPS[generation] else -(-chips // chips_per_host)
  return generation, chips, hosts


class Plan:
  """The gcloud commands of one invocation, built from the flags; runs or prints them."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.tpu or ""):
      raise ValueError(f"--tpu={args.tpu!r}: expected a TPU name of lower-case letters, digits "
                       "and hyphens, starting with a letter")
    if not args.zone:
      raise ValueError("--zone is required, e.g. --zone=us-west4-a")

  # ------------------------------------------------------------ command pieces
  def _location(self) -> list[str]:
    flags = [f"--zone={self.args.zone}"]
    if self.args.project:
      flags.append(f"--project={self.args.project}")
    return flags

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.args.tpu, *self._location(),
            f"--worker={worker}", f"--command={command}"]

  def create(self) -> list[list[str]]:
    args = self.args
    version = args.version or RUNTIME_VERSIONS[parse_accelerator(args.accelerator_type)[0]]
    spot = ["--spot"] if args.spot else []
    if args.queued:
      return [["gcloud", "compute", "tpus", "queued-resources", "create", args.tpu,
               f"--node-id={args.tpu}", *self._location(),
               f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}",
               *spot]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu, *self._location(),
             f"--accelerator-type={args.accelerator_type}", f"--version={version}", *spot]]

  def queued_state(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.args.tpu,
            *self._location(), "--format=value(state.state)"]

  def install(self, wheel: str) -> list[list[str]]:
    config_file = self.args.config.split(":", 1)[0]
    files = [wheel, os.path.join(ROOT, "constraints.txt"), config_file]
    remote_wheel = os.path.basename(wheel)
    # TPU VM images ship an older system Python; uv fetches the one jax 0.10.2 needs.
    return [
        self.ssh(f"mkdir -p ~/{REMOTE_DIR}"),
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", *files, f"{self.args.tpu}:{REMOTE_DIR}/",
         *self._location(), "--worker=all"],
        self.ssh(f"cd ~/{REMOTE_DIR} && python3 -m pip install -q --user uv && "
                 f"python3 -m uv venv -q --allow-existing --python={PYTHON_VERSION} {VENV} && "
                 f"python3 -m uv pip install -q --python={VENV}/bin/python -c constraints.txt "
                 f"{shlex.quote(remote_wheel + '[tpu]')}"),
    ]

  def train_command(self) -> str:
    """What every worker runs: the same `vpd-jax train`, the config file beside the wheel."""
    file, sep, arg = self.args.config.partition(":")
    config = os.path.basename(file) + sep + arg
    train = [f"{VENV}/bin/python", "-m", "vpd_jax.main", "train", f"--config={config}",
             f"--workdir={self.args.workdir}", "--distributed=tpu"]
    return (f"cd ~/{REMOTE_DIR} && setsid nohup {shlex.join(train)} > ~/{LOG_FILE} 2>&1 "
            "< /dev/null &")

  def start(self) -> list[str]:
    return self.ssh(self.train_command())

  def logs(self) -> list[str]:
    return self.ssh(f"tail -n +1 -F ~/{LOG_FILE}", worker=str(self.args.log_worker))

  def status(self) -> list[str]:
    if self.args.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.args.tpu,
              *self._location()]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.args.tpu, *self._location()]

  def delete(self) -> list[str]:
    if self.args.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.args.tpu,
              *self._location(), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.args.tpu, *self._location(),
            "--quiet"]

  def build_wheel(self, wheel_dir: str) -> list[str]:
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", f"--wheel-dir={wheel_dir}", ROOT]


def _check_launch(args: argparse.Namespace) -> int:
  """Validates a launch's flags; returns the number of workers."""
  for name in ("accelerator_type", "config", "workdir"):
    if not getattr(args, name):
      raise ValueError(f"--{name} is required to launch training")
  _, _, hosts = parse_accelerator(args.accelerator_type)
  config_file = args.config.split(":", 1)[0]
  if not os.path.isfile(config_file):
    raise ValueError(f"--config: config file {config_file!r} does not exist")
  if hosts > 1 and not args.workdir.startswith("gs://"):
    raise ValueError(f"--workdir={args.workdir!r}: {args.accelerator_type} has {hosts} workers, "
                     "which must share the workdir; give a gs:// path")
  return hosts


def _wheel_path(wheel_dir: str) -> str:
  """The wheel `pip wheel` builds from this checkout (its version is setup.py's)."""
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    version = re.search(r'version="([^"]+)"', f.read()).group(1)
  return os.path.join(wheel_dir, f"vpd_jax-{version}-py3-none-any.whl")


def run_commands(commands: Sequence[Sequence[str]], dry_run: bool) -> None:
  for command in commands:
    if dry_run:
      print(shlex.join(command))
      continue
    print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def wait_until_active(plan: Plan, poll_s: float = 30.0) -> None:
  """Polls a queued resource until it is ACTIVE; fails on FAILED or SUSPENDED."""
  while True:
    state = subprocess.run(plan.queued_state(), check=True, capture_output=True,
                           text=True).stdout.strip()
    print(f"queued resource {plan.args.tpu}: {state}", file=sys.stderr, flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise RuntimeError(f"queued resource {plan.args.tpu} is {state}; see "
                         f"{shlex.join(plan.status())}")
    time.sleep(poll_s)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--tpu", required=True, help="name of the TPU VM / queued resource")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="default: gcloud's configured project")
  parser.add_argument("--accelerator_type", default=None, help="e.g. v5litepod-64, v4-32, v5p-128")
  parser.add_argument("--version", default=None, help="TPU software version (default by type)")
  parser.add_argument("--config", default=None, help="configs/FILE.py:key=value,...")
  parser.add_argument("--workdir", default=None, help="gs://BUCKET/PATH for checkpoints and logs")
  parser.add_argument("--queued", action="store_true", help="create a queued resource")
  parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  parser.add_argument("--skip_create", action="store_true", help="reuse an existing slice")
  parser.add_argument("--no_follow", action="store_true", help="do not follow the log")
  parser.add_argument("--log_worker", type=int, default=0, help="whose log --logs follows")
  parser.add_argument("--wheel_dir", default=os.path.join(ROOT, "dist"))
  action = parser.add_mutually_exclusive_group()
  action.add_argument("--logs", action="store_true", help="only follow a worker's log")
  action.add_argument("--status", action="store_true", help="only describe the slice")
  action.add_argument("--delete", action="store_true", help="only delete the slice")
  parser.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
  args = parser.parse_args(argv)

  try:
    plan = Plan(args)
    if args.logs:
      commands = [plan.logs()]
    elif args.status:
      commands = [plan.status()]
    elif args.delete:
      commands = [plan.delete()]
    else:
      hosts = _check_launch(args)
      if args.dry_run:
        print(f"# {args.accelerator_type}: {hosts} worker(s); each runs: {plan.train_command()}")
      commands = [] if args.skip_create else plan.create()
      if commands and args.queued:
        if args.dry_run:
          run_commands(commands, dry_run=True)
          print(f"# poll until it prints ACTIVE: {shlex.join(plan.queued_state())}")
        else:
          run_commands(commands, dry_run=False)
          wait_until_active(plan)
        commands = []
      commands += [plan.build_wheel(args.wheel_dir), *plan.install(_wheel_path(args.wheel_dir)),
                   plan.start()]
      if not args.no_follow:
        commands.append(plan.logs())
  except ValueError as e:
    parser.error(str(e))
  try:
    run_commands(commands, args.dry_run)
  except subprocess.CalledProcessError as e:
    print(f"tpu_pod: command failed with exit status {e.returncode}: {shlex.join(e.cmd)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
