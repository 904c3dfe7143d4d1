"""Plots RaPR and rollout accuracy of two Pixel Reasoner GRPO runs from their metrics.jsonl (Pillow).

  python -m bench.plot_rl W_cur/metrics.jsonl W_plain/metrics.jsonl out.png \
      [--labels "curiosity (alpha=0.5)" "plain GRPO (alpha=0)"]

Each curve is a running mean over the last 10 GRPO iterations (metrics lines with "phase": 1,
numbered by training step, warm-start steps first);
the RaPR panel marks the target H = 0.3. This draws the figures of BENCHMARKS.md's learning-trap
section.
"""

import argparse

from PIL import Image
from PIL import ImageDraw

from vpd_jax.programs import records

COLORS = ((200, 40, 40), (40, 80, 220))


def grpo_series(path: str, key: str, smooth: int = 10) -> tuple[list, list]:
  """(iterations, running means of `key`) over the GRPO lines of a metrics.jsonl."""
  rows = [entry for entry in records.read_jsonl(path) if entry.get("phase") == 1 and key in entry]
  if not rows:
    raise ValueError(f"{path} has no GRPO iterations with {key!r} (lines with \"phase\": 1)")
  xs = [r["step"] for r in rows]
  values = [r[key] for r in rows]
  means = [sum(values[max(0, i - smooth + 1):i + 1]) / len(values[max(0, i - smooth + 1):i + 1])
           for i in range(len(values))]
  return xs, means


def draw_panel(draw, box, series, title: str, ymax: float, hline=None) -> None:
  x0, y0, x1, y1 = box
  draw.rectangle(box, outline=(0, 0, 0))
  draw.text((x0 + 5, y0 - 16), title, fill=(0, 0, 0))
  all_x = [x for xs, _, _, _ in series for x in xs]
  lo, hi = min(all_x), max(all_x)

  def px(x):
    return x0 + (x - lo) / max(hi - lo, 1) * (x1 - x0)

  def py(y):
    return y1 - y / ymax * (y1 - y0)

  for tick in range(6):
    value = ymax * tick / 5
    draw.line([(x0 - 4, py(value)), (x0, py(value))], fill=(0, 0, 0))
    draw.text((x0 - 34, py(value) - 6), f"{value:.2f}", fill=(0, 0, 0))
  draw.text((x0, y1 + 4), f"step {lo}", fill=(0, 0, 0))
  draw.text((x1 - 30, y1 + 4), f"{hi}", fill=(0, 0, 0))
  if hline is not None:
    draw.line([(x0, py(hline)), (x1, py(hline))], fill=(150, 150, 150))
    draw.text((x1 - 60, py(hline) - 14), f"H={hline}", fill=(120, 120, 120))
  for i, (xs, ys, color, name) in enumerate(series):
    draw.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=color, width=2)
    draw.text((x0 + 10, y0 + 8 + 14 * i), name, fill=color)


def plot(paths, labels, output: str, target: float = 0.3) -> None:
  image = Image.new("RGB", (900, 420), "white")
  draw = ImageDraw.Draw(image)
  arms = list(zip(paths, COLORS, labels))
  draw_panel(draw, (60, 40, 430, 370),
             [grpo_series(p, "rapr") + (c, n) for p, c, n in arms], "RaPR (10-iteration mean)",
             1.0, target)
  draw_panel(draw, (510, 40, 880, 370),
             [grpo_series(p, "accuracy") + (c, n) for p, c, n in arms],
             "rollout accuracy (10-iteration mean)", 0.5)
  image.save(output)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("first")
  parser.add_argument("second")
  parser.add_argument("output")
  parser.add_argument("--labels", nargs=2, default=("curiosity (alpha=0.5)", "plain GRPO (alpha=0)"))
  args = parser.parse_args()
  plot([args.first, args.second], args.labels, args.output)


if __name__ == "__main__":
  main()
