"""Pixel operations a model writes as text: parsing and execution on the original pixels.

A model turn is free text that may contain one operation call; the call ends the turn. Two calls
exist (Pixel Reasoner's operations):

  zoom_in(<locYMIN><locXMIN><locYMAX><locXMAX>)   PaliGemma location tokens, 0..1023 over the image
  zoom_in(x0, y0, x1, y1)                          the same box as fractions of width and height
  select_frames(i, j, ...)                         0-based frame indices of a video

`zoom_in` crops the original image (never an earlier crop) to the box enlarged by 10% on each side
and returns it as one new image; the crop must be at least `min_crop` pixels on each side in the
original image (28 in the paper), so a box that names nothing is refused. `select_frames` returns
the chosen frames, in the order given, as new images; at most `max_frames` of them.

A call that cannot run does not raise: `execute` returns an `OperationResult` whose `error` is the
text the environment puts in the conversation, always starting "Execution Error:", so the model can
read what went wrong and correct itself.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

LOC_BINS = 1024
ERROR_PREFIX = "Execution Error:"
OPERATIONS = ("zoom_in", "select_frames")
# The paper pads every zoom box by 10% of its size on each side.
ZOOM_PADDING = 0.1

_CALL = re.compile(r"\b(zoom_in|select_frames)\s*\(([^()]*)\)?")
_LOC = re.compile(r"<loc(\d{4})>")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_ANSWER = re.compile(r"answer is\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Call:
  """A parsed operation call: name and its raw argument text (parsed again by `execute`)."""
  name: str
  arguments: str
  closed: bool = True


@dataclasses.dataclass
class OperationResult:
  """What an executed call gives back: new images, or an error message for the conversation."""
  images: list = dataclasses.field(default_factory=list)
  error: Optional[str] = None
  box: Optional[tuple] = None  # zoom_in: the pixel box cropped, (x0, y0, x1, y1), x1/y1 exclusive
  frames: Optional[tuple] = None  # select_frames: the frames returned

  @property
  def ok(self) -> bool:
    return self.error is None


def find_call(text: str) -> Optional[Call]:
  """The first operation call in a turn's text, or None when the turn calls nothing."""
  match = _CALL.search(text)
  if match is None:
    return None
  return Call(match.group(1), match.group(2) or "", closed=match.group(0).endswith(")"))


def find_answer(text: str) -> Optional[str]:
  """The answer a final turn gives ("... the answer is X."), or None."""
  match = _ANSWER.search(text.strip())
  return match.group(1).strip() if match else None


def format_zoom(box: Sequence[float], width: int, height: int) -> str:
  """The zoom_in call for a pixel box (x0, y0, x1, y1) of a width x height image, in loc tokens."""
  x0, y0, x1, y1 = (float(v) for v in box)

  def loc(value, size):
    return min(LOC_BINS - 1, max(0, int(value / size * LOC_BINS)))

  locs = (loc(y0, height), loc(x0, width), loc(y1, height), loc(x1, width))
  return "zoom_in(" + "".join(f"<loc{v:04d}>" for v in locs) + ")"


def format_select(frames: Sequence[int]) -> str:
  return "select_frames(" + ", ".join(str(int(f)) for f in frames) + ")"


def _error(message: str) -> OperationResult:
  return OperationResult(error=f"{ERROR_PREFIX} {message}")


