"""The VPD experiment end to end (`vpd-jax demo`, what `make demo` runs): results.json + report.html.

  results = run_demo(config, workdir)        # config: configs/demo.py

Stages (each runs once; a restarted demo skips the finished ones, see stages.py):
  traces/train, traces/eval   programs sampled, executed and verified on the training and held-out
                              ShapesVQA splits (workdir/traces/{train,eval}; shards resume)
  vocab                       a SentencePiece vocabulary trained on the training traces
  train/direct, train/vpd     two models from the same initialisation at equal compute (same steps,
                              batch and row length): direct on NAME.direct, vpd on NAME.vpd
                              (workdir/models/{direct,vpd}; checkpoints resume)
  eval/direct, eval/vpd       held-out accuracy per family: both with the direct prompt
                              (NAME.direct), vpd also with the rationale prompt (NAME.cot_all)
  executor                    the program pipeline's own accuracy on the same held-out questions
  latency                     seconds per question: program generation + execution, and each
                              model's answer (greedy decoding, one question at a time)
Then results.json (written atomically) and report.html (report.py).

Executor accuracy is label-free: the first sampled program's answer ("first_program", what one
program per question gives, the headline) and the majority answer of the programs that ran
("majority_vote"), both against the labels, on every held-out question.
"""

import copy
import json
import os
import sys
import time
from typing import Any, Optional, TextIO

import numpy as np

from vpd_jax.experiment import stages as stages_lib
from vpd_jax.programs import records
from vpd_jax.programs import verify

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
MODELS = ("direct", "vpd")
# Prompts each model is scored with: name in results -> trace task kind.
PROMPTS = {"direct": {"direct_prompt": "direct"},
           "vpd": {"direct_prompt": "direct", "rationale_prompt": "cot_all"}}
STAGE_NAMES = ("traces/train", "traces/eval", "vocab", "train/direct", "train/vpd", "eval/direct",
               "eval/vpd", "executor", "latency")
# Rough shares of the total time, for the progress line's estimate of the time left.
STAGE_WEIGHTS = {"traces/train": 1, "traces/eval": 0.5, "vocab": 0.2, "train/direct": 6,
                 "train/vpd": 6, "eval/direct": 1, "eval/vpd": 3, "executor": 0.1, "latency": 1}


def paths(workdir: str) -> dict:
  return {"traces_train": os.path.join(workdir, "traces", "train"),
          "traces_eval": os.path.join(workdir, "traces", "eval"),
          "vocab": os.path.join(workdir, "vocab", "shapes.model"),
          **{f"model_{m}": os.path.join(workdir, "models", m) for m in MODELS},
          "results": os.path.join(workdir, RESULTS_FILE),
          "report": os.path.join(workdir, REPORT_FILE)}


def train_config(config, workdir: str, model: str):
  """The training config of `model` ("direct" or "vpd"): config.train with the demo's data."""
  if model not in MODELS:
    raise ValueError(f"model {model!r} is unknown; expected one of {MODELS}")
  p = paths(workdir)
  cfg = copy.deepcopy(config.train)
  cfg.unlock()
  cfg.data.traces = p["traces_train"]
  cfg.data.val_traces = p["traces_eval"]
  cfg.data.vocab = p["vocab"]
  cfg.data.train = model if model == "direct" else "vpd"
  cfg.lock()
  return cfg


def read_metrics(model_dir: str) -> list[dict]:
  """metrics.jsonl of a training run, one entry per step (the last line of a step counts: a
  resumed run appends), in step order."""
  from vpd_jax.train import loop  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, loop.METRICS_FILE)
  by_step = {int(entry["step"]): entry for entry in records.read_jsonl(path) if "loss" in entry}
  return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------------------------ stages

def _make_traces(trace_config, output_dir: str, stream: Optional[TextIO]) -> dict:
  from vpd_jax.programs import pipeline  # pylint: disable=g-import-not-at-top
  stats = pipeline.run_traces(trace_config, output_dir, progress=stream)
  return stats


