"""Trainers: config + trainer pairs on TRL's `_BaseConfig` / `_BaseTrainer`."""

from .srum_config import SRUMConfig
from .srum_trainer import SRUMTrainer

__all__ = ["SRUMConfig", "SRUMTrainer"]
