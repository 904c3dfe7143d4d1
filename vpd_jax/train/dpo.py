"""Direct preference optimisation (DPO) on (chosen, rejected) chain pairs, and its reference model.

The loss is registered as "dpo" in train/steps.py's LOSSES. A pair batch (data/pairs.py) holds,
per pair p, two rows sharing one prompt and one image:

  images                       float32 [P, 1, H, W, 3]
  tokens, targets, loss_mask,  int32 [P, 2, L]: row 0 the chosen chain, row 1 the rejected one
  ar_flag, positions, segment_ids, image_slot
  ref_logp                     float32 [P, 2]: the frozen reference model's log-probability of each
                               chain (stored with the pairs, or added by the training loop)

Sigmoid DPO (Rafailov et al., 2023), as LLaVA-Reasoner trains it (beta = 0.1):

  r_c = beta * (log pi(chosen) - log ref(chosen))
  r_r = beta * (log pi(rejected) - log ref(rejected))
  loss = mean over pairs of -log sigmoid(r_c - r_r)  [+ sft_weight * NLL(chosen) / |chosen|]

The optional SFT term is the chosen chain's per-token negative log-likelihood, so that every term
is a mean over pairs and the step's "weight" aux (the number of pairs) averages micro-batches
exactly. A pair whose chosen or rejected row has no target token is padding and is not counted.

`make_reference_fn` computes ref_logp with frozen parameters inside jit (the on-the-fly mode);
`load_params` reads the parameters of a run's latest checkpoint (the SFT model the DPO run starts
from, which is also its reference).
"""

import os
from typing import Any, Callable, Dict, Mapping, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorflow as tf

from vpd_jax import sharding as sharding_lib
from vpd_jax.train import checkpoint as checkpoint_lib
from vpd_jax.train import steps

DEFAULT_BETA = 0.1  # LLaVA-Reasoner's (and the DPO paper's) default
# Per-row features of a pair batch, [P, 2, L]; the image is shared by both rows of a pair.
PAIR_ROW_FEATURES = ("tokens", "targets", "loss_mask", "ar_flag", "positions", "segment_ids",
                     "image_slot")
REFERENCE_KEY = "ref_logp"


