"""Losses and the one sharded train step every training recipe shares.

A loss has the signature

  loss_fn(params, batch, rng, apply_fn) -> (loss, aux)

where `apply_fn(params, batch, rng)` runs the model on a batch (see `make_apply_fn`) and `aux` is a
dict of scalars. Two aux entries have a meaning for the step: "weight", the count the loss is a
mean over (tokens for SFT, pairs for DPO), which makes accumulated micro-batches average exactly
like one large batch; and "tokens", reported summed. Other aux scalars are reported averaged with
the weights. SFT, DPO and GRPO differ only in their loss, registered in LOSSES by name:

  @register_loss("sft")
  def ...(params, batch, rng, apply_fn): ...

`make_train_step(loss_fn, apply_fn, optimizer, mesh, state_shardings, ...)` returns a jitted
`step(state, batch) -> (state, metrics)` with metrics loss, grad_norm (before clipping),
learning_rate and tokens. With `grad_accum_steps=N` the batch's rows are split into N
micro-batches (row i goes to micro-batch i % N, so every device keeps its own rows) whose
gradients are summed in a scan: one call is one optimizer step. With LoRA (state.lora set) the
gradient is taken with respect to the adapters and the model sees `merge_lora(params, lora)`;
with `trainable_mask` only the parameters marked True are differentiated and the others come back
bit for bit.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from vpd_jax import sharding as sharding_lib
from vpd_jax.train import lora as lora_lib
from vpd_jax.train.state import TrainState

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Callable], Tuple[jax.Array, Dict]]
LOSSES: Dict[str, LossFn] = {}

# The model's inputs among a batch's features (data/features.py); the rest feed the losses.
MODEL_INPUTS = ("images", "tokens", "image_slot", "ar_flag", "positions", "segment_ids")
SUMMED_AUX = ("tokens", "weight")


def register_loss(name: str):
  """Decorator: adds a loss function to LOSSES under `name`."""
  def wrap(fn):
    if name in LOSSES:
      raise ValueError(f"loss {name!r} is registered twice")
    LOSSES[name] = fn
    return fn
  return wrap


def get_loss(name: str) -> LossFn:
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(sorted(LOSSES))}")
  return LOSSES[name]


def make_apply_fn(model: nn.Module) -> Callable:
  """apply_fn(params, batch, rng) -> logits [B, L, V] for a VLM fed the data layer's rows."""
  def apply_fn(params, batch, rng=None):
    missing = [k for k in MODEL_INPUTS if k not in batch]
    if missing:
      raise ValueError(f"batch lacks model input(s) {missing}; it has {sorted(batch)}")
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params}, **{k: batch[k] for k in MODEL_INPUTS}, rngs=rngs)
  apply_fn.model = model  # for losses that need more than the logits ("sft_chunked")
  return apply_fn


def sft_loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> Tuple[jax.Array, Dict]:
  """Mean next-token cross-entropy over the tokens where batch["loss_mask"] is 1 (float32)."""
  logits = logits.astype(jnp.float32)
  targets = batch["targets"]
  # logsumexp - logit[target] is log-softmax without materialising a second [B, L, V] array.
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.sum(mask)
  loss = jnp.sum(nll * mask) / jnp.maximum(tokens, 1.0)
  return loss, {"tokens": tokens, "weight": tokens}


@register_loss("sft")
def sft(params, batch, rng, apply_fn):
  """Supervised fine-tuning: the model's logits on the batch, scored by `sft_loss`."""
  return sft_loss(apply_fn(params, batch, rng), batch)


# Sequence positions per chunk of the "sft_chunked" loss: [B, CE_CHUNK, V] float32 logits at once.
CE_CHUNK = 64


