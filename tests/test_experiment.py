"""Tests for vpd_jax.experiment: stage markers, executor accuracy, report pieces, seed summaries."""

import base64
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from vpd_jax.experiment import demo
from vpd_jax.experiment import report
from vpd_jax.experiment import stages as stages_lib
from vpd_jax.experiment import summary
from vpd_jax.programs import records
from vpd_jax.programs import verify


def test_stages_run_once_and_skip_when_started_again(tmp_path):
  calls = []
  first = stages_lib.Stages(str(tmp_path), ["a", "b"], stream=None)
  assert first.run("a", lambda: calls.append("a") or {"x": 1}) == {"x": 1}
  assert first.done("a") and not first.done("b")
  again = stages_lib.Stages(str(tmp_path), ["a", "b"], stream=None)
  assert again.run("a", lambda: calls.append("a2") or {"x": 2}) == {"x": 1}
  assert again.run("b", lambda: calls.append("b") or [3]) == [3]
  assert calls == ["a", "b"]
  assert set(again.seconds) == {"a", "b"}


def test_stage_failure_leaves_no_marker_and_errors_name_the_problem(tmp_path):
  stages = stages_lib.Stages(str(tmp_path), ["a", "b/c"], stream=None)
  with pytest.raises(RuntimeError):
    stages.run("a", lambda: (_ for _ in ()).throw(RuntimeError("stopped")))
  assert not stages.done("a")
  with pytest.raises(ValueError, match="'z' is not one of"):
    stages.run("z", dict)
  marker = stages.marker("b/c")
  os.makedirs(os.path.dirname(marker), exist_ok=True)
  with open(marker, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="b__c.json is malformed"):
    stages.run("b/c", dict)
  with pytest.raises(ValueError, match="distinct"):
    stages_lib.Stages(str(tmp_path), ["a", "a"])


def _record(example_id, family, answers, candidate_answers, statuses):
  return records.TraceRecord(
      example_id=example_id, image=b"\x89PNG", question="q?", answers=answers, family=family,
      candidate_programs=["p"] * len(candidate_answers), candidate_statuses=statuses,
      candidate_answers=candidate_answers,
      candidate_outcomes=[int(verify.Outcome.WRONG_ANSWER)] * len(candidate_answers))


def test_executor_accuracy_first_program_and_majority_by_hand(tmp_path):
  recs = [
      # first program right; majority ("2" twice) wrong
      _record("a", "count", ["3"], ["three", "2", "2"], ["ok", "ok", "ok"]),
      # first program crashed (no answer); majority right
      _record("b", "count", ["yes"], ["", "yes", "no"], ["exception", "ok", "ok"]),
      # tie between "red" and "blue": the earliest ("red", wrong) wins; "x" timed out
      _record("c", "attribute", ["blue"], ["red", "blue", "x"], ["ok", "ok", "timeout"]),
      # first program wrong; majority right
      _record("d", "exist", ["no"], ["yes", "no", "no"], ["ok", "ok", "ok"]),
  ]
  records.write_shard(os.path.join(tmp_path, records.shard_name(0, 1)), recs)
  got = demo.executor_accuracy(str(tmp_path))
  assert got["num_examples"] == 4
  assert got["overall"] == 25.0  # only a ("three" is "3")
  assert got["per_family"] == {"attribute": 0.0, "count": 50.0, "exist": 0.0}
  assert got["majority_vote"]["overall"] == 50.0  # b and d
  assert got["majority_vote"]["per_family"] == {"attribute": 0.0, "count": 50.0, "exist": 100.0}


