"""Tests for vpd_jax.rl.rewards: RaPR, both curiosity variants, hand-computed values."""

import numpy as np
import pytest

from vpd_jax.rl import rewards as R

# Two groups of G = 4: the first uses operations in 1 of 4 rollouts (RaPR 0.25 < H = 0.3), the
# second in 3 of 4 (RaPR 0.75), two of them over the budget N = 1.
CORRECT = [1, 0, 1, 1, 1, 1, 0, 0]
NUM_OPS = [0, 0, 0, 1, 2, 3, 0, 1]


def test_group_rapr():
  np.testing.assert_allclose(R.group_rapr(NUM_OPS, 4), [0.25] * 4 + [0.75] * 4)
  with pytest.raises(ValueError, match="group_size=3"):
    R.group_rapr(NUM_OPS, 3)


def test_paper_variant_by_hand():
  out = R.compute_rewards(CORRECT, NUM_OPS, 4)
  # Curiosity 0.5 * (0.3 - 0.25) = 0.025 for the one rollout that zooms in group 1; none in group 2
  # (RaPR above H). Penalty 0.05 * min(1 - n_ops, 0): -0.05 for 2 operations, -0.1 for 3.
  np.testing.assert_allclose(out["curiosity"], [0, 0, 0, 0.025, 0, 0, 0, 0])
  np.testing.assert_allclose(out["penalty"], [0, 0, 0, 0, -0.05, -0.1, 0, 0])
  np.testing.assert_allclose(out["reward"], [1, 0, 1, 1.025, 0.95, 0.9, 0, 0])
  np.testing.assert_allclose(out["correctness"], CORRECT)


def test_alpha_zero_beta_zero_is_plain_correctness():
  config = R.RewardConfig(alpha=0.0, beta=0.0)
  np.testing.assert_allclose(R.compute_rewards(CORRECT, NUM_OPS, 4, config)["reward"], CORRECT)


def test_released_variant_by_hand():
  config = R.RewardConfig(variant="released", alpha_video=1.0)
  is_video = [True] * 4 + [False] * 4
  unfixed = [False, False, False, False, False, True, False, False]
  out = R.compute_rewards(CORRECT, NUM_OPS, 4, config, is_video=is_video, unfixed_error=unfixed)
  # Curiosity divided by RaPR: 1.0 (video weight) * 0.05 / 0.25 = 0.2. Rollout 5 answered right,
  # but its last operation failed and was never fixed: correctness 0.
  np.testing.assert_allclose(out["curiosity"], [0, 0, 0, 0.2, 0, 0, 0, 0])
  np.testing.assert_allclose(out["correctness"], [1, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_allclose(out["reward"], [1, 0, 1, 1.2, 0.95, -0.1, 0, 0])


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="variant"):
    R.RewardConfig(variant="other")
  with pytest.raises(ValueError, match="target_rapr"):
    R.RewardConfig(target_rapr=1.5)
  with pytest.raises(ValueError, match="one entry per rollout"):
    R.compute_rewards([1, 0], [0, 0, 1, 1], 2)
