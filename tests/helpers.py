"""Helpers shared by several test modules: reading a training run's files, and a tiny model whose
greedy outputs depend on every position (decoding and rollout tests)."""

import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models import sizes
from vpd_jax.models import vlm


def losses(workdir):
  """{step: loss} from workdir/metrics.jsonl, the last line of each step winning (a restarted run
  appends)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        out[record["step"]] = record["loss"]
  return out


def checkpoint_steps(workdir):
  """The steps of the checkpoints in workdir/checkpoints, ascending ([] before the first)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def sharpened_tiny_model(vocab_size: int, seed: int, **options):
  """(config, params) of a tiny model with random weights, reshaped so that greedy outputs change
  from step to step and a wrong position or cache slot shows up in the tokens: with tied
  embeddings a fresh model mostly predicts its last input token again, so the final norm gets
  random signs (1 + scale ~ N(0, 1)), and sharper attention and stronger blocks do the rest."""
  config = sizes.get_size("tiny", vocab_size=vocab_size, **options)
  params = jax.jit(functools.partial(vlm.init_params, vlm.VLM(config)))(jax.random.key(seed))
  rng = np.random.default_rng(0)

  def reshape(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("final_norm/scale"):
      return jnp.asarray(rng.normal(size=x.shape) - 1.0, x.dtype)
    if name.endswith(("q_einsum/w", "kv_einsum/w", "attn_vec_einsum/w", "mlp/linear")):
      return x * 4
    return x

  return config, jax.tree_util.tree_map_with_path(reshape, flax.core.meta.unbox(params))
