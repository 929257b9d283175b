"""BAGEL (ByteDance-Seed/BAGEL-7B-MoT) implemented natively: Qwen2 mixture-of-transformers + SigLIP NaViT + FLUX VAE.

    from srum_trl.models.bagel import load_bagel, lora_targets
    backend = load_bagel("path/to/BAGEL-7B-MoT", dtype="bfloat16", device="cuda")

The model modules (`config`, `modeling`, `vae`, `processing`, `training`) depend only on torch, transformers,
diffusers, safetensors and Pillow.
"""

from .backend import BagelBackend, guide_velocity, sampling_timesteps, shift_timesteps
from .config import (
    BagelConfig,
    BagelLLMConfig,
    BagelVAEConfig,
    BagelViTConfig,
    bagel_7b_mot_config,
    is_bagel_folder,
)
from .loading import load_bagel, load_bagel_model, random_bagel_backend
from .modeling import BagelModel, build_bagel_model
from .tiny import build_tiny_tokenizer, tiny_bagel_backend, tiny_bagel_config
from .training import LORA_TARGET_SETS, lora_targets, set_trainable

__all__ = [
    "LORA_TARGET_SETS",
    "BagelBackend",
    "BagelConfig",
    "BagelLLMConfig",
    "BagelModel",
    "BagelVAEConfig",
    "BagelViTConfig",
    "bagel_7b_mot_config",
    "build_bagel_model",
    "build_tiny_tokenizer",
    "guide_velocity",
    "is_bagel_folder",
    "load_bagel",
    "load_bagel_model",
    "lora_targets",
    "random_bagel_backend",
    "sampling_timesteps",
    "set_trainable",
    "shift_timesteps",
    "tiny_bagel_backend",
    "tiny_bagel_config",
]
