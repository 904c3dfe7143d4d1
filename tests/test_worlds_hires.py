"""Tests for vpd_jax.worlds.hires: tiny targets in large scenes, answers, zoom boxes, programs."""

import math

import numpy as np
import pytest

from vpd_jax.rl import warmstart
from vpd_jax.worlds import hires
from vpd_jax.worlds.render import label_map
from vpd_jax.worlds.scene import BOUND_RADII, SIZES

CONFIG = hires.HiresConfig(width=256, height=256, target_radius=0.02)


def test_examples_are_deterministic_and_alternate_families():
  a = hires.generate_hires_example(3, 5, CONFIG)
  b = hires.generate_hires_example(3, 5, CONFIG)
  assert a.scene.to_json() == b.scene.to_json() and a.question == b.question
  np.testing.assert_array_equal(a.image, b.image)
  families = [hires.generate_hires_example(3, i, CONFIG).family for i in range(4)]
  assert families == ["hires_color", "hires_shape", "hires_color", "hires_shape"]


def test_the_target_is_tiny_visible_clear_and_answers_the_question():
  for i in range(12):
    ex = hires.generate_hires_example(0, i, CONFIG)
    target, others = ex.scene.shapes[-1], ex.scene.shapes[:-1]
    assert target.r < SIZES["small"][0] and all(s.size in ("medium", "large") for s in others)
    assert ex.answers == [target.color if ex.family == "hires_color" else target.shape]
    # Drawn in full (nothing covers it) and apart from every other shape.
    labels = label_map(ex.scene)
    assert (labels == len(ex.scene.shapes)).sum() > 20
    for s in others:
      gap = math.hypot((s.cx - target.cx) * 256, (s.cy - target.cy) * 256)
      assert gap > (BOUND_RADII[s.shape] * s.r + BOUND_RADII[target.shape] * target.r) * 256


def test_target_is_under_two_pixels_at_32px_and_readable_after_the_zoom():
  for i in range(8):
    ex = hires.generate_hires_example(1, i, CONFIG)
    x0, y0, x1, y1 = ex.scene.shapes[-1].box(256, 256)
    assert max(x1 - x0, y1 - y0) * 32 / 256 < 2.0  # the whole image shrunk to 32 pixels
    bx0, by0, bx1, by1 = hires.target_box(ex, CONFIG)
    assert bx0 <= x0 and by0 <= y0 and bx1 >= x1 and by1 >= y1
    assert 0 <= bx0 and 0 <= by0 and bx1 <= 256 and by1 <= 256
    assert max(x1 - x0, y1 - y0) * 32 / max(bx1 - bx0, by1 - by0) >= 4.0  # the crop shrunk to 32


def test_reference_program_crops_the_target_box_and_mostly_answers_right():
  right = 0
  for i in range(6):
    ex = hires.generate_hires_example(2, i, CONFIG)
    events = warmstart.reference_trace(ex.program, ex.image)
    assert warmstart.crop_boxes(events) == [hires.target_box(ex, CONFIG)]
    right += events[-1]["result"] == ex.answers[0]
  assert right >= 4  # pixel tools on a tiny crop: usually right


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="target_radius"):
    hires.HiresConfig(target_radius=0.05)
  with pytest.raises(ValueError, match="width/height"):
    hires.HiresConfig(width=64)
  with pytest.raises(ValueError, match="families"):
    hires.generate_hires_example(0, 0, CONFIG, families=("count",))


def test_bad_families_and_seed_are_named():
  with pytest.raises(ValueError, match=r"unknown high-resolution question families \['count'\]"):
    hires.generate_hires_example(0, 0, families=("count",))
  with pytest.raises(ValueError, match="non-empty subset"):
    hires.generate_hires_example(0, 0, families=())
  with pytest.raises(ValueError, match="seed=-1"):
    hires.generate_hires_example(-1, 0)
