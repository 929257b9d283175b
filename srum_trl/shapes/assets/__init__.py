"""Weights shipped with the package: the ShapesWorld base models (Janus architecture; BAGEL architecture, a flow
model) and LoRA adapters trained from them."""

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
    """Folder of the LoRA adapter of a best `SRUMTrainer` recipe by training-split accuracy: the judge's global
    score centred per prompt plus each region's score against the same object in the prompt's other images
    (`local_credit="object"`; the evidence table's `srum_object@3e-4` arm at 300 steps, seed 0; over 6 seeds it ties
    with the global score alone on training-split prompts). Its measured accuracies, and the base model's, are in
    `docs/results/shapes_evidence_b128_300steps_object.json` (summarised in docs/shapes.md)."""
    return _path("srum-lora")


def grpo_lora_path() -> str:
    """Folder of the LoRA adapter trained by self-judged GRPO (the evidence table's `grpo` arm, seed 0). Its measured
    accuracies are in `docs/results/shapes_evidence_b128_grpo.json` (summarised in docs/shapes.md)."""
    return _path("grpo-lora")


def flow_base_model_path() -> str:
    """Folder of the pretrained ShapesWorld flow base model: a tiny BAGEL in BAGEL's published file layout
    (`llm_config.json`, `vit_config.json`, `ema.safetensors`, `ae.safetensors`, ...), loaded by `load_backend`."""
    return _path("flow-base")


def flow_srum_lora_path() -> str:
    """Folder of the LoRA adapter (generation expert) of the best `SRUMTrainer` recipe on the flow base, chosen by
    training-split accuracy (see docs/shapes.md)."""
    return _path("flow-srum-lora")
