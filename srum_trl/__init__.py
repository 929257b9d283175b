"""srum_trl: self-rewarding post-training of unified multimodal models, the TRL way.

    from srum_trl import SRUMTrainer, SRUMConfig, UMMJudgeRewardFunction
"""

__version__ = "0.1.0"

from .data import build_rollouts, load_rollouts
from .models import GenerationConfig, JanusBackend, Rollout, UMMBackend, load_backend
from .rewards import GridProposer, Region, RewardMap, SAMProposer, UMMJudgeRewardFunction, render_reward_map
from .trainers import SRUMConfig, SRUMTrainer
from .trainers import GRPOUMMConfig, GRPOUMMTrainer

__all__ = [
    "GenerationConfig",
    "GridProposer",
    "JanusBackend",
    "Region",
    "RewardMap",
    "Rollout",
    "SAMProposer",
    "SRUMConfig",
    "SRUMTrainer",
    "UMMBackend",
    "UMMJudgeRewardFunction",
    "build_rollouts",
    "load_backend",
    "load_rollouts",
    "render_reward_map",
]
__all__ += ["GRPOUMMConfig", "GRPOUMMTrainer"]
