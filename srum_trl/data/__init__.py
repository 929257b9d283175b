"""Stored data: the resumable rollout store."""

from .rollouts import ROLLOUT_COLUMNS, build_rollouts, is_rollout_dataset, load_rollouts, reward_map_from_row

__all__ = ["ROLLOUT_COLUMNS", "build_rollouts", "is_rollout_dataset", "load_rollouts", "reward_map_from_row"]
