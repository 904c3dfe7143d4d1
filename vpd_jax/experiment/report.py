"""report.html of a demo work directory: one self-contained page built from the run's own files.

  write_report(workdir)          # `vpd-jax report --workdir=DIR`

Reads results.json, the models' evaluation outputs (models/<m>/eval/<task>.json, every held-out
prediction) and the held-out trace records (image, program, trace, rationale), and writes
report.html atomically. The page has no outside references: images are inline PNGs (the held-out
image with the boxes its program found drawn on it), charts are inline SVG (accuracy per family:
direct vs vpd vs the programs; training loss curves), and a few lines of script record, once the
page has loaded, how many images the browser decoded (`data-images-decoded` on <body>).
"""

import base64
import html
import io
import json
import os
from typing import Optional

import numpy as np
from PIL import Image
from PIL import ImageDraw

from vpd_jax.programs import records

SERIES = (("direct", "direct_prompt", "direct", "#7f7f7f"),
          ("vpd", "direct_prompt", "vpd", "#1f77b4"),
          ("vpd", "rationale_prompt", "vpd + rationale", "#2ca02c"),
          (None, None, "programs", "#ff7f0e"))
_BOX_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")
_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute('data-images-decoded', decoded.length + '/' + images.length);
});
"""


def _e(value) -> str:
  return html.escape(str(value))


def _load_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run `vpd-jax demo` into this work directory "
                            "first")
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from e


def load_predictions(workdir: str, results: dict) -> dict:
  """{model: {prompt: {example_id: prediction}}} from the models' evaluation files."""
  out = {}
  for model, entry in results["models"].items():
    out[model] = {}
    for prompt, acc in entry["accuracy"].items():
      path = os.path.join(workdir, "models", model, "eval", f"{acc['task']}.json")
      examples = _load_json(path)["examples"]
      out[model][prompt] = {e["example_id"]: e["prediction"] for e in examples
                            if "example_id" in e}
  return out


# ------------------------------------------------------------------------------------ images

def trace_boxes(trace: list) -> list:
  """Boxes (left, upper, right, lower) a program's trace found: objects found, regions cropped."""
  boxes = []
  for event in trace:
    result = event.get("result")
    if event.get("call") == "find" and isinstance(result, list):
      boxes += [b for b in result if isinstance(b, list) and len(b) == 4]
    elif event.get("call") == "crop" and isinstance(result, list) and len(result) == 4:
      boxes.append(result)
  return boxes


def image_with_boxes(png: bytes, boxes: list, scale: int = 2) -> str:
  """A data: URL of the PNG scaled by `scale` with `boxes` outlined."""
  image = Image.open(io.BytesIO(png)).convert("RGB")
  image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(image)
  for i, box in enumerate(boxes):
    x0, y0, x1, y1 = (int(v) * scale for v in box)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=_BOX_COLORS[i % len(_BOX_COLORS)], width=2)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------ charts

def accuracy_chart(results: dict) -> str:
  """Grouped bars: accuracy per family (and overall) for each model/prompt and the programs."""
  executor = results["executor_accuracy"]
  families = sorted(executor["per_family"]) + ["overall"]

  def value(model, prompt, family):
    entry = executor if model is None else results["models"][model]["accuracy"][prompt]
    return entry["overall"] if family == "overall" else entry["per_family"].get(family)

  bar, gap, left, top, height = 14, 18, 40, 20, 200
  group = len(SERIES) * bar + gap
  width = left + group * len(families) + 10
  parts = [f'<svg id="accuracy-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{top + height + 70}" role="img" aria-label="accuracy per family">']
  for tick in range(0, 101, 25):
    y = top + height - tick * height / 100
    parts.append(f'<line x1="{left}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                 f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick}'
                 "</text>")
  for g, family in enumerate(families):
    x0 = left + g * group + gap / 2
    for s, (model, prompt, label, color) in enumerate(SERIES):
      v = value(model, prompt, family)
      if v is None:
        continue
      h = v * height / 100
      parts.append(f'<rect class="bar" x="{x0 + s * bar:.1f}" y="{top + height - h:.1f}" '
                   f'width="{bar - 2}" height="{h:.1f}" fill="{color}">'
                   f"<title>{_e(label)} / {_e(family)}: {v:.1f}%</title></rect>")
    parts.append(f'<text x="{x0 + len(SERIES) * bar / 2:.1f}" y="{top + height + 14}" '
                 f'font-size="11" text-anchor="middle">{_e(family)}</text>')
  for s, (_, _, label, color) in enumerate(SERIES):
    x = left + s * 130
    parts.append(f'<rect x="{x}" y="{top + height + 30}" width="10" height="10" fill="{color}"/>'
                 f'<text x="{x + 14}" y="{top + height + 39}" font-size="11">{_e(label)}</text>')
  parts.append("</svg>")
  return "".join(parts)


