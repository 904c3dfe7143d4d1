"""Several demo runs (one per seed) summarised: mean and standard deviation of vpd - direct.

  vpd-jax summarize --workdir=workdir/experiment     # reads workdir/experiment/seed_*/results.json

Writes `summary.json` in that directory and returns it: per family and overall, the margin of the
vpd model over the direct model with the direct prompt and with the rationale prompt, each as
{"mean", "std" (sample standard deviation over seeds), "values"}, plus the seeds and each run's
accuracies. `make experiment` runs the demo at a larger size for three seeds, then this.
"""

import glob
import json
import os

import numpy as np

from vpd_jax.programs import records

SUMMARY_FILE = "summary.json"


def accuracy_margins(results: dict) -> dict:
  """vpd - direct accuracy (direct prompt, and vpd's rationale prompt) per family and overall."""
  direct = results["models"]["direct"]["accuracy"]["direct_prompt"]
  out = {}
  for prompt in ("direct_prompt", "rationale_prompt"):
    vpd = results["models"]["vpd"]["accuracy"][prompt]
    fam = {f: vpd["per_family"][f] - direct["per_family"][f]
           for f in direct["per_family"] if f in vpd["per_family"]}
    out[prompt] = {"overall": vpd["overall"] - direct["overall"], "per_family": fam}
  return out


def mean_std(values: list) -> dict:
  arr = np.asarray(values, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
          "values": [float(v) for v in arr]}


def summarize(workdir: str) -> dict:
  """Aggregates workdir/seed_*/results.json (see the module docstring)."""
  paths = sorted(glob.glob(os.path.join(workdir, "seed_*", "results.json")))
  if not paths:
    raise FileNotFoundError(f"no seed_*/results.json under {workdir!r}; run the demo per seed "
                            "there first (make experiment)")
  runs = []
  for path in paths:
    with open(path) as f:
      try:
        runs.append(json.load(f))
      except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
  margins = [accuracy_margins(r) for r in runs]
  out = {"seeds": [r["seed"] for r in runs], "runs": paths, "margin": {}}
  for prompt in ("direct_prompt", "rationale_prompt"):
    families = sorted(set.intersection(*(set(m[prompt]["per_family"]) for m in margins)))
    out["margin"][prompt] = {
        "overall": mean_std([m[prompt]["overall"] for m in margins]),
        "per_family": {f: mean_std([m[prompt]["per_family"][f] for m in margins])
                       for f in families}}
  out["accuracy"] = [{m: {p: a["overall"] for p, a in r["models"][m]["accuracy"].items()}
                      for m in r["models"]} | {"programs": r["executor_accuracy"]["overall"],
                                                "seed": r["seed"]} for r in runs]
  records.write_atomic(os.path.join(workdir, SUMMARY_FILE),
                       json.dumps(out, indent=1, sort_keys=True).encode("utf-8"))
  return out


def format_summary(summary: dict) -> str:
  lines = [f"vpd - direct accuracy margin (points), mean ± std over seeds {summary['seeds']}",
           f"{'family':12s} {'direct prompt':>18s} {'rationale prompt':>18s}"]
  d, r = summary["margin"]["direct_prompt"], summary["margin"]["rationale_prompt"]
  for family in sorted(d["per_family"]) + ["overall"]:
    a = d["overall"] if family == "overall" else d["per_family"][family]
    b = r["overall"] if family == "overall" else r["per_family"].get(family)
    cell_b = "-" if b is None else f"{b['mean']:+.1f} ± {b['std']:.1f}"
    lines.append(f"{family:12s} {a['mean']:+10.1f} ± {a['std']:4.1f} {cell_b:>18s}")
  return "\n".join(lines)
