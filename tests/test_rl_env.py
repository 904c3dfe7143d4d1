"""Tests for vpd_jax.rl.env: multi-turn episodes, in-conversation errors, the operation limit."""

import numpy as np
import pytest

from vpd_jax.rl import env as env_lib
from vpd_jax.rl import operations as ops


def _image_task():
  return env_lib.Task(np.zeros((200, 200, 3), np.uint8), "What color is the tiny shape?", ["red"],
                      task_id="t0")


def _video_task(frames=5):
  visual = np.zeros((frames, 16, 16, 3), np.uint8)
  return env_lib.Task(visual, "How many shapes are there in frame 2?", ["3"], is_video=True,
                      overview=np.zeros((32, 32, 3), np.uint8), task_id="v0")


@pytest.mark.parametrize("turn", [
    "zoom_in(0.1, 0.2, 0.3)",            # malformed: three numbers
    "zoom_in(zoom)",                      # malformed: not a box
    "zoom_in(0.5, 0.5, 1.4, 0.9)",        # the box is outside the image
])
def test_image_errors_come_back_in_the_conversation_and_the_episode_continues(turn):
  episode = env_lib.Episode(_image_task())
  added = episode.step(turn)
  assert [s.kind for s in added] == ["env"] and added[0].text.startswith(ops.ERROR_PREFIX)
  assert not episode.done and episode.num_ops == 1 and episode.num_errors == 1
  assert episode.unfixed_error
  added = episode.step("zoom_in(0.1, 0.1, 0.5, 0.5)")  # the model corrects itself
  assert [s.kind for s in added] == ["image"] and not episode.unfixed_error
  assert episode.step("So the answer is red.") == []
  assert episode.done and episode.correct and episode.num_ops == 2 and episode.num_errors == 1


def test_empty_frame_list_is_an_error_and_the_video_episode_continues():
  episode = env_lib.Episode(_video_task())
  added = episode.step("select_frames()")
  assert added[0].kind == "env" and "empty list" in added[0].text and not episode.done
  added = episode.step("select_frames(2, 3)")
  assert [s.kind for s in added] == ["image", "image"]
  assert added[0].image.shape == (16, 16, 3) and episode.num_images == 3
  episode.step("So the answer is 3.")
  assert episode.done and episode.correct and not episode.unfixed_error


def test_operation_limit_and_turn_limit():
  episode = env_lib.Episode(_image_task(), env_lib.EnvConfig(max_ops=1))
  assert episode.step("zoom_in(0, 0, 0.5, 0.5)")[0].kind == "image"
  added = episode.step("zoom_in(0, 0, 0.6, 0.6)")  # over the limit: not executed
  assert "limit of 1 operations" in added[0].text and not episode.done
  episode.step("zoom_in(0, 0, 0.7, 0.7)")  # max_ops + 2 = 3 turns end the episode
  assert episode.done and episode.answer is None and not episode.correct
  assert episode.num_ops == 3 and episode.num_errors == 2 and episode.num_images == 2
  with pytest.raises(ValueError, match="is over"):
    episode.step("So the answer is red.")


def test_answers_are_compared_after_normalisation():
  assert env_lib.is_correct(" Red. ", ["red"]) and not env_lib.is_correct("blue", ["red"])
  with pytest.raises(ValueError, match="visual must be"):
    env_lib.Task(np.zeros((4, 4), np.uint8), "q", ["a"])
  with pytest.raises(ValueError, match="overview"):
    env_lib.Task(np.zeros((2, 4, 4, 3), np.uint8), "q", ["a"], is_video=True)
