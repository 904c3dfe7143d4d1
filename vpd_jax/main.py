"""The `vpd-jax` command: `vpd-jax COMMAND [flags]`.

  traces  run the VPD trace stage: sample, execute and verify programs; write trace records
          vpd-jax traces --config=configs/traces_shapes.py:num_examples=2000,k=5 --output_dir=DIR
  train   train a VLM (SFT on a seqio mixture), with sharding, checkpoints and resumption
          vpd-jax train --config=configs/vpd_sft.py:traces=DIR,vocab=FILE,size=tiny --workdir=W
  eval    decode with the latest checkpoint and score with the seqio Evaluator
          vpd-jax eval --config=configs/vpd_sft.py:... --workdir=W [--task=NAME --split=validation]
  vocab   train a SentencePiece vocabulary (with <loc0000>..<loc1023>) on a trace directory
          vpd-jax vocab --traces=DIR --output=FILE [--vocab_size=4000]
  prepare build an evaluation benchmark from its official files (TFDS manual-download convention)
          vpd-jax prepare vqav2 --manual_dir=DIR --data_dir=DIR
  bench   run one benchmark and write its JSON result
          vpd-jax bench executor --json OUT
  demo    the VPD experiment end to end (what `make demo` runs): traces, two models, evaluation,
          results.json and report.html; a restarted demo resumes after its last finished stage
          vpd-jax demo --config=configs/demo.py[:steps=300,...] --workdir=DIR
  report  rebuild report.html from a demo work directory: vpd-jax report --workdir=DIR
  summarize   vpd - direct margins (mean, std) over demo runs DIR/seed_*: --workdir=DIR
"""

import json
import logging
import os
import sys

# TensorFlow (imported by the record and data layers) is chatty at start-up; warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

COMMANDS = {
    "traces": "run the VPD trace stage (sample, execute, verify programs; write trace records)",
    "train": "train a VLM: --config=configs/vpd_sft.py:... --workdir=DIR",
    "eval": "decode and score: --config=configs/vpd_sft.py:... --workdir=DIR [--task=NAME]",
    "vocab": "train a SentencePiece vocabulary on trace records: --traces=DIR --output=FILE",
    "prepare": "build an evaluation benchmark: vpd-jax prepare NAME --manual_dir=D --data_dir=D",
    "bench": "run a benchmark: vpd-jax bench NAME --json OUT",
    "pairs": "DPO pairs from an SFT run's chains: --config=configs/dpo.py:... --workdir=SFT "
             "--output_dir=DIR",
    "demo": "the VPD experiment end to end: --config=configs/demo.py[:...] --workdir=DIR",
    "report": "rebuild report.html of a demo work directory: --workdir=DIR",
    "summarize": "vpd - direct margins over the demo runs DIR/seed_*: --workdir=DIR",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where `traces` writes its records.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where `train` keeps checkpoints and metrics.")
_TASK = flags.DEFINE_string("task", None, "`eval`: seqio task or mixture (cot, direct, vpd or a name).")
_SPLIT = flags.DEFINE_string("split", "validation", "`eval`: the split to score.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "`eval`: score only this many examples.")
_JSON = flags.DEFINE_string("json", None, "Where `bench` writes its JSON result.")
_TRACES = flags.DEFINE_string("traces", None, "Trace directory `vocab` trains on.")
_OUTPUT = flags.DEFINE_string("output", None, "Where `vocab` writes the SentencePiece model.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4000, "Upper bound on the vocabulary size.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Where the official benchmark files are.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory `prepare` writes to.")
# Multi-host runs (`train`, `eval`): see vpd_jax/distributed.py for how the settings are found.
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "flags", "env", "slurm", "tpu", "none"],
    "`train`/`eval`: how jax.distributed is set up; auto picks the flags below, the JAX_* "
    "environment, a SLURM job step or a Cloud TPU VM, else a single process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None,
                                    "CPU backend: devices per process (local multi-host tests).")


def _usage() -> str:
  lines = ["usage: vpd-jax COMMAND [flags]", "", "commands:"]
  lines += [f"  {name:8s}{text}" for name, text in COMMANDS.items()]
  return "\n".join(lines)


def _traces(argv):
  from vpd_jax.programs import pipeline, records  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"traces: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("traces: --config is required, e.g. --config=configs/traces_shapes.py")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("traces: --output_dir is required")
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  try:
    stats = pipeline.run_traces(_CONFIG.value, _OUTPUT_DIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax traces: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(records.format_statistics(stats))
  print(f"records and statistics.json written to {_OUTPUT_DIR.value}")


def _train(argv):
  from vpd_jax import distributed as distributed_lib  # pylint: disable=g-import-not-at-top
  from vpd_jax.train import loop  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"train: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("train: --config=... and --workdir=DIR are required")
  trainer = loop.train
  if _CONFIG.value.get("trainer") == "pixel_rl":  # configs/pixel_rl.py: warm start, then GRPO
    from vpd_jax.rl import loop as rl_loop  # pylint: disable=g-import-not-at-top
    trainer = rl_loop.train
  try:
    metrics = trainer(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, PermissionError) as e:  # a gs:// workdir's bucket
    print(f"vpd-jax train: error: {e}", file=sys.stderr)
    sys.exit(1)
  if distributed_lib.is_main_process():
    print(json.dumps({k: float(v) for k, v in (metrics or {}).items()}, sort_keys=True))


def _eval(argv):
  from vpd_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"eval: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("eval: --config=... and --workdir=DIR are required")
  try:
    result = evaluate.evaluate(_CONFIG.value, _WORKDIR.value, task=_TASK.value, split=_SPLIT.value,
                               num_examples=_NUM_EXAMPLES.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax eval: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result["metrics"], indent=2, sort_keys=True))
  print(f"written to {os.path.join(_WORKDIR.value, 'eval', result['task'] + '.json')}")


def _pairs(argv):
  from vpd_jax.train import pairs  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"pairs: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _OUTPUT_DIR.value:
    raise app.UsageError("pairs: --config=configs/dpo.py:... --workdir=SFT_WORKDIR "
                         "--output_dir=DIR are required")
  sft_workdir = _WORKDIR.value or _CONFIG.value.get("init_from")
  if not sft_workdir:
    raise app.UsageError("pairs: --workdir=SFT_WORKDIR (or init_from in the config) is required")
  try:
    manifest = pairs.build_pairs(_CONFIG.value, sft_workdir, _OUTPUT_DIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax pairs: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(manifest["statistics"], indent=2, sort_keys=True))
  print(f"pairs and manifest.json written to {_OUTPUT_DIR.value}")


def _vocab(argv):
  from vpd_jax.data import vocab  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"vocab: unexpected arguments {argv[1:]}")
  if not _TRACES.value or not _OUTPUT.value:
    raise app.UsageError("vocab: --traces=DIR and --output=FILE are required")
  try:
    stats = vocab.build_vocabulary_from_traces(_TRACES.value, _OUTPUT.value, _VOCAB_SIZE.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax vocab: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(stats, indent=2, sort_keys=True))


