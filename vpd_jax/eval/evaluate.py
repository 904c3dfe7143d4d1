"""Evaluation of a trained run: decode with the latest checkpoint through seqio.Evaluator, score.

  result = evaluate(config, workdir)                          # the config's evaluation task
  result = evaluate(config, workdir, task="shapes.direct", split="validation", num_examples=200)
  result["metrics"]   {"accuracy": 62.5, "accuracy/count": 50.0, ...}   (percent)

`config` is the training config (configs/vpd_sft.py): it names the model size, the mesh, the data
(the trace tasks are registered exactly as the training loop registers them) and the lengths. The
latest checkpoint in `workdir/checkpoints/` is restored (its parameters, LoRA adapters merged in);
a missing checkpoint is an error naming the workdir, a checkpoint of another model size the error
of train/checkpoint.py naming both sizes.

The task (default: `config.eval.task` when the config has one, else NAME.cot, or NAME.direct for a
direct-answer run, or the trained seqio name) runs through `seqio.Evaluator` with unpacked rows of
`VLMFeatureConverter`; each row is decoded from its prompt (image + prefix) by
`models.decode.generate` (greedy unless `sampling` says otherwise, at most `suffix_len` new
tokens), the output is cut at EOS, and seqio decodes, post-processes and scores it with the task's
own `postprocess_fn` and `metric_fns`. Tasks without metrics, such as the trace tasks NAME.cot and
NAME.direct, are scored through a variant registered here, `<task>.eval`, whose metric is answer
accuracy: the final answer (`metrics.extract_final_answer`) of the prediction against that of the
target, both normalised as VQA answers, overall and per question family ("accuracy/<family>")
where the examples carry one. A mixture is scored task by task ("<task>/<metric>").

Output (host 0): `workdir/eval/<task>.json`, written to a temporary name and renamed into place:
{"task", "split", "step" (of the checkpoint), "num_examples", "metrics", "examples": the first
`log_examples` decoded examples per task with question (the prompt), prediction, target, their
final answers and the family}. The same dict is returned.

Several hosts: every host reads the whole (small, unshuffled) evaluation set; each global batch is
assembled from the hosts' slices of it and the decoded tokens are gathered back on every host.
"""

import json
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio
import tensorflow as tf

from vpd_jax import sharding as sharding_lib
from vpd_jax.data import features
from vpd_jax.data import preprocessors as prep
from vpd_jax.data import tasks as tasks_lib
from vpd_jax.eval import metrics
from vpd_jax.models import decode
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.train import checkpoint as checkpoint_lib
from vpd_jax.train import lora as lora_lib
from vpd_jax.train import loop
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib

EVAL_SUBDIR = "eval"
# Suffix of the scored variant of a task that has no metrics of its own (the trace tasks).
VARIANT_SUFFIX = ".eval"
# The features decode.generate reads from a model row.
_DECODE_FEATURES = ("images",) + vlm.ROW_FEATURES




class EvalFeatureConverter(features.VLMFeatureConverter):
  """Unpacked VLM rows for seqio.Evaluator, which passes a length for every output feature of the
  task ("image" included); the rows are sized by the prefix and suffix lengths alone."""

  def __init__(self, num_image_tokens: int):
    super().__init__(num_image_tokens, pack=False)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    return super().__call__(ds, {k: v for k, v in task_feature_lengths.items()
                                 if k in self.TASK_FEATURES})


# ------------------------------------------------------------------------------------ answer metric

def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def answer_postprocessor(text, example=None, is_target=False):
  """seqio postprocess_fn: a prediction's final answer, or a target's final answer and family."""
  answer = metrics.extract_final_answer(_text(text))
  if not is_target:
    return answer
  family = _text(example["family"]) if example is not None and "family" in example else ""
  return {"answer": answer, "family": family}