def _parse_box(arguments: str) -> tuple[Optional[tuple], Optional[str]]:
  """(x0, y0, x1, y1) as fractions, or an error message."""
  text = arguments.strip()
  locs = _LOC.findall(text)
  if locs:
    if len(locs) != 4 or _LOC.sub("", text).strip():
      return None, (f"zoom_in expects exactly four location tokens <locYMIN><locXMIN><locYMAX>"
                    f"<locXMAX>, got {text!r}")
    ymin, xmin, ymax, xmax = (int(v) for v in locs)
    if max(ymin, xmin, ymax, xmax) >= LOC_BINS:
      return None, f"location tokens run from <loc0000> to <loc{LOC_BINS - 1:04d}>, got {text!r}"
    return (xmin / LOC_BINS, ymin / LOC_BINS, xmax / LOC_BINS, ymax / LOC_BINS), None
  parts = [p.strip() for p in text.strip("[]").split(",")]
  if len(parts) != 4 or not all(_NUMBER.match(p) for p in parts):
    return None, (f"zoom_in expects a box of four numbers x0, y0, x1, y1 in [0, 1] or four "
                  f"location tokens, got {text!r}")
  return tuple(float(p) for p in parts), None


def zoom_in(image: np.ndarray, arguments: str, min_crop: int = 28) -> OperationResult:
  """Crops `image` [H, W, C] to the box in `arguments`, padded by 10%; see the module docstring."""
  box, problem = _parse_box(arguments)
  if problem:
    return _error(problem)
  x0, y0, x1, y1 = box
  if min(box) < 0.0 or max(box) > 1.0:
    return _error(f"the box {arguments.strip()} lies outside the image; coordinates must be in "
                  "[0, 1]")
  if x1 <= x0 or y1 <= y0:
    return _error(f"the box {arguments.strip()} is empty; it needs x0 < x1 and y0 < y1")
  height, width = image.shape[:2]
  pad_x, pad_y = ZOOM_PADDING * (x1 - x0), ZOOM_PADDING * (y1 - y0)
  left = max(0, int(np.floor((x0 - pad_x) * width)))
  top = max(0, int(np.floor((y0 - pad_y) * height)))
  right = min(width, int(np.ceil((x1 + pad_x) * width)))
  bottom = min(height, int(np.ceil((y1 + pad_y) * height)))
  if right - left < min_crop or bottom - top < min_crop:
    return _error(f"the box {arguments.strip()} is too small: the crop is {right - left}x"
                  f"{bottom - top} pixels, at least {min_crop}x{min_crop} are needed")
  return OperationResult(images=[image[top:bottom, left:right]], box=(left, top, right, bottom))


def select_frames(frames: np.ndarray, arguments: str, max_frames: int = 8) -> OperationResult:
  """The frames [T, H, W, C] named in `arguments`; see the module docstring."""
  text = arguments.strip().strip("[]").strip()
  if not text:
    return _error("select_frames needs at least one frame index, got an empty list")
  parts = [p.strip() for p in text.split(",")]
  if not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
    return _error(f"select_frames expects integer frame indices separated by commas, got "
                  f"{arguments.strip()!r}")
  indices = [int(p) for p in parts]
  count = frames.shape[0]
  outside = [i for i in indices if not 0 <= i < count]
  if outside:
    return _error(f"frame indices {outside} are out of range; the video has frames 0 to "
                  f"{count - 1}")
  if len(set(indices)) != len(indices):
    return _error(f"frame indices {indices} repeat a frame")
  if len(indices) > max_frames:
    return _error(f"at most {max_frames} frames can be selected, got {len(indices)}")
  return OperationResult(images=[frames[i] for i in indices], frames=tuple(indices))


def execute(call: Call, visual: np.ndarray, is_video: bool, *, min_crop: int = 28,
            max_frames: int = 8) -> OperationResult:
  """Runs `call` on the original pixels: an image [H, W, C] or a video's frames [T, H, W, C]."""
  if not call.closed:
    return _error(f"the call {call.name}({call.arguments.strip()} is not closed with ')'")
  if call.name == "zoom_in":
    if is_video:
      return _error("zoom_in works on an image; this is a video, use select_frames(...)")
    return zoom_in(visual, call.arguments, min_crop)
  if call.name == "select_frames":
    if not is_video:
      return _error("select_frames works on a video; this is an image, use zoom_in(...)")
    return select_frames(visual, call.arguments, max_frames)
  return _error(f"unknown operation {call.name!r}; expected one of {OPERATIONS}")
