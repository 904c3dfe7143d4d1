"""Tests for vpd_jax.worlds.video: moving shapes, per-frame answers checked on the pixels."""

import numpy as np
import pytest

from vpd_jax.worlds import video
from vpd_jax.worlds.scene import BACKGROUND, COLORS

CONFIG = video.VideoConfig(num_frames=6, size=64)


def _lanes_with_shapes(frame, lanes):
  """How many horizontal lanes of a frame hold non-background pixels (pixel-side count)."""
  busy = np.any(frame != np.array(BACKGROUND, np.uint8), axis=(1, 2))
  bands = np.array_split(busy, lanes)
  return sum(bool(b.any()) for b in bands)


def test_examples_are_deterministic_and_shaped():
  a = video.generate_video_example(4, 2, CONFIG)
  b = video.generate_video_example(4, 2, CONFIG)
  np.testing.assert_array_equal(a.frames, b.frames)
  assert a.question == b.question and a.frames.shape == (6, 64, 64, 3)
  assert a.frames.dtype == np.uint8 and a.frames_needed[0] in range(6)


def test_count_answers_match_the_pixels_of_the_frame():
  lanes = int(1.0 / (2.5 * CONFIG.radius))
  for i in range(0, 16, 2):
    ex = video.generate_video_example(0, i, CONFIG)
    assert ex.family == "video_count"
    frame = ex.frames[ex.frames_needed[0]]
    assert int(ex.answers[0]) == _lanes_with_shapes(frame, lanes)


def test_color_answers_are_on_screen_in_that_frame():
  for i in range(1, 16, 2):
    ex = video.generate_video_example(0, i, CONFIG)
    assert ex.family == "video_color" and ex.answers[0] in COLORS
    frame = ex.frames[ex.frames_needed[0]]
    colour = np.array(COLORS[ex.answers[0]], np.uint8)
    assert np.all(frame == colour, axis=-1).sum() > 20


def test_shapes_move_and_enter_or_leave():
  moved = changed = False
  for i in range(10):
    ex = video.generate_video_example(1, i, CONFIG)
    moved |= any(abs(t.speed) > 0.01 for t in ex.tracks)
    counts = {sum(t.visible(f) for t in ex.tracks) for f in range(CONFIG.num_frames)}
    changed |= len(counts) > 1
  assert moved and changed


def test_contact_sheet_places_frames_in_a_grid():
  frames = np.stack([np.full((4, 5, 3), i * 20, np.uint8) for i in range(5)])
  sheet = video.contact_sheet(frames, gap=1)
  assert sheet.shape == (2 * 4 + 1, 3 * 5 + 2, 3)  # 3 columns, 2 rows
  np.testing.assert_array_equal(sheet[0:4, 6:11], frames[1])
  np.testing.assert_array_equal(sheet[5:9, 6:11], frames[4])


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="num_frames"):
    video.VideoConfig(num_frames=1)
  with pytest.raises(ValueError, match="max_shapes"):
    video.VideoConfig(max_shapes=40)


def test_bad_families_and_index_are_named():
  with pytest.raises(ValueError, match=r"unknown video question families \['zoom'\]"):
    video.generate_video_example(0, 0, families=("zoom",))
  with pytest.raises(ValueError, match="index=-3"):
    video.generate_video_example(0, -3)
  # Families take turns by index.
  families = video.VIDEO_FAMILIES[:2]
  assert [video.generate_video_example(0, i, families=families).family
          for i in range(4)] == [f"video_{families[0]}", f"video_{families[1]}"] * 2