def _make_vocab(config, workdir: str) -> dict:
  from vpd_jax.data import vocab  # pylint: disable=g-import-not-at-top
  p = paths(workdir)
  os.makedirs(os.path.dirname(p["vocab"]), exist_ok=True)
  return vocab.build_vocabulary_from_traces(p["traces_train"], p["vocab"], config.vocab_size)


def _train(config, workdir: str, model: str) -> dict:
  from vpd_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = train_config(config, workdir, model)
  model_dir = paths(workdir)[f"model_{model}"]
  start = time.perf_counter()
  loop.train(cfg, model_dir)
  wall = time.perf_counter() - start
  steps = read_metrics(model_dir)
  row_length = cfg.data.prefix_len + cfg.data.suffix_len
  return {"train_steps": len(steps), "final_loss": steps[-1]["loss"] if steps else None,
          "loss_tokens": float(sum(s.get("tokens", 0.0) for s in steps)),
          "text_positions": len(steps) * cfg.batch_size * row_length,
          "wall_time_s": wall,
          "loss_curve": [[int(s["step"]), float(s["loss"])] for s in steps]}


def _accuracy_entry(metrics: dict) -> dict:
  return {"overall": metrics["accuracy"],
          "per_family": {k.split("/", 1)[1]: v for k, v in sorted(metrics.items())
                         if k.startswith("accuracy/")}}


def _evaluate(config, workdir: str, model: str) -> dict:
  from vpd_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  cfg = train_config(config, workdir, model)
  model_dir = paths(workdir)[f"model_{model}"]
  out = {}
  for prompt, kind in PROMPTS[model].items():
    result = evaluate.evaluate(cfg, model_dir, task=kind, split="validation",
                               log_examples=config.traces_eval.input.num_examples)
    out[prompt] = {**_accuracy_entry(result["metrics"]), "task": result["task"],
                   "num_examples": result["num_examples"],
                   "predictions": {e["example_id"]: e["prediction"]
                                   for e in result["examples"] if "example_id" in e}}
  return out


def executor_accuracy(trace_dir: str) -> dict:
  """The program pipeline's label-free answers on the records of `trace_dir`, scored per family."""
  first: dict[str, list] = {}
  majority: dict[str, list] = {}
  for record in records.read_records(trace_dir):
    answers = [a if s == "ok" else None
               for a, s in zip(record.candidate_answers, record.candidate_statuses)]
    if not answers:
      raise ValueError(f"trace record {record.example_id} in {trace_dir} has no candidates")
    ran = [verify.normalize_answer(a) for a in answers if a is not None]
    voted = None
    if ran:
      counts = {a: ran.count(a) for a in ran}
      voted = max(ran, key=lambda a: (counts[a], -ran.index(a)))  # ties: the earliest
    for family in (record.family, "all"):
      first.setdefault(family, []).append(verify.answers_match(answers[0], record.answers))
      majority.setdefault(family, []).append(verify.answers_match(voted, record.answers))

  def score(table):
    return {"overall": 100.0 * np.mean(table["all"]),
            "per_family": {f: 100.0 * np.mean(v) for f, v in sorted(table.items()) if f != "all"}}

  return {"method": "first_program", **score(first), "majority_vote": score(majority),
          "num_examples": len(first.get("all", []))}


