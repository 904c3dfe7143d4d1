"""Rewards of Pixel Reasoner's RL: correctness plus curiosity, in two named variants.

Rollouts come in groups of G per question. RaPR (rate of pixel-space reasoning) is the share of a
group's rollouts that use at least one operation. With r the correctness (1 right, 0 wrong) and
n_ops the operations a rollout called:

  "paper" (the default; Su, Wang et al. 2025, eq. 4):
      r' = r + alpha * max(H - RaPR, 0) * 1[n_ops > 0] + beta * min(N - n_ops, 0)

  "released" (the authors' released training code scales it differently):
      r' = r * (1 - 1[unfixed_error]) + a * max(H - RaPR, 0) / RaPR * 1[n_ops > 0]
           + beta * min(N - n_ops, 0)
      where a = alpha_video for video questions and alpha otherwise, and unfixed_error means the
      rollout's last operation failed and no later one worked: its correctness counts as zero.
      (RaPR > 0 whenever the rollout itself uses an operation, so the division is defined.)

The defaults H = 0.3, N = 1, alpha = 0.5, beta = 0.05 are the paper's. With alpha = 0 and beta = 0
both variants reduce to plain correctness (the "released" one still zeroes unfixed errors).
"""

from __future__ import annotations

import dataclasses

import numpy as np

VARIANTS = ("paper", "released")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  variant: str = "paper"
  target_rapr: float = 0.3  # H
  op_budget: int = 1  # N
  alpha: float = 0.5
  beta: float = 0.05
  alpha_video: float = 0.5  # "released" only

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"RewardConfig.variant {self.variant!r} is unknown; expected one of "
                       f"{VARIANTS}")
    if not 0.0 <= self.target_rapr <= 1.0:
      raise ValueError(f"RewardConfig.target_rapr (H) must be in [0, 1], got {self.target_rapr}")
    if self.op_budget < 0:
      raise ValueError(f"RewardConfig.op_budget (N) must be >= 0, got {self.op_budget}")


def group_rapr(num_ops: np.ndarray, group_size: int) -> np.ndarray:
  """RaPR of each rollout's group, repeated per rollout: [B] for B = groups * group_size rollouts
  laid out group by group."""
  num_ops = np.asarray(num_ops)
  if num_ops.ndim != 1 or num_ops.shape[0] % group_size:
    raise ValueError(f"num_ops must be [groups * group_size] with group_size={group_size}, got "
                     f"shape {num_ops.shape}")
  uses = (num_ops > 0).astype(np.float64).reshape(-1, group_size)
  return np.repeat(uses.mean(axis=1), group_size)


def compute_rewards(correct, num_ops, group_size: int, config: RewardConfig = RewardConfig(),
                    is_video=None, unfixed_error=None) -> dict:
  """Rewards and their parts, each float64 [B]: "reward", "correctness", "curiosity", "penalty",
  "rapr". Rollouts are laid out group by group (rows g * G .. g * G + G - 1 share a question)."""
  correct = np.asarray(correct, np.float64)
  num_ops = np.asarray(num_ops, np.int64)
  if correct.shape != num_ops.shape:
    raise ValueError(f"correct {correct.shape} and num_ops {num_ops.shape} must have one entry per "
                     "rollout")
  count = correct.shape[0]
  is_video = np.zeros(count, bool) if is_video is None else np.asarray(is_video, bool)
  unfixed_error = (np.zeros(count, bool) if unfixed_error is None
                   else np.asarray(unfixed_error, bool))
  rapr = group_rapr(num_ops, group_size)
  uses = (num_ops > 0).astype(np.float64)
  shortfall = np.maximum(config.target_rapr - rapr, 0.0)
  penalty = config.beta * np.minimum(config.op_budget - num_ops, 0).astype(np.float64)
  if config.variant == "paper":
    correctness = correct
    curiosity = config.alpha * shortfall * uses
  else:
    correctness = correct * (~unfixed_error)
    weight = np.where(is_video, config.alpha_video, config.alpha)
    curiosity = weight * uses * shortfall / np.where(uses > 0, rapr, 1.0)
  return {"reward": correctness + curiosity + penalty, "correctness": correctness,
          "curiosity": curiosity, "penalty": penalty, "rapr": rapr}
