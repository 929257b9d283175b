"""Weights shipped with the package: the ShapesWorld base model and the SRUM LoRA adapter trained from it."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _path(name: str) -> str:
    path = os.path.join(HERE, name)
    if not os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "adapter_config.json")
    ):
        raise FileNotFoundError(f"{path} is not in this installation of srum_trl.")
    return path


def base_model_path() -> str:
    """Folder of the pretrained ShapesWorld base model (a Janus-architecture checkpoint)."""
    return _path("base")


def srum_lora_path() -> str:
    """Folder of the SRUM LoRA adapter trained on the base model (the best recipe of the evidence table)."""
    return _path("srum-lora")