def loss_chart(results: dict) -> str:
  """Training loss per step of each model, as polylines."""
  curves = {m: e.get("loss_curve") or [] for m, e in results["models"].items()}
  points = [p for c in curves.values() for p in c]
  w, h, left, top = 520, 220, 45, 10
  parts = [f'<svg id="loss-chart" xmlns="http://www.w3.org/2000/svg" width="{w + left + 10}" '
           f'height="{h + top + 45}" role="img" aria-label="training loss">']
  if points:
    max_step = max(p[0] for p in points) or 1
    max_loss = max(p[1] for p in points) or 1.0
    for frac in (0, 0.5, 1):
      y = top + h - frac * h
      parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f"{frac * max_loss:.2f}</text>")
    colors = {"direct": "#7f7f7f", "vpd": "#1f77b4"}
    for i, (model, curve) in enumerate(sorted(curves.items())):
      coords = " ".join(f"{left + s / max_step * w:.1f},{top + h - l / max_loss * h:.1f}"
                        for s, l in curve)
      color = colors.get(model, "#000")
      parts.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="1.5" '
                   f'points="{coords}"><title>{_e(model)}</title></polyline>')
      parts.append(f'<text x="{left + 10 + 90 * i}" y="{top + h + 35}" font-size="11" '
                   f'fill="{color}">{_e(model)}</text>')
    parts.append(f'<text x="{left + w}" y="{top + h + 15}" font-size="10" text-anchor="end">'
                 f"step {max_step}</text>")
  parts.append("</svg>")
  return "".join(parts)


# ------------------------------------------------------------------------------------ tables