@register_loss("sft_chunked")
def sft_chunked(params, batch, rng, apply_fn):
  """`sft` with the output projection and cross-entropy computed CE_CHUNK positions at a time
  (kernels/cross_entropy.py), so the [B, L, V] logits never exist; same loss and gradients.
  Needs an apply_fn from `make_apply_fn` (it runs the model for its hidden states)."""
  from vpd_jax.kernels import cross_entropy  # pylint: disable=g-import-not-at-top
  model = getattr(apply_fn, "model", None)
  if model is None:
    raise ValueError("loss 'sft_chunked' needs an apply_fn made by make_apply_fn (it reads "
                     "apply_fn.model)")
  variables = {"params": params}
  rngs = {} if rng is None else {"dropout": rng}
  hidden = model.apply(variables, **{k: batch[k] for k in MODEL_INPUTS}, return_hidden=True,
                       rngs=rngs)
  # The tied output layer exactly as Gemma.logits uses it (cast to the compute dtype).
  embedding = model.apply(variables, method=lambda m: m.llm.embedder.input_embedding)
  cfg = model.config
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.sum(mask)
  loss = cross_entropy.weighted_cross_entropy(
      hidden, embedding.astype(cfg.dtype), batch["targets"], mask / jnp.maximum(tokens, 1.0),
      chunk=CE_CHUNK, softcap=cfg.llm.final_logit_softcap)
  return loss, {"tokens": tokens, "weight": tokens}


def synthetic_batch(num_image_tokens: int, image_size: int, vocab_size: int, batch_size: int,
                    seed: int = 0, prefix_len: int = 4, suffix_len: int = 8,
                    examples_per_row: int = 2) -> Dict[str, np.ndarray]:
  """Random packed rows in the data layer's layout (data/features.py), for tests and benchmarks.

  Each row packs `examples_per_row` examples (image tokens, prefix, a suffix of random length),
  each with its own segment id and image slot, then padding.
  """
  rng = np.random.default_rng(seed)
  span = num_image_tokens + prefix_len + suffix_len
  length = span * examples_per_row
  rows = {k: np.zeros((batch_size, length), np.int32) for k in
          ("tokens", "image_slot", "ar_flag", "positions", "segment_ids", "loss_mask", "targets")}
  rows["image_slot"][:] = -1
  for r in range(batch_size):
    start = 0
    for e in range(examples_per_row):
      n = num_image_tokens + prefix_len + int(rng.integers(2, suffix_len + 1))
      body = slice(start, start + n)
      tokens = rng.integers(1, vocab_size, size=n).astype(np.int32)
      tokens[:num_image_tokens] = 0
      rows["tokens"][r, body] = tokens
      rows["image_slot"][r, start:start + num_image_tokens] = e
      rows["ar_flag"][r, start + num_image_tokens + prefix_len:start + n] = 1
      rows["positions"][r, body] = np.arange(n)
      rows["segment_ids"][r, body] = e + 1
      rows["targets"][r, start:start + n - 1] = tokens[1:]
      rows["loss_mask"][r, start + num_image_tokens + prefix_len - 1:start + n - 1] = 1
      start += n
  rows["images"] = rng.uniform(-1, 1, (batch_size, examples_per_row, image_size, image_size, 3)
                               ).astype(np.float32)
  return rows


def _split_micro_batches(batch, n: int, mesh, rules):
  """[B, ...] -> [n, B / n, ...], micro-batch j holding rows j, j + n, j + 2n, ...

  Each device then holds its own rows of every micro-batch. The layout is pinned only when B / n
  divides over the batch shards: XLA's padded layout for an uneven split gave wrong gradients
  inside the scan (jax 0.10.2, CPU), and unpinned it stays correct.
  """
  axes = sharding_lib.batch_axes(mesh, rules)
  shards = sharding_lib.axes_size(mesh, axes)
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows cannot be split into grad_accum_steps={n} "
                       "micro-batches")
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    if (x.shape[1] % shards) == 0:
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, axes)))
    return x
  return jax.tree.map(split, batch)


