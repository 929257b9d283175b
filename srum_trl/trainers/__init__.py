"""Trainers: config + trainer pairs on TRL's `_BaseConfig` / `_BaseTrainer`."""

from .srum_config import SRUMConfig
from .srum_trainer import SRUMTrainer
from .grpo_config import GRPOUMMConfig
from .grpo_trainer import GRPOUMMTrainer

__all__ = ["SRUMConfig", "SRUMTrainer"]
__all__ += ["GRPOUMMConfig", "GRPOUMMTrainer"]
