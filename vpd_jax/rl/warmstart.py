"""Warm-start SFT data: multi-turn pixel-space conversations synthesised from program traces.

A visual program's trace records the crops it made (trace.py events with call "crop", whose result
is the pixel box). Each crop becomes a model turn calling zoom_in on that box; the final turn gives
the program's answer. Three kinds of conversation, as in Pixel Reasoner's warm start:

  direct zoom        "zoom_in(B)" -> crop -> "So the answer is X."
  self-correction    "zoom_in(W)" at a wrong place -> crop -> "<notice> zoom_in(B)" -> crop ->
                     "So the answer is X."   (W: a box of the same size that misses B)
  text only          "So the answer is X."   (questions answered without an operation)

and for videos, the frames a question is about become "select_frames(K)". Conversations are replayed
through the environment (env.Episode), so every operation output in a training row is what the
environment really returns for that call, and the rows are those rollouts produce
(conversation.py), with the loss on the model's turns only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from vpd_jax.programs import api
from vpd_jax.programs import trace as trace_lib
from vpd_jax.rl import conversation
from vpd_jax.rl import env as env_lib
from vpd_jax.rl import operations

ZOOM_TEXT = "I zoom in to look closer. "
NOTICE_TEXT = "The target is not in this region, so I look elsewhere. "
SELECT_TEXT = "I look at the frame the question asks about. "
KINDS = ("zoom", "self_correction", "text_only")


def answer_text(answer: str) -> str:
  return f"So the answer is {answer}."


def crop_boxes(events: Sequence[dict]) -> list[tuple]:
  """The pixel boxes (x0, y0, x1, y1) of a trace's crop calls, in call order."""
  boxes = []
  for event in events:
    if event.get("call") == "crop" and event.get("result"):
      box = tuple(int(v) for v in event["result"])
      if len(box) != 4:
        raise ValueError(f"crop event {event!r}: result must be a box of 4 numbers")
      boxes.append(box)
  return boxes


def reference_trace(program: str, image: np.ndarray) -> list[dict]:
  """Runs a world's own reference program in this process and returns its trace events.

  Only for programs this library generated (worlds/); programs from a generator go through the
  sandboxed executor (programs/executor.py).
  """
  namespace = api.make_namespace()
  exec(compile(program, "<reference program>", "exec"), namespace)  # pylint: disable=exec-used
  tracer = trace_lib.Tracer()
  with trace_lib.tracing(tracer):
    namespace["execute_command"](image)
  return [event.to_dict() for event in tracer.events]


def wrong_box(box: Sequence[int], width: int, height: int, rng: np.random.Generator) -> tuple:
  """A box of the same size as `box`, inside the image, that does not overlap it."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  for _ in range(200):
    left = int(rng.integers(0, max(width - w, 0) + 1))
    top = int(rng.integers(0, max(height - h, 0) + 1))
    if left + w <= x0 or left >= x1 or top + h <= y0 or top >= y1:
      return left, top, left + w, top + h
  raise ValueError(f"no box of {w}x{h} pixels misses {tuple(box)} in a {width}x{height} image")


def image_turns(boxes: Sequence[tuple], answer: str, width: int, height: int, kind: str,
                rng: Optional[np.random.Generator] = None) -> list[str]:
  """The model turns of one image conversation of `kind` (see the module docstring)."""
  if kind not in KINDS:
    raise ValueError(f"warm-start kind {kind!r} is unknown; expected one of {KINDS}")
  if kind == "text_only" or not boxes:
    return [answer_text(answer)]
  zooms = [operations.format_zoom(b, width, height) for b in boxes]
  turns = [ZOOM_TEXT + z for z in zooms]
  if kind == "self_correction":
    if rng is None:
      raise ValueError("a self-correction conversation needs rng to place the wrong zoom")
    wrong = operations.format_zoom(wrong_box(boxes[0], width, height, rng), width, height)
    turns = [ZOOM_TEXT + wrong, NOTICE_TEXT + zooms[0]] + turns[1:]
  return turns + [answer_text(answer)]


def video_turns(frames: Sequence[int], answer: str, kind: str = "zoom") -> list[str]:
  if kind == "text_only":
    return [answer_text(answer)]
  return [SELECT_TEXT + operations.format_select(frames), answer_text(answer)]


def replay(task: env_lib.Task, turns: Sequence[str],
           env_config: env_lib.EnvConfig = env_lib.EnvConfig()) -> env_lib.Episode:
  """Feeds written turns through the environment; the episode holds the whole conversation."""
  episode = env_lib.Episode(task, env_config)
  for turn in turns:
    if episode.done:
      raise ValueError(f"warm-start conversation for {task.task_id!r} ends before its turn "
                       f"{turn!r}; the environment stopped it (max_ops={env_config.max_ops})")
    episode.step(turn)
  if not episode.done:
    raise ValueError(f"warm-start conversation for {task.task_id!r} has no final answer turn")
  if episode.num_errors:
    raise ValueError(f"warm-start conversation for {task.task_id!r} made an operation error: "
                     f"{[s.text for s in episode.segments if s.kind == 'env']}")
  return episode


@dataclasses.dataclass(frozen=True)
class WarmStartMix:
  """Shares of each kind of image conversation (the rest are direct zooms)."""
  self_correction: float = 0.25
  text_only: float = 0.25

  def __post_init__(self):
    if min(self.self_correction, self.text_only) < 0 or self.self_correction + self.text_only > 1:
      raise ValueError(f"WarmStartMix shares must be >= 0 and sum to <= 1, got {self}")

  def pick(self, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < self.text_only:
      return "text_only"
    return "self_correction" if u < self.text_only + self.self_correction else "zoom"


def synthesize_rows(episodes: Sequence[env_lib.Episode], encode: Callable, model_config,
                    row_length: int, max_images: int) -> dict:
  """Padded SFT rows [B, row_length] (conversation layout, loss on model turns) of episodes."""
  arrays = []
  for e in episodes:
    row = conversation.build_row(e.task, e.segments, encode, model_config.num_image_tokens,
                                 model_config.vit.image_size).arrays()
    if row["tokens"].shape[0] > row_length or len(row["images"]) > max_images:
      raise ValueError(f"warm-start conversation {e.task.task_id!r} needs {row['tokens'].shape[0]} "
                       f"tokens and {len(row['images'])} images; rows hold {row_length} and "
                       f"{max_images}: raise row_length or max_images")
    arrays.append(row)
  return conversation.pad_rows(arrays, row_length, max_images, model_config.vit.image_size)
