"""`vpd-jax demo` end to end on a tiny configuration: results.json, resumption after kill -9, the
report in headless Chromium, and figures that follow the seed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vpd_jax.experiment import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 60 steps, a checkpoint every 20: the kill lands in the middle of training.
TINY = ("size=tiny,steps=60,batch_size=8,num_train=32,num_eval=14,k=3,prefix_len=24,"
        "suffix_len=64,latency_questions=2,samples=5,eval_batch_size=8,workers=1")

pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, whatever other test modules forced
  return env


def _demo_command(workdir, arg):
  return [sys.executable, "-m", "vpd_jax.main", "demo", f"--config=configs/demo.py:{arg}",
          f"--workdir={workdir}"]


def _run_demo(workdir, arg=TINY):
  proc = subprocess.run(_demo_command(workdir, arg), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def _checkpoints(workdir, model):
  directory = os.path.join(workdir, "models", model, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A demo killed with SIGKILL once the vpd model has its first checkpoint, then run again."""
  workdir = str(tmp_path_factory.mktemp("demo"))
  proc = subprocess.Popen(_demo_command(workdir, TINY), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  try:
    while not _checkpoints(workdir, "vpd"):
      assert proc.poll() is None, "the demo ended before the vpd model saved a checkpoint"
      assert time.time() < deadline, "no vpd checkpoint within 600 s"
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = _checkpoints(workdir, "vpd")
  second = _run_demo(workdir)
  return workdir, killed_at, second.stdout + second.stderr


def test_results_json_has_every_key(finished):
  workdir, _, _ = finished
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  for key in ("config", "traces", "models", "executor_accuracy", "timings_s", "seed",
              "latency_s_per_question"):
    assert key in results, key
  for split in ("train", "eval"):
    t = results["traces"][split]
    assert {"examples", "sampled", "passed", "kept", "per_family"} <= set(t)
    assert t["sampled"] == 3 * t["examples"]
  assert results["traces"]["train"]["examples"] == 32
  assert results["traces"]["eval"]["examples"] == 14
  families = set(results["executor_accuracy"]["per_family"])
  assert len(families) == 7
  for model, prompts in (("direct", {"direct_prompt"}),
                         ("vpd", {"direct_prompt", "rationale_prompt"})):
    entry = results["models"][model]
    assert set(entry["accuracy"]) == prompts
    for acc in entry["accuracy"].values():
      assert set(acc["per_family"]) == families  # every held-out question, every family
      assert 0 <= acc["overall"] <= 100
      assert acc["num_examples"] == 14
    assert entry["train_steps"] == 60 and entry["wall_time_s"] > 0
    assert entry["loss_tokens"] > 0 and len(entry["loss_curve"]) == 60
  # Equal compute: the same steps, batch and row length, so the same text positions.
  assert (results["models"]["direct"]["text_positions"]
          == results["models"]["vpd"]["text_positions"])
  # The vpd mixture trains on rationales: many more supervised tokens than short answers.
  assert results["models"]["vpd"]["loss_tokens"] > results["models"]["direct"]["loss_tokens"]
  timings = results["timings_s"]
  assert set(demo.STAGE_NAMES) <= set(timings) and timings["total"] > 0
  latency = results["latency_s_per_question"]
  assert set(latency) == {"program_pipeline", "direct/direct_prompt", "vpd/direct_prompt",
                          "vpd/rationale_prompt"}
  assert all(v["mean"] > 0 for v in latency.values())


def test_killed_demo_resumes_from_its_last_stage_and_checkpoint(finished):
  workdir, killed_at, output = finished
  assert killed_at and killed_at[-1] < 60
  for stage in ("traces/train", "traces/eval", "vocab", "train/direct"):
    assert re.search(rf"\] {re.escape(stage)}: already done", output), stage
  assert "train/vpd: done" in output
  assert f"restored checkpoint step {killed_at[-1]}" in output
  # The resumed run appended only the steps after the checkpoint.
  steps = [json.loads(line)["step"] for line in
           open(os.path.join(workdir, "models", "vpd", "metrics.jsonl")) if '"loss"' in line]
  assert sorted(set(steps)) == list(range(1, 61))
  # A third run has nothing left to do.
  third = _run_demo(workdir)
  assert all(f"{s}: already done" in third.stderr for s in demo.STAGE_NAMES)


def _chromium(url, tmp_path):
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  assert chromium, "headless Chromium is needed (Debian's chromium package; `make test` installs it)"
  proc = subprocess.run(
      [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
       "--v=0", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path}/profile",
       "--dump-dom", url], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
  return proc.stdout, console


def _check_page(path, tmp_path):
  """(problems, dom): console messages and images the browser could not decode."""
  dom, console = _chromium("file://" + path, tmp_path)
  decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
  problems = list(console)
  if decoded is None:
    problems.append("the page's load handler did not run")
  elif decoded.group(1) != decoded.group(2):
    problems.append(f"only {decoded.group(1)} of {decoded.group(2)} images decoded")
  return problems, dom


def test_report_loads_in_chromium_with_decoded_images_and_charts(finished, tmp_path):
  workdir, _, _ = finished
  path = os.path.join(workdir, "report.html")
  problems, dom = _check_page(path, tmp_path)
  assert problems == []
  with open(path) as f:
    page = f.read()
  images = page.count("<img ")
  assert images == 5  # the samples asked for
  assert f'data-images-decoded="{images}/{images}"' in dom
  assert 'id="accuracy-chart"' in dom and dom.count('class="bar"') >= 4 * 8 - 3
  assert 'id="loss-chart"' in dom
  assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_page_check_catches_broken_images_and_script_errors(tmp_path):
  bad = tmp_path / "bad.html"
  good_page = open(os.path.join(ROOT, "vpd_jax", "experiment", "report.py")).read()
  script = re.search(r'_CHECK_SCRIPT = """(.*?)"""', good_page, re.S).group(1)
  bad.write_text("<!DOCTYPE html><html><body><img src=\"data:image/png;base64,AAAA\">"
                 f"<script>{script}</script><script>notDefined();</script></body></html>")
  problems, _ = _check_page(str(bad), tmp_path)
  assert any("notDefined" in p for p in problems)
  assert "only 0 of 1 images decoded" in problems


def test_report_rebuilds_from_files_and_figures_follow_the_seed(finished, tmp_path):
  workdir, _, _ = finished
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  os.remove(os.path.join(workdir, "report.html"))
  proc = subprocess.run([sys.executable, "-m", "vpd_jax.main", "report", f"--workdir={workdir}"],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  page = open(os.path.join(workdir, "report.html")).read()
  ex = results["executor_accuracy"]["overall"]
  assert f"programs / overall: {ex:.1f}%" in page
  direct = results["models"]["direct"]["accuracy"]["direct_prompt"]["overall"]
  assert f"direct / overall: {direct:.1f}%" in page

  other = str(tmp_path / "seed1")
  _run_demo(other, TINY.replace("steps=60", "steps=3") + ",seed=1")
  with open(os.path.join(other, "results.json")) as f:
    seeded = json.load(f)
  assert seeded["seed"] == 1
  assert seeded["traces"]["train"] != results["traces"]["train"]
  assert seeded["models"]["vpd"]["loss_curve"][0] != results["models"]["vpd"]["loss_curve"][0]