def test_trace_boxes_and_drawn_image(tmp_path):
  trace = [{"call": "find", "result": [[2, 3, 10, 12], [20, 5, 30, 9]]},
           {"call": "count", "result": 2},
           {"call": "crop", "result": [0, 0, 16, 16]},
           {"call": "find", "result": []}]
  assert report.trace_boxes(trace) == [[2, 3, 10, 12], [20, 5, 30, 9], [0, 0, 16, 16]]
  png = io.BytesIO()
  Image.fromarray(np.full((32, 40, 3), 255, np.uint8)).save(png, format="PNG")
  url = report.image_with_boxes(png.getvalue(), [[2, 3, 10, 12]], scale=2)
  assert url.startswith("data:image/png;base64,")
  image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
  assert image.shape == (64, 80, 3)
  assert tuple(image[6, 4]) == (0xd6, 0x27, 0x28)  # the box's top-left corner, scaled by 2
  assert tuple(image[30, 40]) == (255, 255, 255)  # outside the outline


def _results(seed, direct, vpd_direct, vpd_cot, programs):
  def entry(values):
    return {"overall": float(np.mean(list(values.values()))), "per_family": values,
            "task": "t"}
  return {"seed": seed,
          "models": {"direct": {"accuracy": {"direct_prompt": entry(direct)},
                                "loss_curve": [[1, 2.0], [2, 1.0]]},
                     "vpd": {"accuracy": {"direct_prompt": entry(vpd_direct),
                                          "rationale_prompt": entry(vpd_cot)},
                             "loss_curve": [[1, 2.5], [2, 0.5]]}},
          "executor_accuracy": entry(programs)}


def test_accuracy_chart_draws_every_series_and_family():
  results = _results(0, {"count": 10.0, "spatial": 30.0}, {"count": 20.0, "spatial": 40.0},
                     {"count": 50.0, "spatial": 0.0}, {"count": 90.0, "spatial": 80.0})
  svg = report.accuracy_chart(results)
  titles = re.findall(r"<title>([^<]*)</title>", svg)
  # 4 series x (2 families + overall)
  assert len(re.findall(r'<rect class="bar"', svg)) == 12
  assert "vpd + rationale / count: 50.0%" in titles
  assert "programs / overall: 85.0%" in titles
  assert "direct / spatial: 30.0%" in titles
  curves = report.loss_chart(results)
  assert curves.count('<polyline class="curve"') == 2


def test_summarize_mean_and_std_over_seeds(tmp_path):
  runs = [_results(0, {"count": 10.0, "spatial": 30.0}, {"count": 20.0, "spatial": 30.0},
                   {"count": 40.0, "spatial": 20.0}, {"count": 90.0, "spatial": 80.0}),
          _results(1, {"count": 20.0, "spatial": 30.0}, {"count": 40.0, "spatial": 28.0},
                   {"count": 20.0, "spatial": 30.0}, {"count": 90.0, "spatial": 80.0})]
  for r in runs:
    os.makedirs(tmp_path / f"seed_{r['seed']}")
    with open(tmp_path / f"seed_{r['seed']}" / "results.json", "w") as f:
      json.dump(r, f)
  got = summary.summarize(str(tmp_path))
  count = got["margin"]["direct_prompt"]["per_family"]["count"]
  assert count["values"] == [10.0, 20.0]
  assert count["mean"] == pytest.approx(15.0)
  assert count["std"] == pytest.approx(np.sqrt(50.0))  # sample std of (10, 20)
  spatial_cot = got["margin"]["rationale_prompt"]["per_family"]["spatial"]
  assert spatial_cot["values"] == [-10.0, 0.0]
  assert got["seeds"] == [0, 1]
  assert os.path.exists(tmp_path / summary.SUMMARY_FILE)
  assert "count" in summary.format_summary(got)
  with pytest.raises(FileNotFoundError, match="seed_"):
    summary.summarize(str(tmp_path / "missing"))


def test_read_metrics_keeps_the_last_line_of_a_step(tmp_path):
  lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 9.0},
           {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(x) for x in lines) + "\n")
  assert [m["loss"] for m in demo.read_metrics(str(tmp_path))] == [3.0, 2.5, 1.0]
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write("{oops\n")
  with pytest.raises(ValueError, match="line 6"):
    demo.read_metrics(str(tmp_path))
