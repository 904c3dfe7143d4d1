"""Flash attention (Pallas) against dense XLA attention, and the chunked cross-entropy's memory.

Attention: forward + backward (gradients of q, k, v) of PaliGemma-3b's decoder attention shapes
(8 query heads over 1 kv head, head size 256), one row of T tokens with a packed prefix-LM mask:
about T / 512 examples per row (at least 2), each a bidirectional prefix (image and prompt, 60 %)
then a causal suffix, and 5 % padding at the end. Both paths run under jax.jit:
  xla     models.attention.dot_product_attention with the dense [B, T, T] prefix-LM mask (built
          inside the timed function, as the model does);
  pallas  kernels.flash_attention with the per-token segment ids and ar flags (interpret mode on
          CPU, where it measures Pallas' interpreter rather than a GPU kernel).
FLOPs count only unmasked work: 4 * H * D per allowed (query, key) pair forward (two matmuls), and
2.5 times that backward (FlashAttention's convention), so TFLOP/s = 3.5 * 4 * H * D * pairs / time.
Peak memory is XLA's compiled memory analysis of each jitted forward + backward (arguments + outputs
+ temporaries - aliased), at every length in LENGTHS (compiling only, nothing allocated); times,
and the largest difference of pallas' output and gradients from xla's, are measured at the timed
lengths: all of LENGTHS on GPU/TPU, CPU_LENGTHS on CPU unless asked (`--lengths`, or the
environment variable VPD_BENCH_ATTENTION_LENGTHS="1024,2048" for `vpd-jax bench attention`).
Timing: one warm-up call, then the best of `repeats` calls.

Cross-entropy memory: the SFT loss's value and gradients (of hidden states and the tied
embedding) for paligemma-3b's vocabulary (257,216 x 2,048) at B = 8, T = 1,024, float32, plain
([B, T, V] logits) against kernels.cross_entropy's chunked scan, from the compiled memory analysis
of abstract inputs (jax.ShapeDtypeStruct). Headline: pallas' speed-up over xla (time ratio) at the
longest timed length.

  python -m bench.attention [--lengths 1024,2048] [--json OUT]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.kernels import cross_entropy
from vpd_jax.kernels import flash_attention
from vpd_jax.kernels import reference
from vpd_jax.models import attention

LENGTHS = (1024, 2048, 4096, 8192)
CPU_LENGTHS = (1024, 2048)
HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256  # PaliGemma-3b's decoder (Gemma 2B)
CE_SHAPE = {"batch": 8, "length": 1024, "vocab": 257_216, "width": 2048}  # paligemma-3b
LENGTHS_ENV = "VPD_BENCH_ATTENTION_LENGTHS"


def packed_prefix_lm_row(length: int, seed: int = 0):
  """(segment_ids, ar_flag) [1, length] of one packed row; see the module docstring."""
  rng = np.random.default_rng(seed)
  used = length - length // 20
  examples = max(2, length // 512)
  cuts = np.linspace(0, used, examples + 1).astype(int)
  seg = np.zeros((1, length), np.int32)
  ar = np.zeros((1, length), np.int32)
  for e in range(examples):
    start, end = cuts[e], cuts[e + 1]
    prefix = int((end - start) * rng.uniform(0.5, 0.7))
    seg[0, start:end] = e + 1
    ar[0, start + prefix:end] = 1
  return seg, ar


def unmasked_pairs(segment_ids, ar_flag) -> int:
  return int(jnp.sum(reference.dense_mask(segment_ids, ar_flag)))


def _forward_backward(impl: str, segment_ids, ar_flag):
  """jitted (q, k, v, d_out) -> (out, (dq, dk, dv)) for `impl`."""
  def run(q, k, v):
    if impl == "xla":
      mask = attention.prefix_lm_mask(ar_flag, segment_ids)
      return attention.dot_product_attention(q, k, v, mask)
    return flash_attention.flash_attention(q, k, v, segment_ids=segment_ids, ar_flag=ar_flag)

  def step(q, k, v, d_out):
    out, vjp = jax.vjp(run, q, k, v)
    return out, vjp(d_out)
  return jax.jit(step)


def peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries - aliased bytes of a compiled function."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _abstract(length: int, dtype):
  q = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), dtype)
  kv = jax.ShapeDtypeStruct((1, length, KV_HEADS, HEAD_DIM), dtype)
  return q, kv, kv, q


def measure_length(length: int, dtype, timed: bool, repeats: int) -> dict:
  seg, ar = packed_prefix_lm_row(length)
  pairs = unmasked_pairs(seg, ar)
  flops = 3.5 * 4 * HEADS * HEAD_DIM * pairs
  row = {"length": length, "unmasked_pairs": pairs, "unmasked_fraction": pairs / length ** 2,
         "model_flops": flops}
  rng = np.random.default_rng(length)
  inputs = None
  if timed:
    make = lambda shape: jnp.asarray(rng.normal(size=shape.shape), dtype)
    inputs = [make(x) for x in _abstract(length, dtype)]
    # Padding queries get no cotangent, as in training (no loss reads them): the dense path gives
    # them a uniform softmax over all keys, the kernel zeros, and neither may leak into dk, dv.
    inputs[3] = inputs[3] * jnp.asarray(seg > 0, dtype)[:, :, None, None]
  results = {}
  for impl in ("xla", "pallas"):
    fn = _forward_backward(impl, seg, ar)
    start = time.perf_counter()
    compiled = fn.lower(*_abstract(length, dtype)).compile()
    entry = {"compile_s": round(time.perf_counter() - start, 2),
             "peak_memory_bytes": peak_bytes(compiled)}
    if timed:
      results[impl] = jax.block_until_ready(compiled(*inputs))
      best = float("inf")
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        best = min(best, time.perf_counter() - start)
      entry.update(seconds=round(best, 5), tflop_per_s=round(flops / best / 1e12, 5))
    row[impl] = entry
  if timed:
    (out_x, grads_x), (out_p, grads_p) = results["xla"], results["pallas"]
    real = jnp.asarray(seg > 0)[:, :, None, None]
    out_x, out_p = out_x * real, out_p * real
    row["max_abs_diff"] = {
        name: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out_x, *grads_x), (out_p, *grads_p))}
    row["pallas_speedup_over_xla"] = round(row["xla"]["seconds"] / row["pallas"]["seconds"], 4)
  row["pallas_memory_over_xla"] = round(row["pallas"]["peak_memory_bytes"] /
                                        row["xla"]["peak_memory_bytes"], 4)
  return row


def _loss_fns(chunk: int) -> dict:
  """The SFT loss over (hidden, embedding, targets, mask), plain and chunked."""
  def plain(h, e, t, m):
    logits = jnp.einsum("btd,vd->btv", h, e, preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
    return jnp.sum(nll * m) / jnp.sum(m)

  def chunked(h, e, t, m):
    return cross_entropy.weighted_cross_entropy(h, e, t, m / jnp.sum(m), chunk=chunk)
  return {"plain": plain, "chunked": chunked}


def _loss_inputs(batch: int, length: int, vocab: int, width: int):
  return (jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
          jax.ShapeDtypeStruct((vocab, width), jnp.float32),
          jax.ShapeDtypeStruct((batch, length), jnp.int32),
          jax.ShapeDtypeStruct((batch, length), jnp.float32))


def cross_entropy_memory(batch: int, length: int, vocab: int, width: int,
                         chunk: int = cross_entropy.DEFAULT_CHUNK) -> dict:
  """Peak bytes of the SFT loss's value and gradients, plain and chunked (compiled only)."""
  out = {"shape": {"batch": batch, "length": length, "vocab": vocab, "width": width,
                   "dtype": "float32", "chunk": chunk},
         "full_logits_bytes": batch * length * vocab * 4}
  for name, fn in _loss_fns(chunk).items():
    compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(
        *_loss_inputs(batch, length, vocab, width)).compile()
    out[f"{name}_peak_bytes"] = peak_bytes(compiled)
  out["chunked_over_plain"] = round(out["chunked_peak_bytes"] / out["plain_peak_bytes"], 4)
  return out


