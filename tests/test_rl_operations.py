"""Tests for vpd_jax.rl.operations: parsing calls and running them on the original pixels."""

import numpy as np
import pytest

from vpd_jax.rl import operations as ops


def _image(h=200, w=300):
  # Pixel value encodes its coordinates, so a crop can be checked against the exact slice.
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)


def test_find_call_and_answer():
  call = ops.find_call("I zoom in to look closer. zoom_in(0.1, 0.2, 0.5, 0.6)")
  assert call == ops.Call("zoom_in", "0.1, 0.2, 0.5, 0.6")
  assert ops.find_call("select_frames(1, 3) more") == ops.Call("select_frames", "1, 3")
  assert ops.find_call("So the answer is red.") is None
  assert ops.find_call("zoom_in(0.1, 0.2").closed is False
  assert ops.find_answer("I looked. So the answer is light blue.") == "light blue"
  assert ops.find_answer("no conclusion here") is None


def test_zoom_in_crops_the_padded_box_of_the_original_pixels():
  image = _image()
  result = ops.zoom_in(image, "0.2, 0.25, 0.6, 0.75")
  # Box in pixels: x 60..180, y 50..150; 10% padding: x 48..192, y 40..160.
  assert result.ok and result.box == (48, 40, 192, 160)
  np.testing.assert_array_equal(result.images[0], image[40:160, 48:192])


def test_zoom_in_with_location_tokens_matches_format_zoom():
  image = _image(448, 448)
  text = ops.format_zoom((112, 224, 224, 336), 448, 448)
  assert text == "zoom_in(<loc0512><loc0256><loc0768><loc0512>)"
  result = ops.execute(ops.find_call(text), image, is_video=False)
  # x 0.25..0.5 -> 112..224, y 0.5..0.75 -> 224..336, padded by 10% (11.2 px) and rounded outwards.
  assert result.box == (100, 212, 236, 348)


@pytest.mark.parametrize("arguments, words", [
    ("0.1, 0.2, 0.5", "four numbers"),
    ("a, b, c, d", "four numbers"),
    ("<loc0001><loc0002><loc0003>", "exactly four location tokens"),
    ("-0.1, 0.2, 0.5, 0.6", "outside the image"),
    ("0.1, 0.2, 1.5, 0.6", "outside the image"),
    ("0.5, 0.2, 0.1, 0.6", "empty"),
    ("0.5, 0.5, 0.52, 0.52", "too small"),
])
def test_zoom_in_errors_are_messages_not_exceptions(arguments, words):
  result = ops.zoom_in(_image(), arguments)
  assert not result.ok and not result.images
  assert result.error.startswith(ops.ERROR_PREFIX) and words in result.error


def test_select_frames_returns_the_frames_in_order_and_checks_them():
  frames = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
  result = ops.select_frames(frames, " 4, 1 ")
  assert result.ok and result.frames == (4, 1)
  np.testing.assert_array_equal(np.stack(result.images), frames[[4, 1]])
  for arguments, words in (("", "empty list"), ("[]", "empty list"), ("1, x", "integer"),
                           ("2, 6", "out of range"), ("-1", "out of range"), ("1, 1", "repeat"),
                           ("0, 1, 2", "at most 2")):
    result = ops.select_frames(frames, arguments, max_frames=2)
    assert not result.ok and words in result.error, (arguments, result.error)


def test_execute_refuses_the_wrong_operation_for_the_medium_and_unclosed_calls():
  image, frames = _image(), np.zeros((4, 8, 8, 3), np.uint8)
  assert "use select_frames" in ops.execute(ops.Call("zoom_in", "0,0,1,1"), frames, True).error
  assert "use zoom_in" in ops.execute(ops.Call("select_frames", "0"), image, False).error
  assert "not closed" in ops.execute(ops.find_call("zoom_in(0, 0, 1, 1"), image, False).error