def _prepare(argv):
  from vpd_jax.eval.benchmarks import manual  # pylint: disable=g-import-not-at-top
  if len(argv) != 2:
    raise app.UsageError("prepare: expected one benchmark name, one of "
                         f"{', '.join(manual.known_benchmarks())}")
  if not _MANUAL_DIR.value or not _DATA_DIR.value:
    raise app.UsageError("prepare: --manual_dir=DIR and --data_dir=DIR are required")
  try:
    builder = manual.prepare(argv[1], _MANUAL_DIR.value, _DATA_DIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax prepare: error: {e}", file=sys.stderr)
    sys.exit(1)
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f"{builder.name} prepared in {builder.data_dir}: {json.dumps(splits, sort_keys=True)}")


def _bench(argv):
  import bench  # pylint: disable=g-import-not-at-top
  if len(argv) != 2:
    raise app.UsageError(f"bench: expected one benchmark name, one of {sorted(bench.BENCHMARKS)}")
  result = bench.run_benchmark(argv[1])
  text = json.dumps(result, indent=2, sort_keys=True)
  print(text)
  if _JSON.value:
    from vpd_jax.programs import records  # pylint: disable=g-import-not-at-top
    directory = os.path.dirname(os.path.abspath(_JSON.value))
    os.makedirs(directory, exist_ok=True)
    records.write_atomic(_JSON.value, (text + "\n").encode("utf-8"))


def _demo(argv):
  from absl import logging as demo_logging  # pylint: disable=g-import-not-at-top
  from vpd_jax.experiment import demo  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"demo: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("demo: --config=configs/demo.py[:args] and --workdir=DIR are required")
  # The training loop's progress lines (step, loss, steps/s, ETA) are INFO; the libraries' INFO
  # lines (checkpointing, seqio) would bury them, so only this package's pass below WARNING.
  demo_logging.set_verbosity(demo_logging.INFO)
  demo_logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.WARNING or
      f"{os.sep}vpd_jax{os.sep}" in record.pathname)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  try:
    results = demo.run_demo(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax demo: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(demo.summary_table(results))
  print(f"written: {os.path.join(_WORKDIR.value, demo.RESULTS_FILE)}, "
        f"{os.path.join(_WORKDIR.value, demo.REPORT_FILE)}")


def _report(argv):
  from vpd_jax.experiment import report  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"report: unexpected arguments {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("report: --workdir=DIR (a demo work directory) is required")
  try:
    path = report.write_report(_WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax report: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"written: {path}")


def _summarize(argv):
  from vpd_jax.experiment import summary  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"summarize: unexpected arguments {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("summarize: --workdir=DIR (holding seed_*/results.json) is required")
  try:
    result = summary.summarize(_WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"vpd-jax summarize: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(summary.format_summary(result))
  print(f"written: {os.path.join(_WORKDIR.value, summary.SUMMARY_FILE)}")


_HANDLERS = {"traces": _traces, "train": _train, "eval": _eval, "vocab": _vocab, "prepare": _prepare, "bench": _bench,
             "pairs": _pairs,
             "demo": _demo, "report": _report, "summarize": _summarize}

# Commands that run jax programs and so may span several hosts.
_DISTRIBUTED_COMMANDS = ("train", "eval")


def _with_distributed(handler):
  """`handler` preceded by jax.distributed start-up; hosts other than 0 log warnings only."""
  def run_handler(argv):
    from vpd_jax import distributed as distributed_lib  # pylint: disable=g-import-not-at-top
    try:
      cluster = distributed_lib.resolve(_DISTRIBUTED.value, _COORDINATOR.value,
                                        _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    distributed_lib.initialize(cluster, cpu_devices=_CPU_DEVICES.value)
    if not distributed_lib.is_main_process():
      absl_logging.set_verbosity(absl_logging.WARNING)
    return handler(argv)
  return run_handler


def run():
  """Console-script entry point."""
  argv = list(sys.argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv.pop(1)
  if command not in _HANDLERS:
    print(f"vpd-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  handler = _HANDLERS[command]
  if command in _DISTRIBUTED_COMMANDS:
    handler = _with_distributed(handler)
  app.run(handler, argv=argv)


if __name__ == "__main__":
  run()
