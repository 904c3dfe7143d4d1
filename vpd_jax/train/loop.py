"""The training loop: `train(config, workdir)`, read top to bottom (big_vision's trainer layout).

  mesh -> input pipeline -> model and optimizer -> init or restore -> update step -> evals -> loop

Config: see configs/vpd_sft.py (seed, total_steps, batch_size, loss, log_every, model, mesh, optim,
lora, data, checkpoint, eval) and configs/dpo.py (loss_args, init_from: a workdir whose latest
parameters start the run; reference: on_the_fly scores pair batches with those parameters frozen).
What lands in `workdir`:

  checkpoints/STEP/   orbax checkpoints (state + input position), every `checkpoint.every` steps,
                      on SIGTERM and at the end; the latest is restored when the run starts again
  metrics.jsonl       one JSON line per train step ({"step", "loss", "grad_norm", "learning_rate",
                      "tokens"}) and per evaluation ({"step", "eval_loss"}), written by host 0;
                      a restarted run appends, so the last line of a step is the one that counts
  events.out.tfevents.*   the same scalars for TensorBoard (clu metric_writers)

A restarted run continues from the latest checkpoint with the same input position, so its losses
are those an uninterrupted run would have had. SIGTERM (preemption) makes the loop save at the end
of the current step and return normally.
"""

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vpd_jax import distributed as distributed_lib
from vpd_jax import sharding as sharding_lib
from vpd_jax import storage
from vpd_jax.data import pairs as pair_data
from vpd_jax.data import tasks
from vpd_jax.data import vocab as vocab_lib
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.train import checkpoint as checkpoint_lib
from vpd_jax.train import data as data_lib
from vpd_jax.train import dpo
from vpd_jax.train import lora as lora_lib
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib
from vpd_jax.train import steps

METRICS_FILE = "metrics.jsonl"
# The mesh axes the sharding rules and the models' activation constraints name.
MESH_AXES = ("data", "fsdp", "tensor")


def register_tasks(data_config, image_size: int, vocab_size_limit: int) -> str:
  """Registers the trace tasks when `data.traces` is set; returns the seqio name to train on.

  With `data.pairs` (DPO) the preference-pair task NAME.pairs is registered too and trained on.
  """
  trained = _register_trace_tasks(data_config, image_size, vocab_size_limit)
  if not data_config.get("pairs"):
    return trained
  if not data_config.vocab:
    raise ValueError("config data.vocab is required with data.pairs (the vocabulary the pairs "
                     "were sampled with)")
  return pair_data.register_pair_task(
      f"{data_config.name}.pairs", data_config.pairs, vocab_lib.load_vocabulary(data_config.vocab),
      image_size, with_reference=data_config.get("converter") == "pairs_with_reference")


def _register_trace_tasks(data_config, image_size: int, vocab_size_limit: int) -> str:
  if not data_config.traces:
    return data_config.train  # a task or mixture registered elsewhere, by its full name
  if not data_config.vocab:
    raise ValueError("config data.vocab is required with data.traces: build one with "
                     "`vpd-jax vocab --traces=DIR --output=FILE`")
  vocab = vocab_lib.load_vocabulary(data_config.vocab)
  if vocab.vocab_size > vocab_size_limit:
    raise ValueError(f"vocabulary {data_config.vocab} has {vocab.vocab_size} pieces but the "
                     f"model's embedding holds {vocab_size_limit}")
  splits = {"train": data_config.traces}
  if data_config.val_traces:
    splits["validation"] = data_config.val_traces
  names = tasks.register_trace_tasks(data_config.name, splits, vocab, image_size=image_size)
  return names.get(data_config.train, data_config.train)


class MetricsLog:
  """metrics.jsonl beside TensorBoard; only host 0 writes."""

  def __init__(self, workdir: str):
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    self._file = None
    if jax.process_index() == 0:
      self._file = tf.io.gfile.GFile(os.path.join(workdir, METRICS_FILE), "a")

  def write(self, step: int, scalars: dict) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._writer.write_scalars(step, scalars)
    if self._file is not None:
      self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    self._writer.flush()
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    self._writer.close()
    if self._file is not None:
      self._file.close()


def train(config: Any, workdir: str) -> dict:
  """Trains as `config` says, checkpointing into `workdir`; returns the last step's metrics.

  Pending checkpoint writes are awaited, and the SIGTERM handler and metric files closed, also when
  training fails.
  """
  with contextlib.ExitStack() as cleanup:
    return _train(config, workdir, cleanup)


