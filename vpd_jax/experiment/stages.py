"""Named stages of a long job, each run once: a finished stage is skipped when the job starts again.

  stages = Stages(workdir, ["traces", "vocab", "train/direct", ...])
  stats = stages.run("traces", make_traces)      # runs it, or returns what the finished run returned

A stage that finishes writes `workdir/stages/<name>.json` = {"result": its JSON result, "seconds":
its wall time} atomically; the marker is what "finished" means, so a job killed in the middle of a
stage runs that stage again (each stage is itself resumable where that matters: trace shards and
training checkpoints are kept). Progress lines go to `stream`: the stage, its number, its time and
an estimate of the time left from the stages' expected shares of the total.
"""

import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

from vpd_jax.programs import records

STAGES_DIR = "stages"


class Stages:
  """Runs the stages of one job in `workdir` (see the module docstring)."""

  def __init__(self, workdir: str, names: Sequence[str],
               weights: Optional[Mapping[str, float]] = None, stream: Optional[TextIO] = sys.stderr):
    if len(set(names)) != len(names):
      raise ValueError(f"stage names must be distinct, got {list(names)}")
    self.workdir, self.names, self.stream = workdir, list(names), stream
    unknown = set(weights or {}) - set(names)
    if unknown:
      raise ValueError(f"weights name unknown stages {sorted(unknown)}; stages are {self.names}")
    self._weights = {name: float((weights or {}).get(name, 1.0)) for name in names}
    self.seconds: dict[str, float] = {}
    self._skipped: dict[str, bool] = {}

  def marker(self, name: str) -> str:
    return os.path.join(self.workdir, STAGES_DIR, name.replace("/", "__") + ".json")

  def done(self, name: str) -> bool:
    return os.path.exists(self.marker(name))

  def _say(self, text: str) -> None:
    if self.stream is not None:
      self.stream.write(text + "\n")
      self.stream.flush()

  def _eta(self, name: str) -> str:
    """Time left after stage `name`, from the pace of the stages run in this process."""
    ran = {n: s for n, s in self.seconds.items() if not self._skipped.get(n)}
    weight_ran = sum(self._weights[n] for n in ran)
    if not ran or weight_ran <= 0:
      return "?"
    index = self.names.index(name)
    left = sum(self._weights[n] for n in self.names[index + 1:] if not self.done(n))
    return f"{left * sum(ran.values()) / weight_ran:.0f} s"

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    """fn()'s result (JSON-serialisable), computed now or read from the stage's marker."""
    if name not in self.names:
      raise ValueError(f"stage {name!r} is not one of {self.names}")
    number = f"[{self.names.index(name) + 1}/{len(self.names)}]"
    path = self.marker(name)
    if os.path.exists(path):
      with open(path) as f:
        try:
          saved = json.load(f)
          result, seconds = saved["result"], float(saved["seconds"])
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"stage marker {path} is malformed ({e}); delete it to run the stage "
                           "again") from e
      self.seconds[name] = seconds
      self._skipped[name] = True
      self._say(f"{number} {name}: already done ({seconds:.1f} s in an earlier run), skipped")
      return result
    self._say(f"{number} {name} ...")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(path), exist_ok=True)
    records.write_atomic(path, json.dumps({"result": result, "seconds": seconds},
                                          sort_keys=True).encode("utf-8"))
    self.seconds[name] = seconds
    self._skipped[name] = False
    self._say(f"{number} {name}: done in {seconds:.1f} s; about {self._eta(name)} left")
    return result
