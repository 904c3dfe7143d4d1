"""High-resolution ShapesVQA: large scenes whose question is about one tiny shape.

A scene of `HiresConfig.width` x `height` pixels (448 by default) holds a few ordinary medium and
large shapes plus one target whose radius (`target_radius`, normalised like every radius) is far
below every size in scene.SIZES: about 5 pixels at 448, under one pixel once the image is shrunk to
a small model's input (32 or 112 pixels). Its colour and kind cannot be read at that resolution;
zooming in on it (a crop a few times its size) makes them readable. Questions:

  "What color is the tiny shape?"     answer: its colour
  "What shape is the tiny shape?"     answer: its kind

`target_box` gives the pixel box a zoom should name (the target, enlarged `zoom_factor` times about
its centre and kept inside the image), and each example's reference program crops that box and asks
about the crop, so executing it records the crop a warm-start trace turns into a zoom-in. The
target's `size` field is "small" (scene JSON only knows the SIZES names); its radius is what makes
it tiny.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vpd_jax.worlds.questions import Example, family_turn, make_program
from vpd_jax.worlds.render import render
from vpd_jax.worlds.scene import BOUND_RADII, COLORS, SHAPES, SceneConfig, Shape, generate_scene

HIRES_FAMILIES = ("color", "shape")
QUESTIONS = {"color": "What color is the tiny shape?", "shape": "What shape is the tiny shape?"}


@dataclasses.dataclass(frozen=True)
class HiresConfig:
  width: int = 448
  height: int = 448
  min_distractors: int = 2
  max_distractors: int = 4
  target_radius: float = 0.012
  zoom_factor: float = 4.0  # target_box side / target diameter
  noise_std: float = 0.0

  def __post_init__(self):
    if self.width < 128 or self.height < 128:
      raise ValueError(f"HiresConfig width/height must be >= 128, got {self.width}x{self.height}")
    if not 0.0 < self.target_radius < 0.045:
      raise ValueError(f"HiresConfig target_radius must be in (0, 0.045) (below the small size), "
                       f"got {self.target_radius}")
    if not 1 <= self.min_distractors <= self.max_distractors:
      raise ValueError(f"HiresConfig needs 1 <= min_distractors <= max_distractors, got "
                       f"{self.min_distractors}, {self.max_distractors}")
    if self.zoom_factor < 1.0:
      raise ValueError(f"HiresConfig zoom_factor must be >= 1, got {self.zoom_factor}")


def _place_target(rng: np.random.Generator, shapes: list[Shape], config: HiresConfig) -> Shape:
  """A tiny shape clear of every other shape (by their bounding circles), kept off the border."""
  w, h = config.width, config.height
  scale = min(w, h)
  margin = config.zoom_factor * config.target_radius * scale / 2.0 + 2.0
  color = str(rng.choice(list(COLORS)))
  kind = str(rng.choice(SHAPES))
  for _ in range(500):
    cx = float(rng.uniform(margin / w, 1.0 - margin / w))
    cy = float(rng.uniform(margin / h, 1.0 - margin / h))
    clear = all(
        math.hypot((cx - s.cx) * w, (cy - s.cy) * h)
        > (BOUND_RADII[s.shape] * s.r + BOUND_RADII[kind] * config.target_radius) * scale + 6.0
        for s in shapes)
    if clear:
      return Shape(len(shapes), color, kind, "small", cx, cy, config.target_radius)
  raise RuntimeError(f"no room for the tiny target among {len(shapes)} shapes in a {w}x{h} scene")


def target_box(example: Example, config: HiresConfig = HiresConfig()) -> tuple[int, int, int, int]:
  """Pixel box (x0, y0, x1, y1) around the target, `zoom_factor` times its extent, in the image."""
  scene = example.scene
  target = scene.shapes[-1]
  x0, y0, x1, y1 = target.box(scene.width, scene.height)
  half = config.zoom_factor * max(x1 - x0, y1 - y0) / 2.0
  cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
  left, top = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
  right, bottom = min(scene.width, int(round(cx + half))), min(scene.height, int(round(cy + half)))
  return left, top, right, bottom


def generate_hires_example(seed: int, index: int, config: HiresConfig = HiresConfig(),
                           families=HIRES_FAMILIES) -> Example:
  """One example, deterministic in (seed, index); the target is the scene's last shape."""
  family = family_turn(seed, index, families, HIRES_FAMILIES, "high-resolution question")
  rng = np.random.default_rng([seed, index, 7])
  scene_config = SceneConfig(width=config.width, height=config.height,
                             min_shapes=config.min_distractors, max_shapes=config.max_distractors,
                             size_names=("medium", "large"), noise_std=config.noise_std)
  scene = generate_scene(rng, scene_config)
  target = _place_target(rng, scene.shapes, config)
  scene.shapes.append(target)
  answer = target.color if family == "color" else target.shape
  example = Example(f"hires-{seed}-{index:07d}", render(scene), QUESTIONS[family], [answer],
                    f"hires_{family}", "", scene)
  left, top, right, bottom = target_box(example, config)
  example.program = make_program([
      f"tiny_patch = image_patch.crop({left}, {top}, {right}, {bottom})",
      f'return tiny_patch.simple_query("what {family} is this?")'])
  return example


def generate_hires_examples(seed: int, num: int, config: HiresConfig = HiresConfig(),
                            families=HIRES_FAMILIES) -> list[Example]:
  return [generate_hires_example(seed, i, config, families) for i in range(num)]