def pipeline_latency(trace_config, num_questions: int) -> dict:
  """Seconds per held-out question for the program pipeline: one program sampled and executed,
  one question at a time (the executor's workers started beforehand)."""
  from vpd_jax.programs import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from vpd_jax.programs import generators  # pylint: disable=g-import-not-at-top
  from vpd_jax.programs import sources  # pylint: disable=g-import-not-at-top
  source = sources.make_source(trace_config.input)
  generator = generators.make_generator(trace_config.generator)
  e = trace_config.executor
  count = min(num_questions, len(source.example_ids()))
  times = []
  with executor_lib.ProgramExecutor(num_workers=1, timeout_s=e.timeout_s, cpu_time_s=e.cpu_time_s,
                                    memory_mb=e.memory_mb, max_tool_calls=e.max_tool_calls,
                                    tool_config=e.tools.to_dict()) as executor:
    for i in range(count):
      example = source.load(i)
      start = time.perf_counter()
      program = generator.sample(example.question, 1)[0]
      executor.run(program, example.image)
      times.append(time.perf_counter() - start)
  return {"mean": float(np.mean(times)), "questions": count,
          "generator": trace_config.generator.name}


def model_latency(config, workdir: str, model: str, kind: str, num_questions: int) -> dict:
  """Seconds per held-out question for `model` answering with the prompt of task kind `kind`:
  greedy decoding of one question at a time on one device, after a warm-up call that compiles."""
  import jax  # pylint: disable=g-import-not-at-top
  from vpd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from vpd_jax.data import tasks  # pylint: disable=g-import-not-at-top
  from vpd_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from vpd_jax.models import decode  # pylint: disable=g-import-not-at-top
  from vpd_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = train_config(config, workdir, model)
  model_config = evaluate._model_config(cfg)  # pylint: disable=protected-access
  mesh = sharding_lib.make_mesh([(a, 1) for a in loop.MESH_AXES], devices=jax.devices()[:1])
  params, _ = evaluate.restore_params(cfg, paths(workdir)[f"model_{model}"], model_config, mesh)
  names = loop.register_tasks(cfg.data, model_config.vit.image_size, model_config.llm.vocab_size)
  del names
  task = evaluate.resolve_task(cfg, kind)
  lengths = {"prefix": cfg.data.prefix_len, "suffix": cfg.data.suffix_len}
  dataset = tasks.get_dataset(task, lengths, evaluate.EvalFeatureConverter(
      model_config.num_image_tokens), dataset_split="validation", shuffle=False, batch_size=1)
  vocab = tasks.get_task_or_mixture(task).output_features["suffix"].vocabulary
  sampling = decode.SamplingConfig(max_new_tokens=cfg.data.suffix_len, eos_id=vocab.eos_id,
                                   pad_id=vocab.pad_id)
  times, generated = [], []
  rows = list(dataset.take(num_questions + 1).as_numpy_iterator())
  for n, row in enumerate(rows):
    batch = {k: row[k] for k in ("images",) + evaluate.vlm.ROW_FEATURES}
    start = time.perf_counter()
    out = decode.generate(model_config, params, batch, jax.random.key(0), sampling)
    jax.block_until_ready(out)
    if n:  # the first call compiles
      times.append(time.perf_counter() - start)
      generated.append(int(out.lengths[0]))
  return {"mean": float(np.mean(times)), "questions": len(times),
          "mean_new_tokens": float(np.mean(generated))}


def _latency(config, workdir: str) -> dict:
  n = config.eval.latency_questions
  out = {"program_pipeline": pipeline_latency(config.traces_eval, n)}
  for model in MODELS:
    for prompt, kind in PROMPTS[model].items():
      out[f"{model}/{prompt}"] = model_latency(config, workdir, model, kind, n)
  return out


# ------------------------------------------------------------------------------------ the demo