def answer_accuracy_metric(targets: Sequence[Mapping[str, str]],
                           predictions: Sequence[str]) -> dict:
  """Percent of predictions whose answer equals the target's (VQA normalisation), per family too."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
  if not targets:
    raise ValueError("answer accuracy: no examples to score")
  right = [metrics.normalize_vqa_answer(p) == metrics.normalize_vqa_answer(t["answer"])
           for t, p in zip(targets, predictions)]
  result = {"accuracy": 100.0 * sum(right) / len(right)}
  by_family: dict[str, list] = {}
  for t, r in zip(targets, right):
    if t.get("family"):
      by_family.setdefault(t["family"], []).append(r)
  for family, values in sorted(by_family.items()):
    result[f"accuracy/{family}"] = 100.0 * sum(values) / len(values)
  return result


def scored_name(name: str) -> str:
  """`name` if every task under it has metrics; else the name of a variant scored by answer
  accuracy, registered here (idempotently) from the same source and preprocessors."""
  provider = tasks_lib.get_task_or_mixture(name)
  subtasks = seqio.get_subtasks(provider)
  if all(t.metric_fns or t.metric_objs for t in subtasks):
    return name

  def variant(task: seqio.Task) -> str:
    if task.metric_fns or task.metric_objs:
      return task.name
    scored = task.replace(name=task.name + VARIANT_SUFFIX, postprocess_fn=answer_postprocessor,
                          metric_fns=[answer_accuracy_metric])
    seqio.TaskRegistry.remove(scored.name)
    seqio.TaskRegistry.add_provider(scored.name, scored)
    return scored.name

  if isinstance(provider, seqio.Task):
    return variant(provider)
  members = [variant(t) for t in subtasks]
  mixture = name + VARIANT_SUFFIX
  seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, members, default_rate=1.0)
  return mixture


# ------------------------------------------------------------------------------------ config

def _model_config(config) -> sizes.VLMConfig:
  return sizes.from_model_section(config.model)


def _mesh(config):
  # As the training loop builds it: axes the config leaves out get size 1.
  spec = [tuple(axis) for axis in config.mesh]
  spec += [(name, 1) for name in loop.MESH_AXES if name not in {axis[0] for axis in spec}]
  return sharding_lib.make_mesh(spec)


def default_task(config, trained: str) -> str:
  """config.eval.task when set; else the chain-of-thought task of a trace run (the direct task of
  a direct-answer run), or the seqio name the run trained on."""
  explicit = config.eval.get("task") if "eval" in config else None
  if explicit:
    return resolve_task(config, explicit)
  if config.data.traces:
    kind = "direct" if config.data.train == "direct" else "cot"
    return f"{config.data.name}.{kind}"
  return trained


def resolve_task(config, task: str) -> str:
  """"cot" / "direct" / "vpd" / "cot_all" name the trace tasks of the config; anything else is a
  seqio name."""
  if config.data.traces and task in (*tasks_lib.TASK_KINDS, tasks_lib.MIXTURE_SUFFIX,
                                     tasks_lib.COT_ALL):
    return f"{config.data.name}.{task}"
  return task


def _check_split(name: str, split: str) -> None:
  for task in seqio.get_subtasks(tasks_lib.get_task_or_mixture(name)):
    if split not in task.splits:
      raise ValueError(f"task {task.name} has no split {split!r} (it has {sorted(task.splits)}); "
                       "set val_traces=DIR in the config for a validation split of the trace "
                       "tasks, or evaluate another split")


# ------------------------------------------------------------------------------------ checkpoint

def restore_params(config, workdir: str, model_config: sizes.VLMConfig, mesh,
                   rules=sharding_lib.DEFAULT_RULES) -> tuple[Any, int]:
  """(parameters of the latest checkpoint in `workdir`, LoRA merged; its step)."""
  directory = checkpoint_lib.checkpoint_dir(workdir)
  missing = FileNotFoundError(
      f"workdir {workdir!r} holds no checkpoint (nothing in {directory}); train into it first "
      f"with `vpd-jax train --workdir={workdir}`")
  if not tf.io.gfile.isdir(directory):
    raise missing
  ckpt = checkpoint_lib.Checkpointer(directory, model_size=config.model.size, max_to_keep=None,
                                     async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise missing
    # The checkpoint holds the whole train state; its layout (optimizer state included) comes from
    # the same config, and only the parameters are kept.
    optimizer = optim.make_optimizer(config.optim, config.total_steps)
    abstract, _ = state_lib.abstract_state(vlm.VLM(model_config), vlm.example_inputs(model_config),
                                           optimizer, mesh, rules=rules,
                                           lora_config=config.lora)
    state, meta = ckpt.restore(abstract)
  finally:
    ckpt.close()
  params = state.params if state.lora is None else lora_lib.merge_lora(state.params, state.lora)
  return params, int(meta["step"])


# ------------------------------------------------------------------------------------ prediction

def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  # The last real row is repeated: an all-padding row would have no prompt at all.
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)


def strip_at_eos(tokens: np.ndarray, length: int, sampling: decode.SamplingConfig) -> list[int]:
  """The generated tokens before EOS, padded with pad_id to the full width: seqio stacks every
  prediction of a task into one array, so they must share a length; pad ids decode to nothing."""
  out = [int(t) for t in tokens[:length]]
  if sampling.eos_id is not None and sampling.eos_id in out:
    out = out[:out.index(sampling.eos_id)]
  return out + [sampling.pad_id] * (len(tokens) - len(out))


def make_predict_fn(model_config: sizes.VLMConfig, params, mesh, batch_size: int,
                    sampling: decode.SamplingConfig, rng: jax.Array,
                    rules=sharding_lib.DEFAULT_RULES):
  """seqio predict_fn: (enumerated model-feature dataset) -> [(index, token ids)]."""
  hosts, host = jax.process_count(), jax.process_index()
  shards = sharding_lib.axes_size(mesh, sharding_lib.batch_axes(mesh, rules))
  # Every host feeds an equal slice and every batch shard gets whole rows.
  multiple = int(np.lcm(shards, hosts))
  batch_size = -(-batch_size // multiple) * multiple
  per_host = batch_size // hosts

  def predict_fn(dataset: tf.data.Dataset, model_feature_shapes=None):
    del model_feature_shapes
    results = []
    for n, (indices, batch) in enumerate(dataset.batch(batch_size).as_numpy_iterator()):
      rows = {k: _pad_rows(batch[k], batch_size)[host * per_host:(host + 1) * per_host]
              for k in _DECODE_FEATURES}
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = decode.generate(model_config, params, sharding_lib.shard_batch(rows, mesh, rules),
                              jax.random.fold_in(rng, n), sampling)
      tokens = np.asarray(multihost_utils.process_allgather(out.tokens, tiled=True))
      lengths = np.asarray(multihost_utils.process_allgather(out.lengths, tiled=True))
      for i, index in enumerate(indices):
        results.append((int(index), strip_at_eos(tokens[i], int(lengths[i]), sampling)))
    return results
  return predict_fn


# ------------------------------------------------------------------------------------ evaluate

def evaluate(config, workdir: str, *, task: Optional[str] = None, split: str = "validation",
             num_examples: Optional[int] = None,
             sampling: Optional[decode.SamplingConfig] = None, log_examples: int = 20) -> dict:
  """Scores the latest checkpoint of `workdir` on `task` (see the module docstring)."""
  try:
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to jax
  except RuntimeError:
    pass  # TensorFlow's devices are already set up
  model_config = _model_config(config)
  mesh = _mesh(config)
  params, step = restore_params(config, workdir, model_config, mesh)

  trained = loop.register_tasks(config.data, model_config.vit.image_size,
                                model_config.llm.vocab_size)
  name = resolve_task(config, task) if task else default_task(config, trained)
  _check_split(name, split)
  evaluated = scored_name(name)
  lengths = {"prefix": config.data.prefix_len, "suffix": config.data.suffix_len}
  evaluator = seqio.Evaluator(
      mixture_or_task_name=evaluated,
      feature_converter=EvalFeatureConverter(model_config.num_image_tokens),
      eval_split=split, sequence_length=lengths, num_examples=num_examples,
      target_field_name="suffix", async_compute_metrics=False)
  if not evaluator.eval_tasks:
    raise ValueError(f"task {name!r}: nothing to evaluate on split {split!r}")

  vocab = evaluator.eval_tasks[0].output_features["suffix"].vocabulary
  if sampling is None:
    sampling = decode.SamplingConfig(max_new_tokens=config.data.suffix_len, eos_id=vocab.eos_id,
                                     pad_id=vocab.pad_id)
  batch_size = config.eval.batch_size if "eval" in config else config.batch_size
  predict_fn = make_predict_fn(model_config, params, mesh, batch_size, sampling,
                               jax.random.key(config.seed))
  scores, outputs = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
  scores = scores.result()
  evaluator.close()

  single = len(evaluator.eval_tasks) == 1
  result_metrics, examples, counts = {}, [], {}
  for t in evaluator.eval_tasks:
    label = t.name[:-len(VARIANT_SUFFIX)] if t.name.endswith(VARIANT_SUFFIX) else t.name
    for key, value in scores[t.name].items():
      result_metrics[key if single else f"{label}/{key}"] = float(value)
    tokens = outputs[t.name][seqio.metrics.ModelOutputType.PREDICTION]
    counts[label] = len(tokens)
    examples += _examples(evaluator.cached_task_datasets[t.name], tokens, vocab, label,
                          log_examples)
  record = {"task": name, "split": split, "step": step,
            "num_examples": counts[name] if single and name in counts else counts,
            "metrics": result_metrics, "examples": examples}
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, EVAL_SUBDIR, f"{name}.json"), record)
  return record


def _examples(task_dataset: tf.data.Dataset, tokens, vocab, task_name: str, limit: int) -> list:
  out = []
  for example, ids in zip(task_dataset.take(limit).as_numpy_iterator(), tokens):
    prediction = vocab.decode([int(i) for i in ids])
    target = _text(example.get("suffix_pretokenized", vocab.decode(list(example["suffix"]))))
    item = {"task": task_name, "question": _text(example.get("prefix_pretokenized", "")),
            "prediction": prediction, "target": target,
            "predicted_answer": metrics.extract_final_answer(prediction),
            "target_answer": metrics.extract_final_answer(target)}
    for key in prep.PASSTHROUGH_FEATURES:
      if key in example:
        item[key] = _text(example[key])
    out.append(item)
  return out


def write_json(path: str, record: Mapping) -> None:
  """Writes `record` to a temporary file beside `path` and renames it into place."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)