def cross_entropy_time(batch: int = 2, length: int = 512, vocab: int = 32_768, width: int = 512,
                       chunk: int = cross_entropy.DEFAULT_CHUNK, repeats: int = 3) -> dict:
  """Best seconds of the loss's value and gradients, plain and chunked, at a size this host runs."""
  rng = np.random.default_rng(0)
  shapes = _loss_inputs(batch, length, vocab, width)
  inputs = [jnp.asarray(rng.normal(size=shapes[0].shape) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=shapes[1].shape) * 0.1, jnp.float32),
            jnp.asarray(rng.integers(0, vocab, size=shapes[2].shape), jnp.int32),
            jnp.ones(shapes[3].shape, jnp.float32)]
  out = {"shape": {"batch": batch, "length": length, "vocab": vocab, "width": width,
                   "chunk": chunk}}
  losses = {}
  for name, fn in _loss_fns(chunk).items():
    step = jax.jit(jax.value_and_grad(fn, (0, 1)))
    losses[name] = float(jax.block_until_ready(step(*inputs))[0])
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(*inputs))
      best = min(best, time.perf_counter() - start)
    out[f"{name}_seconds"] = round(best, 5)
  out["chunked_over_plain_time"] = round(out["chunked_seconds"] / out["plain_seconds"], 4)
  out["loss_abs_diff"] = abs(losses["plain"] - losses["chunked"])
  return out


