"""Benchmarks. Each module's `run()` returns one JSON object:
{"name", "metric", "value", "unit", "goal", "higher_is_better", "device", "details"}.
"""

import importlib
import platform

import os

BENCHMARKS = {
    "executor": "bench.executor",  # programs executed per second, tools included, 1 and 2 workers
    "tools": "bench.tools_accuracy",  # accuracy of the pixel tools against the scene graph
    "input": "bench.input",  # examples/s of the training input pipeline, packed and unpacked
    "decode": "bench.decode",  # greedy decoding tokens/s: KV cache vs recomputing the sequence
    "train": "bench.train",  # SFT step MFU (small) vs the f32 matmul peak, and vs HF PaliGemma
    "rollout": "bench.rollout",  # multi-turn pixel-operation rollouts/s, model vs environment time
    "attention": "bench.attention",  # flash attention vs dense fwd+bwd; chunked CE memory
}


def device_description() -> str:
  return f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def run_benchmark(name: str) -> dict:
  if name not in BENCHMARKS:
    raise ValueError(f"benchmark {name!r} is unknown; expected one of {sorted(BENCHMARKS)}")
  result = importlib.import_module(BENCHMARKS[name]).run()
  missing = {"name", "metric", "value", "unit", "goal", "higher_is_better", "device",
             "details"} - set(result)
  if missing:
    raise ValueError(f"benchmark {name!r} returned no {sorted(missing)}")
  return result