def _table(header: list, rows: list) -> str:
  head = "".join(f"<th>{_e(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _trace_table(traces: dict) -> str:
  rows = []
  for split in ("train", "eval"):
    t = traces[split]
    for family, s in sorted(t["per_family"].items()):
      rows.append([split, family, s["examples"], s["sampled"], s["passed"],
                   f"{100 * s['pass_rate']:.1f}", s["kept"], f"{100 * s['kept_rate']:.1f}"])
    rows.append([split, "all", t["examples"], t["sampled"], t["passed"],
                 f"{100 * t['pass_rate']:.1f}", t["kept"], f"{100 * t['kept_rate']:.1f}"])
  return _table(["split", "family", "examples", "programs sampled", "passed", "pass %", "kept",
                 "kept %"], rows)


def _model_table(results: dict) -> str:
  rows = []
  for model, e in results["models"].items():
    acc = "; ".join(f"{p}: {a['overall']:.1f}%" for p, a in e["accuracy"].items())
    rows.append([model, e["train_steps"], f"{e['loss_tokens']:.0f}", e["text_positions"],
                 f"{e['wall_time_s']:.1f}", "-" if e["final_loss"] is None else
                 f"{e['final_loss']:.3f}", acc])
  return _table(["model", "steps", "loss tokens", "text positions", "train wall s", "final loss",
                 "held-out accuracy"], rows)


def _latency_table(results: dict) -> str:
  rows = [[name, f"{v['mean']:.4f}", v["questions"]]
          for name, v in results["latency_s_per_question"].items()]
  return _table(["answering with", "seconds per question", "questions timed"], rows)


def _samples(workdir: str, results: dict, predictions: dict, count: int) -> str:
  trace_dir = os.path.join(workdir, "traces", "eval")
  cards = []
  for record in records.read_records(trace_dir):
    if len(cards) >= count:
      break
    trace = json.loads(record.trace or "[]")
    answers = []
    for model, prompt, label, _ in SERIES:
      if model is None:
        answers.append((label, record.candidate_answers[0] if record.candidate_answers else ""))
      else:
        answers.append((label, predictions.get(model, {}).get(prompt, {}).get(
            record.example_id, "(not evaluated)")))
    answer_rows = "".join(f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>"
                          for label, text in answers)
    program = record.program or (record.candidate_programs[0] if record.candidate_programs
                                 else "")
    kept = "kept program" if record.program else "first program (none passed)"
    cards.append(
        f'<div class="card"><img alt="{_e(record.example_id)}" '
        f'src="{image_with_boxes(record.image, trace_boxes(trace))}"/>'
        f'<div class="text"><p class="q"><b>{_e(record.family)}</b>: {_e(record.question)} '
        f"<span class=\"label\">label: {_e(' / '.join(record.answers))}</span></p>"
        f"<details open><summary>{kept}</summary><pre>{_e(program)}</pre></details>"
        f"<p class=\"rationale\">{_e(record.rationale or '(no rationale: no program passed)')}"
        f"</p><table class=\"answers\">{answer_rows}</table></div></div>")
  return "".join(cards)


_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.card { display: flex; gap: 16px; border-top: 1px solid #ddd; padding: 12px 0; }
.card img { width: 224px; height: auto; image-rendering: pixelated; }
.card pre { font-size: 11px; background: #f6f6f6; padding: 6px; white-space: pre-wrap; }
.card .answers th, .card .answers td { text-align: left; }
.label { color: #2ca02c; margin-left: 8px; }
.rationale { font-size: 13px; }
"""


def render(workdir: str, results: dict, predictions: dict) -> str:
  """The page's HTML."""
  config = results["config"]
  samples = int(config.get("eval", {}).get("samples", 12))
  timings = results["timings_s"]
  timing_rows = [[k, f"{v:.1f}"] for k, v in timings.items()]
  return "".join([
      "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
      "<title>vpd_jax demo report</title>",
      f"<style>{_STYLE}</style></head><body>",
      "<h1>Visual program distillation on ShapesVQA</h1>",
      f"<p>seed {_e(results['seed'])}; model size {_e(config['train']['model']['size'])}; "
      f"{_e(config['train']['total_steps'])} steps of {_e(config['train']['batch_size'])} rows "
      f"per model; {_e(results['traces']['train']['examples'])} training and "
      f"{_e(results['traces']['eval']['examples'])} held-out questions.</p>",
      "<h2>Held-out accuracy per question family</h2>", accuracy_chart(results),
      "<h2>Models</h2>", _model_table(results),
      "<h2>Training loss</h2>", loss_chart(results),
      "<h2>Program traces</h2>", _trace_table(results["traces"]),
      "<h2>Seconds per question</h2>", _latency_table(results),
      "<h2>Held-out questions</h2>", _samples(workdir, results, predictions, samples),
      "<h2>Stage times (s)</h2>", _table(["stage", "seconds"], timing_rows),
      f"<script>{_CHECK_SCRIPT}</script></body></html>"])


def write_report(workdir: str, results: Optional[dict] = None,
                 predictions: Optional[dict] = None) -> str:
  """Writes workdir/report.html (from the files in `workdir` for what is not given); returns
  its path."""
  if results is None:
    results = _load_json(os.path.join(workdir, "results.json"))
  if predictions is None:
    predictions = load_predictions(workdir, results)
  page = render(workdir, results, predictions)
  path = os.path.join(workdir, "report.html")
  records.write_atomic(path, page.encode("utf-8"))
  return path