def _timed_lengths(lengths):
  if lengths is not None:
    return tuple(lengths)
  if os.environ.get(LENGTHS_ENV):
    return tuple(int(x) for x in os.environ[LENGTHS_ENV].split(","))
  return CPU_LENGTHS if jax.default_backend() == "cpu" else LENGTHS


def run(lengths=None, repeats: int = 3) -> dict:
  """Runs the benchmark (see the module docstring); returns the benchmark JSON object."""
  import bench  # pylint: disable=g-import-not-at-top
  timed = _timed_lengths(lengths)
  bad = [t for t in timed if not isinstance(t, int) or t < 16]
  if bad:
    raise ValueError(f"bench attention: lengths must be integers >= 16, got {bad}")
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  rows = [measure_length(t, dtype, t in timed, repeats)
          for t in sorted(set(LENGTHS) | set(timed))]
  longest = max((r for r in rows if "pallas_speedup_over_xla" in r), key=lambda r: r["length"])
  details = {
      "shapes": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                 "dtype": jnp.dtype(dtype).name},
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "pallas_mode": "interpret" if on_cpu else "compiled",
      "timed_lengths": sorted(timed),
      "rows": rows,
      "cross_entropy_memory": cross_entropy_memory(**CE_SHAPE),
      "cross_entropy_time": cross_entropy_time(),
      "cross_entropy_chunk_sweep_peak_bytes": {
          chunk: cross_entropy_memory(**CE_SHAPE, chunk=chunk)["chunked_peak_bytes"]
          for chunk in (16, 256)},
      "timing": f"1 warm-up call, then the best of {repeats} calls of forward + backward",
  }
  return {
      "name": "attention",
      "metric": "pallas_speedup_over_xla",
      "value": longest["pallas_speedup_over_xla"],
      "unit": (f"xla time / pallas time, forward + backward, packed prefix-LM row of "
               f"{longest['length']} tokens"),
      "goal": 1.0,
      "higher_is_better": True,
      "device": f"{bench.device_description()} ({jax.devices()[0].device_kind})",
      "details": details,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default=None,
                      help="comma-separated lengths to time (default: see the module docstring)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default=None, help="where to write the JSON result")
  args = parser.parse_args()
  lengths = None if args.lengths is None else [int(x) for x in args.lengths.split(",")]
  result = run(lengths, args.repeats)
  text = json.dumps(result, indent=2)
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, args.json)
  print(text)


if __name__ == "__main__":
  main()