def sequence_logp(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Sum over the masked positions of log p(target): float32 [B] from logits [B, L, V]."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_logp = target_logits - jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(token_logp * loss_mask.astype(jnp.float32), axis=-1)


def pair_rows(batch: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
  """A pair batch as 2P ordinary rows (row 2p chosen, 2p + 1 rejected), each with its image."""
  missing = [k for k in ("images",) + PAIR_ROW_FEATURES if k not in batch]
  if missing:
    raise ValueError(f"pair batch lacks feature(s) {missing}; it has {sorted(batch)} (DPO needs "
                     "the rows of data/pairs.py's PairFeatureConverter)")
  tokens = batch["tokens"]
  if tokens.ndim != 3 or tokens.shape[1] != 2:
    raise ValueError(f"pair batch feature 'tokens' must be [pairs, 2, length], got shape "
                     f"{tuple(tokens.shape)}")
  rows = {k: batch[k].reshape((-1,) + batch[k].shape[2:]) for k in PAIR_ROW_FEATURES}
  rows["images"] = jnp.repeat(batch["images"], 2, axis=0)
  return rows


def pair_logps(params, batch: Mapping[str, jax.Array], rng, apply_fn: Callable
               ) -> Tuple[jax.Array, jax.Array]:
  """(log-probabilities [P, 2] of the chosen and rejected chains, target tokens [P, 2])."""
  rows = pair_rows(batch)
  logits = apply_fn(params, rows, rng)
  logp = sequence_logp(logits, rows["targets"], rows["loss_mask"]).reshape(-1, 2)
  tokens = jnp.sum(rows["loss_mask"].astype(jnp.float32), axis=-1).reshape(-1, 2)
  return logp, tokens


def dpo_loss(policy_logp: jax.Array, ref_logp: jax.Array, tokens: jax.Array,
             beta: float = DEFAULT_BETA, sft_weight: float = 0.0) -> Tuple[jax.Array, Dict]:
  """Sigmoid DPO over pairs from [P, 2] log-probabilities (chosen, rejected) and token counts.

  Returns (loss, aux) with aux weight (pairs counted), tokens, reward_margin (mean r_c - r_r),
  reward_accuracy (share of pairs with r_c > r_r), chosen_reward, rejected_reward, chosen_logp,
  rejected_logp (means over pairs of the policy's sums) and, with an SFT term, sft_nll.
  """
  if beta <= 0:
    raise ValueError(f"DPO beta must be > 0, got {beta!r}")
  if sft_weight < 0:
    raise ValueError(f"DPO sft_weight must be >= 0, got {sft_weight!r}")
  policy_logp = policy_logp.astype(jnp.float32)
  ref_logp = jax.lax.stop_gradient(ref_logp.astype(jnp.float32))
  valid = ((tokens[:, 0] > 0) & (tokens[:, 1] > 0)).astype(jnp.float32)
  count = jnp.sum(valid)
  mean = lambda x: jnp.sum(x * valid) / jnp.maximum(count, 1.0)

  rewards = beta * (policy_logp - ref_logp)
  margin = rewards[:, 0] - rewards[:, 1]
  per_pair = jax.nn.softplus(-margin)  # -log sigmoid(margin), stable for large |margin|
  aux = {}
  if sft_weight:
    sft_nll = -policy_logp[:, 0] / jnp.maximum(tokens[:, 0], 1.0)
    per_pair = per_pair + sft_weight * sft_nll
    aux["sft_nll"] = mean(sft_nll)
  aux.update({
      "weight": count, "tokens": jnp.sum(tokens * valid[:, None]),
      "reward_margin": mean(margin), "reward_accuracy": mean((margin > 0).astype(jnp.float32)),
      "chosen_reward": mean(rewards[:, 0]), "rejected_reward": mean(rewards[:, 1]),
      "chosen_logp": mean(policy_logp[:, 0]), "rejected_logp": mean(policy_logp[:, 1]),
  })
  return mean(per_pair), aux


@steps.register_loss("dpo")
def dpo(params, batch, rng, apply_fn, *, beta: float = DEFAULT_BETA, sft_weight: float = 0.0):
  """DPO on a pair batch carrying the reference log-probabilities as batch["ref_logp"]."""
  if REFERENCE_KEY not in batch:
    raise ValueError(f"pair batch lacks '{REFERENCE_KEY}': store reference log-probabilities "
                     "with the pairs (`vpd-jax pairs` with reference=stored) or compute them "
                     "during training (reference=on_the_fly)")
  logp, tokens = pair_logps(params, batch, rng, apply_fn)
  return dpo_loss(logp, batch[REFERENCE_KEY], tokens, beta=beta, sft_weight=sft_weight)


def make_reference_fn(apply_fn: Callable, mesh, param_shardings: Any,
                      rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """reference(params, batch) -> float32 [P, 2] log-probabilities, jitted on `mesh`.

  `params` are the frozen reference parameters laid out as `param_shardings`; `batch` is a sharded
  pair batch (its "ref_logp", if any, is ignored). The result is sharded like the batch's rows.
  """
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)

  def reference(params, batch):
    batch = {k: v for k, v in batch.items() if k != REFERENCE_KEY}
    return pair_logps(params, batch, None, apply_fn)[0]

  jitted = jax.jit(reference, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=batch_sharding)

  def run(params, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(params, batch)
  return run


def load_params(workdir: str, model_size: str, abstract_params: Any) -> Tuple[Any, int]:
  """(parameters of the latest checkpoint in `workdir`, laid out as `abstract_params`; its step).

  Only the parameters are read, so the run that wrote the checkpoint may have used another
  optimizer. A checkpoint with LoRA adapters is refused: merge them into the base parameters first.
  """
  directory = checkpoint_lib.checkpoint_dir(workdir)
  missing = FileNotFoundError(f"workdir {workdir!r} holds no checkpoint (nothing in {directory}) "
                              "to start from; train the SFT model into it first")
  if not tf.io.gfile.isdir(directory):
    raise missing
  checkpointer = checkpoint_lib.Checkpointer(directory, model_size=model_size, max_to_keep=None,
                                             async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise missing
    meta = checkpointer.read_meta(step)
    where = f"checkpoint {os.path.join(directory, str(step))}"
    if meta.get("model_size") != model_size:
      raise ValueError(f"{where} holds model size {meta.get('model_size')!r}, but this config "
                       f"has model size {model_size!r}")
    saved = meta.get("shapes", {})
    if any(name.startswith("lora/") for name in saved):
      raise ValueError(f"{where} holds LoRA adapters; starting from it needs merged parameters")
    wanted = {f"params/{k}": v for k, v in checkpoint_lib.leaf_shapes(abstract_params).items()}
    for name, shape in wanted.items():
      if list(saved.get(name, [])) != list(shape):
        raise ValueError(f"{where}: parameter {name} has shape {saved.get(name)} there but "
                         f"{tuple(shape)} in this config's model")
  finally:
    checkpointer.close()
  manager = ocp.CheckpointManager(directory, item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    target = {"params": checkpoint_lib.abstract_like(abstract_params)}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    manager.close()
  logging.info("read the parameters of %s (step %d)", directory, step)
  return restored["state"]["params"], int(step)