def run_demo(config, workdir: str, stream: Optional[TextIO] = sys.stderr) -> dict:
  """Runs (or resumes) every stage, writes results.json and report.html; returns the results."""
  from vpd_jax.experiment import report  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  p = paths(workdir)
  stages = stages_lib.Stages(workdir, STAGE_NAMES, STAGE_WEIGHTS, stream=stream)
  traces = {
      "train": stages.run("traces/train", lambda: _make_traces(config.traces_train,
                                                               p["traces_train"], stream)),
      "eval": stages.run("traces/eval", lambda: _make_traces(config.traces_eval,
                                                             p["traces_eval"], stream)),
  }
  vocab = stages.run("vocab", lambda: _make_vocab(config, workdir))
  trained = {m: stages.run(f"train/{m}", lambda m=m: _train(config, workdir, m)) for m in MODELS}
  evaluated = {m: stages.run(f"eval/{m}", lambda m=m: _evaluate(config, workdir, m))
               for m in MODELS}
  executor = stages.run("executor", lambda: executor_accuracy(p["traces_eval"]))
  latency = stages.run("latency", lambda: _latency(config, workdir))

  models = {}
  for m in MODELS:
    models[m] = {**{k: v for k, v in trained[m].items() if k != "loss_curve"},
                 "accuracy": {prompt: {k: v for k, v in entry.items() if k != "predictions"}
                              for prompt, entry in evaluated[m].items()},
                 "loss_curve": trained[m]["loss_curve"]}
  timings = dict(stages.seconds)
  timings["total"] = float(sum(stages.seconds.values()))
  timings["this_run"] = time.perf_counter() - start
  results = {
      "config": config.to_dict(),
      "seed": config.seed,
      "traces": {"train": _trace_summary(traces["train"]), "eval": _trace_summary(traces["eval"]),
                 "vocab": {k: v for k, v in vocab.items() if not isinstance(v, (list, dict))}},
      "models": models,
      "executor_accuracy": executor,
      "timings_s": timings,
      "latency_s_per_question": latency,
  }
  records.write_atomic(p["results"], json.dumps(_plain(results), indent=1, sort_keys=True)
                       .encode("utf-8"))
  predictions = {m: {prompt: entry["predictions"] for prompt, entry in evaluated[m].items()}
                 for m in MODELS}
  report.write_report(workdir, results, predictions)
  return results


def _trace_summary(stats: dict) -> dict:
  overall = stats["all"]
  return {"examples": overall["examples"], "sampled": overall["sampled"],
          "passed": overall["passed"], "kept": overall["kept"],
          "pass_rate": overall["pass_rate"], "kept_rate": overall["kept_rate"],
          "failure_reasons": overall["failure_reasons"],
          "per_family": {f: {k: s[k] for k in ("examples", "sampled", "passed", "kept",
                                               "pass_rate", "kept_rate")}
                         for f, s in stats.items() if f != "all"}}


def _plain(value: Any) -> Any:
  """JSON-ready: numpy scalars to Python numbers, tuples to lists."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def summary_table(results: dict) -> str:
  """The plain-text table `vpd-jax demo` prints: accuracy per family and overall."""
  models = results["models"]
  columns = [("direct", "direct_prompt", "direct"), ("vpd", "direct_prompt", "vpd"),
             ("vpd", "rationale_prompt", "vpd+CoT")]
  families = sorted(results["executor_accuracy"]["per_family"])
  header = ["family"] + [label for _, _, label in columns] + ["programs"]
  rows = []
  for family in families + ["overall"]:
    row = [family]
    for model, prompt, _ in columns:
      entry = models[model]["accuracy"][prompt]
      value = entry["overall"] if family == "overall" else entry["per_family"].get(family)
      row.append("-" if value is None else f"{value:.1f}")
    ex = results["executor_accuracy"]
    value = ex["overall"] if family == "overall" else ex["per_family"].get(family)
    row.append("-" if value is None else f"{value:.1f}")
    rows.append(row)
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  lat = results["latency_s_per_question"]
  lines.append("")
  lines.append("held-out accuracy (%) per question family; programs = the program pipeline's "
               "first program")
  lines.append("seconds per question: programs {:.3f}, direct {:.3f}, vpd {:.3f}, vpd+CoT {:.3f}"
               .format(lat["program_pipeline"]["mean"], lat["direct/direct_prompt"]["mean"],
                       lat["vpd/direct_prompt"]["mean"], lat["vpd/rationale_prompt"]["mean"]))
  lines.append(f"total {results['timings_s']['total']:.0f} s over the stages")
  return "\n".join(lines)
