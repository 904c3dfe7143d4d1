"""The multi-turn pixel-operation environment: one `Episode` per rollout of one question.

The conversation starts with the question's first view (the image, or a contact sheet of a video's
frames) and the question. Each model turn is handed to `Episode.step`:

  - a turn with an operation call (operations.py) is executed on the original pixels; the result
    images, or the "Execution Error: ..." text, are appended and the model gets another turn;
  - a turn without a call is the final answer ("... the answer is X.") and ends the episode;
  - calls beyond `max_ops` are not executed: the error tells the model to answer, and the episode
    ends anyway after `max_ops + 2` turns (one turn to correct the last error, one to answer).

Nothing a model writes raises: malformed calls, boxes outside the image and empty frame lists all
come back as errors in the conversation. The episode records what the rewards need: the number of
calls (`num_ops`, erroneous ones included), errors, whether the last call failed and was never
followed by a working one (`unfixed_error`), and the answer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from vpd_jax.rl import operations


@dataclasses.dataclass
class Task:
  """One question: the original pixels and what the model first sees.

  visual: uint8 image [H, W, 3], or a video's frames [T, H, W, 3] when `is_video`.
  overview: the first image of the conversation (defaults to `visual` for an image).
  """
  visual: np.ndarray
  question: str
  answers: list
  is_video: bool = False
  overview: Optional[np.ndarray] = None
  task_id: str = ""

  def __post_init__(self):
    want = 4 if self.is_video else 3
    if self.visual.ndim != want or self.visual.shape[-1] != 3:
      kind = "video frames [T, H, W, 3]" if self.is_video else "an image [H, W, 3]"
      raise ValueError(f"Task {self.task_id!r}: visual must be {kind}, got shape "
                       f"{tuple(self.visual.shape)}")
    if self.overview is None:
      if self.is_video:
        raise ValueError(f"Task {self.task_id!r}: a video task needs an overview image")
      self.overview = self.visual
    if not self.answers:
      raise ValueError(f"Task {self.task_id!r}: answers must not be empty")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  max_ops: int = 3
  min_crop: int = 28
  max_frames: int = 8

  def __post_init__(self):
    if self.max_ops < 0 or self.min_crop < 1 or self.max_frames < 1:
      raise ValueError(f"EnvConfig: max_ops must be >= 0 and min_crop, max_frames >= 1, got {self}")

  @property
  def max_turns(self) -> int:
    return self.max_ops + 2


@dataclasses.dataclass
class Segment:
  """A piece of the conversation after the prompt: model text, environment text or an image."""
  kind: str  # "model", "env" or "image"
  text: str = ""
  image: Optional[np.ndarray] = None
  tokens: Optional[list] = None  # model turns: the sampled ids, EOS included


class Episode:
  """One rollout's environment state; see the module docstring."""

  def __init__(self, task: Task, config: EnvConfig = EnvConfig()):
    self.task = task
    self.config = config
    self.segments: list[Segment] = []
    self.num_turns = 0
    self.num_ops = 0
    self.num_errors = 0
    self.unfixed_error = False
    self.answer: Optional[str] = None
    self.done = False

  @property
  def num_images(self) -> int:
    return 1 + sum(s.kind == "image" for s in self.segments)

  def step(self, turn_text: str, tokens: Optional[list] = None) -> list[Segment]:
    """Takes the model's turn (its text, and the sampled ids when a model wrote it); returns the
    segments the environment appends (maybe none)."""
    if self.done:
      raise ValueError(f"Episode {self.task.task_id!r} is over; step() got another turn")
    self.segments.append(Segment("model", text=turn_text, tokens=tokens))
    self.num_turns += 1
    call = operations.find_call(turn_text)
    if call is None:
      self.answer = operations.find_answer(turn_text)
      self.done = True
      return []
    self.num_ops += 1
    if self.num_ops > self.config.max_ops:
      result = operations.OperationResult(
          error=f"{operations.ERROR_PREFIX} the limit of {self.config.max_ops} operations is "
                "reached; give the answer now")
    else:
      result = operations.execute(call, self.task.visual, self.task.is_video,
                                  min_crop=self.config.min_crop, max_frames=self.config.max_frames)
    if result.ok:
      added = [Segment("image", image=image) for image in result.images]
      self.unfixed_error = False
    else:
      added = [Segment("env", text=result.error)]
      self.num_errors += 1
      self.unfixed_error = True
    self.segments.extend(added)
    if self.num_turns >= self.config.max_turns:
      self.done = True
    return added

  def stop(self) -> None:
    """Ends the episode early (the token budget ran out); the answer stays None."""
    self.done = True

  @property
  def correct(self) -> bool:
    return self.answer is not None and is_correct(self.answer, self.task.answers)


def normalize_answer(text: str) -> str:
  return " ".join(text.lower().strip().rstrip(".").split())


def is_correct(answer: str, answers) -> bool:
  return normalize_answer(answer) in {normalize_answer(a) for a in answers}