def _train(config: Any, workdir: str, cleanup: contextlib.ExitStack) -> dict:
  for key, value in (("total_steps", config.total_steps), ("log_every", config.log_every),
                     ("checkpoint.every", config.checkpoint.every)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config {key}={value!r}: expected a positive number of steps")
  try:
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to jax
  except RuntimeError:
    pass  # TensorFlow's devices are already set up (an earlier run in this process)
  if storage.is_gcs(workdir):  # pods write checkpoints and logs to a bucket: fail early, by name
    storage.check_bucket(workdir)
  tf.io.gfile.makedirs(workdir)

  # ---------------------------------------------------------------- mesh
  # Axes the config leaves out get size 1: the models' activation constraints name all three.
  mesh_spec = [tuple(axis) for axis in config.mesh]
  mesh_spec += [(name, 1) for name in MESH_AXES
                if name not in {axis[0] for axis in mesh_spec}]
  mesh = sharding_lib.make_mesh(mesh_spec)
  rules = sharding_lib.DEFAULT_RULES
  logging.info("mesh %s over %d devices (%d hosts)", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ---------------------------------------------------------------- input pipeline
  model_config = sizes.from_model_section(config.model)
  train_name = register_tasks(config.data, model_config.vit.image_size,
                              model_config.llm.vocab_size)
  input_config = data_lib.InputConfig(
      name=train_name,
      task_feature_lengths={"prefix": config.data.prefix_len, "suffix": config.data.suffix_len},
      batch_size=config.batch_size, num_image_tokens=model_config.num_image_tokens,
      seed=config.seed, pack=config.data.pack, max_images_per_row=config.data.images_per_row,
      converter=config.data.get("converter", "vlm"))
  train_input = data_lib.TrainInput(input_config)

  # ---------------------------------------------------------------- model and optimizer
  model = vlm.VLM(model_config)
  optimizer = optim.make_optimizer(config.optim, config.total_steps)
  schedule = optim.make_schedule(config.optim, config.total_steps)
  loss_fn = steps.get_loss(config.loss)
  if config.get("loss_args"):  # e.g. DPO's beta
    loss_fn = functools.partial(loss_fn, **config.loss_args)
  apply_fn = steps.make_apply_fn(model)
  init_inputs = vlm.example_inputs(model_config)  # parameter shapes do not depend on the batch

  # ---------------------------------------------------------------- init or restore
  state_kwargs = dict(rules=rules, lora_config=config.lora)
  abstract, shardings = state_lib.abstract_state(model, init_inputs, optimizer, mesh,
                                                 **state_kwargs)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                     model_size=config.model.size,
                                     max_to_keep=config.checkpoint.keep)
  cleanup.callback(ckpt.close)  # waits for writes in flight
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract)
    train_input.restore(meta["data"])
    logging.info("restored checkpoint step %d from %s (input position %d)", meta["step"],
                 ckpt.directory, train_input.position)
  else:
    state, _ = state_lib.create_sharded_state(model, init_inputs, optimizer, mesh,
                                              rng=config.seed, **state_kwargs)
    logging.info("initialised %s: %d parameters", config.model.size,
                 vlm.count_params(abstract.params))
    if config.get("init_from"):  # e.g. DPO from the SFT run; the optimizer state starts afresh
      params, from_step = dpo.load_params(config.init_from, config.model.size, abstract.params)
      state = state.replace(params=params)
      logging.info("parameters from %s (step %d)", config.init_from, from_step)
  start = int(np.asarray(state.step.addressable_data(0)))  # replicated; host-local read

  # ---------------------------------------------------------------- reference model (DPO)
  # reference=on_the_fly: the init_from parameters, frozen, score every pair batch before the step.
  add_reference = lambda batch: batch
  if config.get("reference") == "on_the_fly":
    if not config.get("init_from"):
      raise ValueError("config reference=on_the_fly needs init_from (the reference model's run)")
    reference_params, _ = dpo.load_params(config.init_from, config.model.size, abstract.params)
    reference_fn = dpo.make_reference_fn(apply_fn, mesh, shardings.params, rules)
    add_reference = lambda batch: {**batch, dpo.REFERENCE_KEY: reference_fn(reference_params,
                                                                             batch)}

  # ---------------------------------------------------------------- update step
  trainable_mask = None
  if config.lora is None and any(mult is None for _, mult in config.optim.param_groups):
    trainable_mask = optim.trainable_mask(abstract.params, config.optim)
  train_step = steps.make_train_step(
      loss_fn, apply_fn, optimizer, mesh, shardings, rules=rules, learning_rate_fn=schedule,
      grad_accum_steps=config.optim.grad_accum_steps, trainable_mask=trainable_mask)

  # ---------------------------------------------------------------- evals
  # Validation loss on the first `eval.steps` batches of the validation split, the same batches at
  # every evaluation; decoding-based accuracy is vpd_jax/eval's job.
  eval_every = config.eval.every
  eval_input = None
  if eval_every:
    eval_input = data_lib.EvalInput(
        dataclasses.replace(input_config, split=config.eval.split,
                            batch_size=config.eval.batch_size), config.eval.steps)

  def eval_loss(state, batch):
    params = state.params if state.lora is None else lora_lib.merge_lora(state.params, state.lora)
    loss, aux = loss_fn(params, batch, None, apply_fn)
    weight = jnp.asarray(aux.get("weight", 1.0), jnp.float32)
    return loss * weight, weight

  eval_step = jax.jit(eval_loss, in_shardings=(shardings, sharding_lib.batch_sharding(mesh, rules)),
                      out_shardings=sharding_lib.replicated(mesh))

  def evaluate(state, step):
    total = weight = 0.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for batch in eval_input:
        loss_sum, w = eval_step(state, add_reference(sharding_lib.shard_batch(batch, mesh, rules)))
        total, weight = total + loss_sum, weight + w
    value = float(total / max(float(weight), 1e-12))
    log.write(step, {"eval_loss": value})
    logging.info("step %d: eval_loss %.4f", step, value)

  # ---------------------------------------------------------------- loop
  total_steps = config.total_steps
  log = cleanup.enter_context(contextlib.closing(MetricsLog(workdir)))
  preempted = checkpoint_lib.PreemptionSignal()
  cleanup.callback(preempted.close)
  pending = []  # (step, device metrics) not yet written: fetching every step would stall dispatch
  interval_start, interval_steps, interval_tokens = None, 0, 0
  last = {}

  def flush_metrics():
    nonlocal last
    for s, values in jax.device_get(pending):
      last = {k: float(v) for k, v in values.items()}
      log.write(s, last)
    pending.clear()
    log.flush()

  if start >= total_steps:
    logging.info("step %d: the run is already complete (total_steps=%d)", start, total_steps)
  for step in range(start + 1, total_steps + 1):
    batch = next(train_input)
    interval_tokens += data_lib.count_tokens(batch) * jax.process_count()
    global_batch = add_reference(sharding_lib.shard_batch(batch, mesh, rules))
    if step == start + 1 and jax.process_count() > 1:
      # Hosts finish compiling at different times, and the CPU collectives (gloo) give a late host
      # only 30 s to join the first one: compile, then meet at a coordination-service barrier.
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step.jitted.lower(state, global_batch).compile()
      distributed_lib.wait_for_all_hosts("train step compiled")
    state, metrics = train_step(state, global_batch)
    pending.append((step, metrics))
    interval_steps += 1

    if interval_start is None:  # the first step compiles; rates start after it
      jax.block_until_ready(metrics)
      logging.info("step %d: compiled and ran the first step", step)
      interval_start, interval_steps, interval_tokens = time.perf_counter(), 0, 0

    stop = preempted.reached(step)
    if step % config.log_every == 0 or step == total_steps or stop:
      flush_metrics()
      elapsed = max(time.perf_counter() - interval_start, 1e-9)
      rate = interval_steps / elapsed
      eta = datetime.timedelta(seconds=round((total_steps - step) / rate)) if rate else "?"
      logging.info("step %d/%d  loss %.4f  %.2f steps/s  %.0f tokens/s  ETA %s", step,
                   total_steps, last["loss"], rate, interval_tokens / elapsed, eta)
      if interval_steps:
        log.write(step, {"steps_per_sec": rate, "tokens_per_sec": interval_tokens / elapsed})
      interval_start, interval_steps, interval_tokens = time.perf_counter(), 0, 0

    if step % config.checkpoint.every == 0 or step == total_steps or stop:
      ckpt.save(step, state, train_input.state())

    if eval_every and (step % eval_every == 0 or step == total_steps):
      evaluate(state, step)

    if stop:
      logging.warning("step %d: stopping after a termination signal; checkpoint saved", step)
      break

  # The final checkpoint was started at the last step; `cleanup` waits for it to be written.
  flush_metrics()
  return last