def _gradients(micro_loss, trainable, batch, rng, n: int, mesh, rules):
  """(weighted mean loss, summed/averaged aux, gradient of the weighted mean loss)."""
  if n == 1:
    (loss, aux), grads = jax.value_and_grad(micro_loss, has_aux=True)(trainable, batch, rng)
    return loss, {k: v for k, v in aux.items()}, grads

  def weighted(t, mb, r):
    loss, aux = micro_loss(t, mb, r)
    weight = jax.lax.stop_gradient(jnp.asarray(aux.get("weight", 1.0), jnp.float32))
    return loss * weight, (aux, weight)

  def body(carry, xs):
    grads_sum, totals = carry
    mb, j = xs
    (weighted_loss, (aux, weight)), grads = jax.value_and_grad(weighted, has_aux=True)(
        trainable, mb, jax.random.fold_in(rng, j))
    grads_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grads_sum, grads)
    new = {"loss": weighted_loss, "weight_total": weight}
    for key, value in aux.items():
      value = jnp.asarray(value, jnp.float32)
      new[key] = value if key in SUMMED_AUX else value * weight
    return (grads_sum, jax.tree.map(jnp.add, totals, new)), None

  micro = _split_micro_batches(batch, n, mesh, rules)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
  aux_shapes = jax.eval_shape(lambda t, mb: micro_loss(t, mb, rng)[1], trainable,
                              jax.tree.map(lambda x: x[0], micro))
  totals = {"loss": jnp.zeros(()), "weight_total": jnp.zeros(()),
            **{k: jnp.zeros(()) for k in aux_shapes}}
  (grads_sum, totals), _ = jax.lax.scan(body, (zeros, totals), (micro, jnp.arange(n)))
  denom = jnp.maximum(totals.pop("weight_total"), 1e-12)
  grads = jax.tree.map(lambda g, t: (g / denom).astype(t.dtype), grads_sum, trainable)
  loss = totals.pop("loss") / denom
  aux = {k: v if k in SUMMED_AUX else v / denom for k, v in totals.items()}
  return loss, aux, grads


def make_train_step(loss_fn: LossFn, apply_fn: Callable, optimizer: optax.GradientTransformation,
                    mesh, state_shardings: TrainState, batch_shardings: Any = None, *,
                    rules=sharding_lib.DEFAULT_RULES,
                    learning_rate_fn: Optional[Callable] = None, grad_accum_steps: int = 1,
                    trainable_mask: Any = None, donate: bool = True) -> Callable:
  """The jitted step(state, batch) -> (state, metrics); see the module docstring.

  batch_shardings: a sharding (or tree of them) for the batch; default: rows over the batch axes.
  learning_rate_fn: the optimizer's schedule (optim.make_schedule), reported as learning_rate
    (NaN without it).
  trainable_mask: a bool tree over state.params (optim.trainable_mask); False leaves are not
    differentiated and come back unchanged. Not used with LoRA, where all parameters are frozen.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
  if batch_shardings is None:
    batch_shardings = sharding_lib.batch_sharding(mesh, rules)

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    use_lora = state.lora is not None
    if use_lora and trainable_mask is not None:
      raise ValueError("trainable_mask cannot be combined with LoRA: with adapters every "
                       "parameter is frozen")
    if use_lora:
      trainable, frozen = state.lora, state.params
      full = lambda t: lora_lib.merge_lora(frozen, t)
    elif trainable_mask is not None:
      trainable = jax.tree.map(lambda m, p: p if m else None, trainable_mask, state.params)
      frozen = jax.tree.map(lambda m, p: None if m else p, trainable_mask, state.params)
      full = lambda t: jax.tree.map(lambda m, a, b: a if m else b, trainable_mask, t, frozen)
    else:
      trainable, full = state.params, lambda t: t

    def micro_loss(t, mb, r):
      return loss_fn(full(t), mb, r, apply_fn)

    loss, aux, grads = _gradients(micro_loss, trainable, batch, step_rng, grad_accum_steps,
                                  mesh, rules)
    grad_norm = optax.global_norm(grads)
    target = state.lora if use_lora else state.params
    if trainable_mask is not None and not use_lora:
      # Frozen leaves get zero gradients for the optimizer's set_to_zero branch (never read).
      grads = jax.tree.map(lambda m, g, p: g if m else jnp.zeros_like(p),
                           trainable_mask, grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, target)
    updated = optax.apply_updates(target, updates)
    if trainable_mask is not None and not use_lora:
      updated = jax.tree.map(lambda m, new, old: new if m else old,
                             trainable_mask, updated, state.params)
    new_state = state.replace(
        step=state.step + 1, opt_state=opt_state, rng=jax.random.key_data(rng),
        **({"lora": updated} if use_lora else {"params": updated}))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "tokens": jnp.asarray(aux.pop("tokens", 0.0), jnp.float32)}
    metrics["learning_rate"] = (jnp.asarray(learning_rate_fn(state.step), jnp.float32)
                                if learning_rate_fn is not None else jnp.float32(jnp.nan))
    metrics.update({k: v for k, v in aux.items() if k != "weight"})
    return new_state, metrics

  jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())

  def run(state: TrainState, batch) -> Tuple[TrainState, Dict[str, jax.Array]]:
    # The mesh and rules must be current while tracing, for the models' activation constraints.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch)
  run.jitted = jitted
  return run
