"""Tests for vpd_jax.rl.warmstart: conversations from program traces, self-correction, SFT rows."""

import numpy as np
import pytest

from vpd_jax.data import vocab as vocab_lib
from vpd_jax.models import sizes
from vpd_jax.rl import env as env_lib
from vpd_jax.rl import operations as ops
from vpd_jax.rl import warmstart
from vpd_jax.worlds import hires
from vpd_jax.worlds import video

CONFIG = hires.HiresConfig(width=256, height=256, target_radius=0.02)


def _hires_task(ex):
  return env_lib.Task(ex.image, ex.question, ex.answers, task_id=ex.example_id)


def _overlaps(a, b):
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_a_crop_in_the_trace_becomes_a_zoom_that_shows_the_target():
  ex = hires.generate_hires_example(0, 1, CONFIG)
  boxes = warmstart.crop_boxes(warmstart.reference_trace(ex.program, ex.image))
  turns = warmstart.image_turns(boxes, ex.answers[0], 256, 256, "zoom")
  assert len(turns) == 2 and "zoom_in(<loc" in turns[0]
  assert turns[1] == f"So the answer is {ex.answers[0]}."
  episode = warmstart.replay(_hires_task(ex), turns)
  assert episode.correct and episode.num_ops == 1 and episode.num_images == 2
  crop = episode.segments[1].image
  colour = np.array(hires.COLORS[ex.scene.shapes[-1].color], np.uint8)
  assert np.all(crop == colour, axis=-1).sum() > 20  # the target is in the zoomed image


def test_self_correction_zooms_at_a_wrong_place_first_then_fixes_it():
  ex = hires.generate_hires_example(0, 2, CONFIG)
  box = hires.target_box(ex, CONFIG)
  rng = np.random.default_rng(0)
  turns = warmstart.image_turns([box], ex.answers[0], 256, 256, "self_correction", rng)
  assert len(turns) == 3 and turns[1].startswith(warmstart.NOTICE_TEXT)
  episode = warmstart.replay(_hires_task(ex), turns)
  assert episode.num_ops == 2 and episode.correct
  first = ops.execute(ops.find_call(turns[0]), ex.image, False).box
  second = ops.execute(ops.find_call(turns[1]), ex.image, False).box
  target = ex.scene.shapes[-1].box(256, 256)
  assert not _overlaps(first, target) and _overlaps(second, target)


def test_text_only_and_video_conversations():
  ex = hires.generate_hires_example(0, 3, CONFIG)
  assert warmstart.image_turns([(0, 0, 50, 50)], "red", 256, 256, "text_only") == [
      "So the answer is red."]
  clip = video.generate_video_example(0, 1, video.VideoConfig(num_frames=6, size=64))
  task = env_lib.Task(clip.frames, clip.question, clip.answers, is_video=True,
                      overview=clip.overview)
  episode = warmstart.replay(task, warmstart.video_turns(clip.frames_needed, clip.answers[0]))
  np.testing.assert_array_equal(episode.segments[1].image, clip.frames[clip.frames_needed[0]])
  assert episode.correct and episode.num_ops == 1
  with pytest.raises(ValueError, match="kind"):
    warmstart.image_turns([], "red", 10, 10, "other")
  with pytest.raises(ValueError, match="no final answer"):
    warmstart.replay(_hires_task(ex), ["zoom_in(0, 0, 0.5, 0.5)"])
  with pytest.raises(ValueError, match="operation error"):
    warmstart.replay(_hires_task(ex), ["zoom_in(0, 0, 2, 2)", "So the answer is red."])


def test_rows_put_the_loss_on_the_model_turns_only_and_the_vocabulary_keeps_the_syntax(tmp_path):
  examples = [hires.generate_hires_example(0, i, CONFIG) for i in range(4)]
  rng = np.random.default_rng(0)
  episodes = []
  for kind, ex in zip(("zoom", "self_correction", "text_only", "zoom"), examples):
    turns = warmstart.image_turns([hires.target_box(ex, CONFIG)], ex.answers[0], 256, 256, kind,
                                  rng)
    episodes.append(warmstart.replay(_hires_task(ex), turns))
  texts = [s.text for e in episodes for s in e.segments if s.kind == "model"]
  vocab = vocab_lib.load_vocabulary(vocab_lib.train_vocabulary(
      texts * 20 + ["Question: What color is the tiny shape?"], str(tmp_path / "v.model")))
  for text in texts:  # op syntax (parentheses, location tokens, digits) survives the round trip
    assert vocab.decode(vocab.encode(text)) == text
  loc_ids = set(vocab_lib.loc_token_ids(vocab))
  zoom_ids = vocab.encode(ops.format_zoom((1, 2, 30, 40), 256, 256))
  assert sum(i in loc_ids for i in zoom_ids) == 4  # one piece per location token
  model = sizes.get_size("tiny")
  rows = warmstart.synthesize_rows(episodes, vocab.encode, model, 256, 4)
  written = [sum(len(vocab.encode(s.text)) + 1 for s in e.segments if s.kind == "model")
             for e in episodes]
  np.testing.assert_array_equal(rows["loss_mask"].sum(axis=1), written)
  np.testing.assert_array_equal((rows["image_slot"] >= 0).sum(axis=1) // model.num_image_tokens,
                                [e.num_images for e in episodes])
  with pytest.raises(ValueError, match="rows hold 40"):
    warmstart.synthesize_rows(episodes, vocab.encode, model, 40, 4)
