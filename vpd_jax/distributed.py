"""Multi-host start-up: where `jax.distributed` finds its coordinator, process count and id.

`resolve(...)` decides, in this order of precedence, from

  flags     --coordinator_address=HOST:PORT --num_processes=N --process_id=I (all three)
  env       JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/slurm_gpu.sbatch
            exports them; any launcher can)
  slurm     inside a SLURM job step of more than one task: SLURM_NTASKS processes, this one
            SLURM_PROCID, the coordinator on the first host of SLURM_STEP_NODELIST (or
            SLURM_JOB_NODELIST) at port VPD_JAX_COORDINATOR_PORT, by default one derived from the
            job id so that two jobs sharing a node do not collide
  tpu       on a Cloud TPU VM: jax reads the slice's workers from the VM metadata itself, so
            nothing is passed (a single-host TPU VM becomes a one-process "cluster")
  none      a single process; `jax.distributed` is not started

and `initialize(cluster, cpu_devices=...)` starts it. With the CPU backend (tests, laptops) the
collectives go through gloo and `cpu_devices` fakes that many devices per process, so a two-process
run on one machine behaves like a two-host pod slice.

After `initialize`, every host runs the same program: each reads its own shard of the input
(`seqio.ShardInfo(process_index, process_count)`), its rows become one global batch
(`jax.make_array_from_process_local_data`), orbax writes checkpoints from all hosts together, and
only host 0 writes metrics and reports (`is_main_process`).
"""

import dataclasses
import glob
import os
import re
from typing import Mapping, Optional

from absl import flags
from absl import logging
import jax
import orbax.checkpoint as ocp

MODES = ("auto", "flags", "env", "slurm", "tpu", "none")
# Google's PCI vendor id: the TPU chips of a Cloud TPU VM show up under it in sysfs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_DEFAULT_PORT_BASE = 20000


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the others; `source` says where the values came from."""
  source: str  # one of MODES but "auto"
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  @property
  def multi_process(self) -> bool:
    return self.source == "tpu" or (self.num_processes or 1) > 1


def expand_hostlist(hostlist: str) -> list[str]:
  """SLURM's compressed host list expanded: "gpu[01-03,7],b" -> gpu01 gpu02 gpu03 gpu7 b."""
  hosts = []
  for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
    match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not match:
      hosts.append(item)
      continue
    prefix, ranges, suffix = match.groups()
    if "[" in suffix:
      raise ValueError(f"SLURM host list {hostlist!r}: only one bracketed range per host name is "
                       "supported")
    for part in ranges.split(","):
      low, sep, high = part.partition("-")
      if not low.isdigit() or (sep and not high.isdigit()):
        raise ValueError(f"SLURM host list {hostlist!r}: {part!r} is not a number or a range "
                         "like 01-04")
      width = len(low)
      for number in range(int(low), int(high if sep else low) + 1):
        hosts.append(f"{prefix}{number:0{width}d}{suffix}")
  if not hosts:
    raise ValueError(f"SLURM host list {hostlist!r} names no host")
  return hosts


def _int(value: Optional[str], name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r}: expected an integer") from None


def _check(cluster: Cluster) -> Cluster:
  n, i, address = cluster.num_processes, cluster.process_id, cluster.coordinator_address
  where = f"distributed settings from {cluster.source}"
  if n is not None and n < 1:
    raise ValueError(f"{where}: num_processes={n}, expected at least 1")
  if i is not None and n is not None and not 0 <= i < n:
    raise ValueError(f"{where}: process_id={i} must lie in [0, num_processes={n})")
  if address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", address):
    raise ValueError(f"{where}: coordinator_address={address!r}, expected HOST:PORT")
  return cluster


def _from_slurm(env: Mapping[str, str]) -> Cluster:
  hostlist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
  if not hostlist:
    raise ValueError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is "
                     "set; run the job step with srun")
  if "VPD_JAX_COORDINATOR_PORT" in env:
    port = _int(env["VPD_JAX_COORDINATOR_PORT"], "VPD_JAX_COORDINATOR_PORT")
  else:
    port = _DEFAULT_PORT_BASE + _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 20000
  return Cluster("slurm", f"{expand_hostlist(hostlist)[0]}:{port}",
                 _int(env["SLURM_NTASKS"], "SLURM_NTASKS"),
                 _int(env.get("SLURM_PROCID"), "SLURM_PROCID"))


