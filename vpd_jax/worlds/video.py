"""ShapesVQA videos: short clips of moving shapes whose question is about one frame.

Each shape moves along its own horizontal lane (lanes never overlap, so shapes never occlude each
other) at a constant speed, and is on screen only for a run of frames: shapes enter and leave, so
what a frame shows differs from its neighbours. A question names one frame (0-based):

  "How many shapes are there in frame K?"          answer: the shapes on screen in frame K
  "What color is the <kind> in frame K?"           answer: that shape's colour (the kind is unique
                                                   among the shapes of frame K)

Answers come from the tracks, not from pixels. The model first sees `contact_sheet`, all frames
shrunk into one grid image, too small to count or read colours reliably at a small model's input
size; selecting the frame (select_frames) shows it at full size. `frames_needed` names the frames a
question is about, for warm-start traces.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vpd_jax.worlds.questions import family_turn
from vpd_jax.worlds.render import render
from vpd_jax.worlds.scene import COLORS, SHAPES, Scene, Shape

VIDEO_FAMILIES = ("count", "color")


@dataclasses.dataclass(frozen=True)
class VideoConfig:
  num_frames: int = 8
  size: int = 96
  min_shapes: int = 2
  max_shapes: int = 4
  radius: float = 0.08
  min_visible_frames: int = 2

  def __post_init__(self):
    if not 2 <= self.num_frames <= 64:
      raise ValueError(f"VideoConfig num_frames must be in [2, 64], got {self.num_frames}")
    if self.size < 32:
      raise ValueError(f"VideoConfig size must be >= 32, got {self.size}")
    lanes = int(1.0 / (2.5 * self.radius))
    if not 1 <= self.min_shapes <= self.max_shapes <= lanes:
      raise ValueError(f"VideoConfig needs 1 <= min_shapes <= max_shapes <= {lanes} (lanes of "
                       f"radius {self.radius}), got {self.min_shapes}, {self.max_shapes}")
    if not 1 <= self.min_visible_frames <= self.num_frames:
      raise ValueError(f"VideoConfig min_visible_frames must be in [1, num_frames], got "
                       f"{self.min_visible_frames}")


@dataclasses.dataclass
class Track:
  """One shape's motion: on screen in frames [start, end), centre x0 + speed * frame, lane y."""
  color: str
  shape: str
  y: float
  x0: float
  speed: float
  start: int
  end: int

  def visible(self, frame: int) -> bool:
    return self.start <= frame < self.end

  def x(self, frame: int) -> float:
    return self.x0 + self.speed * frame


@dataclasses.dataclass
class VideoExample:
  example_id: str
  frames: np.ndarray  # uint8 [T, H, W, 3]
  overview: np.ndarray  # uint8 contact sheet of all frames
  question: str
  answers: list
  family: str
  frames_needed: tuple
  tracks: list


def _tracks(rng: np.random.Generator, config: VideoConfig) -> list[Track]:
  lanes = int(1.0 / (2.5 * config.radius))
  count = int(rng.integers(config.min_shapes, config.max_shapes + 1))
  lane_ids = sorted(rng.choice(lanes, size=count, replace=False))
  margin = config.radius * 1.2
  tracks = []
  for lane in lane_ids:
    y = (lane + 0.5) / lanes
    t = config.num_frames
    length = int(rng.integers(config.min_visible_frames, t + 1))
    start = int(rng.integers(0, t - length + 1))
    x_start, x_end = rng.uniform(margin, 1.0 - margin, size=2)
    speed = float(x_end - x_start) / max(t - 1, 1)
    tracks.append(Track(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), float(y),
                        float(x_start), speed, start, start + length))
  return tracks


def render_frame(tracks: list[Track], frame: int, config: VideoConfig) -> np.ndarray:
  shapes = [Shape(i, tr.color, tr.shape, "medium", tr.x(frame), tr.y, config.radius)
            for i, tr in enumerate(t for t in tracks if t.visible(frame))]
  return render(Scene(config.size, config.size, shapes))


def contact_sheet(frames: np.ndarray, gap: int = 2) -> np.ndarray:
  """All frames [T, H, W, 3] in a near-square grid, left to right then top to bottom, separated by
  dark lines `gap` pixels wide."""
  count, h, w, _ = frames.shape
  cols = int(math.ceil(math.sqrt(count)))
  rows = int(math.ceil(count / cols))
  sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 40, np.uint8)
  for i, frame in enumerate(frames):
    r, c = divmod(i, cols)
    sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frame
  return sheet


def _pose(rng, tracks, family, config):
  frame = int(rng.integers(config.num_frames))
  on_screen = [t for t in tracks if t.visible(frame)]
  if family == "count":
    return f"How many shapes are there in frame {frame}?", str(len(on_screen)), frame
  kinds = [t.shape for t in on_screen]
  unique = [t for t in on_screen if kinds.count(t.shape) == 1]
  if not unique:
    return None
  target = unique[int(rng.integers(len(unique)))]
  return f"What color is the {target.shape} in frame {frame}?", target.color, frame


def generate_video_example(seed: int, index: int, config: VideoConfig = VideoConfig(),
                           families=VIDEO_FAMILIES) -> VideoExample:
  """One clip and question, deterministic in (seed, index); families take turns by index."""
  family = family_turn(seed, index, families, VIDEO_FAMILIES, "video question")
  rng = np.random.default_rng([seed, index, 11])
  for _ in range(100):
    tracks = _tracks(rng, config)
    posed = _pose(rng, tracks, family, config)
    if posed is not None:
      break
  else:
    raise RuntimeError(f"no well-posed {family!r} video question in 100 clips from {config}")
  question, answer, frame = posed
  frames = np.stack([render_frame(tracks, f, config) for f in range(config.num_frames)])
  return VideoExample(f"video-{seed}-{index:07d}", frames, contact_sheet(frames), question,
                      [answer], f"video_{family}", (frame,), tracks)


def generate_video_examples(seed: int, num: int, config: VideoConfig = VideoConfig(),
                            families=VIDEO_FAMILIES) -> list[VideoExample]:
  return [generate_video_example(seed, i, config, families) for i in range(num)]

