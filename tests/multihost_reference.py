"""The single-process reference for tests/test_distributed.py's two-process run.

  python tests/multihost_reference.py CONFIG_FILE ARG WORKDIR TWO_PROCESS_WORKDIR RESULT_JSON

Trains CONFIG_FILE:ARG in one process on all of its devices, with the input of a two-host run: in
a two-host run every host reads its own shard of the data (`seqio.ShardInfo(i, 2)`), so its global
batch is host 0's rows followed by host 1's rows, which is not what one process reading the whole
dataset would batch together. Here the two host streams are read in one process and concatenated
in that order, so both runs see the same global batches and must compute the same losses.

Then restores TWO_PROCESS_WORKDIR's latest checkpoint into this process's mesh and layout and
writes to RESULT_JSON how far its parameters are from this run's own final checkpoint.
"""

import json
import os
import sys

import jax
import numpy as np

from vpd_jax import sharding as sharding_lib
from vpd_jax.config_args import load_config_file
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.train import checkpoint as checkpoint_lib
from vpd_jax.train import data as data_lib
from vpd_jax.train import loop
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib

HOSTS = 2
HOST_INPUT = data_lib.TrainInput  # one host's stream; main() puts TwoHostStreams in its place


class TwoHostStreams:
  """`data.TrainInput`'s interface over the concatenated streams of hosts 0 and 1."""

  def __init__(self, config):
    self.config = config
    self._hosts = [HOST_INPUT(config, process_index=i, process_count=HOSTS)
                   for i in range(HOSTS)]

  @property
  def position(self):
    return self._hosts[0].position

  def state(self):
    return self._hosts[0].state()

  def restore(self, state):
    for host in self._hosts:
      host.restore(state)

  def __iter__(self):
    return self

  def __next__(self):
    rows = [next(host) for host in self._hosts]
    return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


def abstract_train_state(config):
  """The train state's shapes and shardings on this process's mesh, as loop.train builds them."""
  mesh_spec = [tuple(axis) for axis in config.mesh]
  mesh_spec += [(name, 1) for name in loop.MESH_AXES if name not in {a[0] for a in mesh_spec}]
  mesh = sharding_lib.make_mesh(mesh_spec)
  model_config = sizes.get_size(config.model.size, dtype=config.model.dtype,
                                param_dtype=config.model.param_dtype, remat=config.model.remat,
                                attention_impl=config.model.attention_impl,
                                scan_unroll=config.model.scan_unroll)
  optimizer = optim.make_optimizer(config.optim, config.total_steps)
  abstract, _ = state_lib.abstract_state(vlm.VLM(model_config), vlm.example_inputs(model_config),
                                         optimizer, mesh, rules=sharding_lib.DEFAULT_RULES,
                                         lora_config=config.lora)
  return abstract


def main(config_file, arg, workdir, two_process_workdir, result_path):
  config = load_config_file(config_file, arg)
  data_lib.TrainInput = TwoHostStreams  # what loop.train builds its input with
  loop.train(config, workdir)

  abstract = abstract_train_state(config)
  model_size = config.model.size
  own = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir), model_size)
  theirs = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(two_process_workdir),
                                       model_size)
  own_state, _ = own.restore(abstract)
  their_state, their_meta = theirs.restore(abstract)
  own.close()
  theirs.close()
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      own_state.params, their_state.params))
  initial = jax.tree.leaves(jax.tree.map(
      lambda a: float(np.max(np.abs(np.asarray(a)))), own_state.params))
  shardings_match = all(
      restored.sharding.is_equivalent_to(wanted.sharding, restored.ndim)
      for restored, wanted in zip(jax.tree.leaves(their_state), jax.tree.leaves(abstract)))
  result = {"devices": jax.device_count(), "processes": jax.process_count(),
            "restored_step": int(np.asarray(their_state.step)),
            "restored_input": their_meta["data"], "num_param_leaves": len(diffs),
            "max_param_diff": max(diffs), "max_param_abs": max(initial),
            "shardings_match": shardings_match}
  tmp = result_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, result_path)


if __name__ == "__main__":
  main(*sys.argv[1:])