def on_cloud_tpu_vm(sysfs_root: str = "/sys/bus/pci/devices") -> bool:
  """Whether this machine carries TPU chips (Google PCI devices), as on a Cloud TPU VM."""
  for path in glob.glob(os.path.join(sysfs_root, "*", "vendor")):
    try:
      with open(path) as f:
        if f.read().strip().lower() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def resolve(mode: str = "auto", coordinator_address: Optional[str] = None,
            num_processes: Optional[int] = None, process_id: Optional[int] = None,
            env: Optional[Mapping[str, str]] = None,
            sysfs_root: str = "/sys/bus/pci/devices") -> Cluster:
  """The `Cluster` this process belongs to (see the module docstring for the order of sources)."""
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r}: expected one of {', '.join(MODES)}")
  env = os.environ if env is None else env
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if mode == "none":
    if any(v is not None for v in given.values()):
      raise ValueError("distributed mode 'none' takes no coordinator_address, num_processes or "
                       "process_id")
    return Cluster("none")
  if mode == "flags" or (mode == "auto" and any(v is not None for v in given.values())):
    missing = [name for name, value in given.items() if value is None]
    if missing:
      raise ValueError(f"multi-process flags: {', '.join('--' + m for m in missing)} missing; "
                       "give --coordinator_address, --num_processes and --process_id together")
    return _check(Cluster("flags", coordinator_address, int(num_processes), int(process_id)))
  env_names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if mode == "env" or (mode == "auto" and env.get("JAX_COORDINATOR_ADDRESS")):
    missing = [name for name in env_names if not env.get(name)]
    if missing:
      raise ValueError(f"environment: {', '.join(missing)} not set; a multi-process run needs "
                       f"all of {', '.join(env_names)}")
    return _check(Cluster("env", env["JAX_COORDINATOR_ADDRESS"],
                          _int(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES"),
                          _int(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID")))
  slurm_tasks = env.get("SLURM_NTASKS")
  if mode == "slurm" or (mode == "auto" and slurm_tasks and _int(slurm_tasks, "SLURM_NTASKS") > 1):
    if not slurm_tasks:
      raise ValueError("distributed mode 'slurm' but SLURM_NTASKS is not set: not inside a SLURM "
                       "job step (start it with srun)")
    return _check(_from_slurm(env))
  if mode == "tpu" or (mode == "auto" and on_cloud_tpu_vm(sysfs_root)):
    return Cluster("tpu")
  return Cluster("none")


def initialize(cluster: Cluster, cpu_devices: Optional[int] = None) -> bool:
  """Starts `jax.distributed` for `cluster`; True when it was started.

  Call before anything touches a jax backend. `cpu_devices` sets the number of CPU devices per
  process (jax_num_cpu_devices), for runs on the CPU backend.
  """
  if cpu_devices is not None:
    if cpu_devices < 1:
      raise ValueError(f"cpu_devices={cpu_devices}: expected at least 1")
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  if not cluster.multi_process:
    return False
  # Cross-process collectives on the CPU backend; GPU and TPU backends have their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cluster.source == "tpu":
    jax.distributed.initialize()  # the TPU VM's metadata names the workers
  else:
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes, process_id=cluster.process_id)
  # orbax's own barriers (creating the checkpoint directory, finishing a save) then also go
  # through the coordination service, which tolerates hosts arriving minutes apart.
  flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  logging.info("jax.distributed (%s): process %d of %d, %d local of %d devices", cluster.source,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def wait_for_all_hosts(name: str, timeout_s: int = 1800) -> None:
  """Blocks until every process reaches the barrier `name` (each name once per run).

  Goes through jax's coordination service, not through a device collective, so a host that is
  minutes late (still compiling, still reading its data) is waited for.
  """
  if jax.process_count() == 1:
    return
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def is_main_process() -> bool:
  """Host 0 writes logs, metrics and reports; the others only take part in the computation."""
  return jax.process_index() == 0
