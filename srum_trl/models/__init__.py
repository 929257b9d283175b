"""Model backends: one small interface ([`UMMBackend`]), one module or folder per model family."""

from __future__ import annotations

import json
import os
import re

import torch

from .base import GenerationConfig, Rollout, UMMBackend, register_backend, registered_backends
from .janus import JanusBackend, load_janus


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file} is not valid JSON ({error.msg} at line {error.lineno}): it is cut "
                                 "short or damaged; download or save the checkpoint again.") from None
    return {}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_checkpoint_path(path: str, what: str = "model") -> None:
    """Name the problem early: a path that is neither an existing folder nor shaped like a Hub id ("no such
    folder", rather than the Hub's repo-id error), and a local `.safetensors` file that is cut short or damaged."""
    if not os.path.exists(path):
        if not _HUB_ID.match(path) or path.startswith((".", "~")):
            raise ValueError(f"{what} {path!r}: no such folder. Give the folder of a checkpoint, or a Hub id such as "
                             "'deepseek-ai/Janus-Pro-1B'.")
        return  # a Hub id: from_pretrained resolves it (or says why it cannot)
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a file; give the checkpoint's folder.")
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as error:  # noqa: BLE001 - safetensors' own error type, reported with the file
                raise ValueError(f"{file} is not a readable safetensors file ({error}): it is cut short or damaged; "
                                 "download or save it again.") from None


register_backend("janus", lambda cfg: cfg.get("model_type") == "janus", load_janus)


def load_backend(model, adapter: str | None = None, processor=None, backend_kwargs: dict | None = None,
                 **model_init_kwargs) -> UMMBackend:
    """Resolve `model` (a path / Hub id, a `PreTrainedModel`, or an existing backend) into a [`UMMBackend`].

    Raises:
        ValueError: when the model type is not one of the registered families (the message lists them).
    """
    from .base import _REGISTRY

    if isinstance(model, UMMBackend):
        return model
    if isinstance(model, torch.nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type == "janus":
            if processor is None:
                raise ValueError("A Janus model object needs its `processing_class` (a JanusProcessor).")
            return JanusBackend(model, processor, **(backend_kwargs or {}))
        raise ValueError(
            f"Unknown model type {model_type!r} for {type(model).__name__}; supported: {registered_backends()}."
        )
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"`model` must be a path, a model or a UMMBackend, got {type(model).__name__}.")
    path = str(model)
    check_checkpoint_path(path, "model")
    if adapter is not None:
        check_checkpoint_path(str(adapter), "adapter")
    if _is_bagel_folder(path):  # official BAGEL layout: llm_config.json + vit_config.json, no usable config.json
        return load_bagel(path, adapter=adapter, backend_kwargs=backend_kwargs, **model_init_kwargs)
    config = _read_config(path)
    if os.path.isdir(path) and not config:
        raise ValueError(f"{path!r} has no config.json: it is not a model folder that srum_trl can load.")
    for name, (detect, load) in _REGISTRY.items():
        if not config or detect(config):
            if os.path.exists(path):
                return load(path, adapter=adapter, backend_kwargs=backend_kwargs, **model_init_kwargs)
            try:  # shaped like a Hub id
                return load(path, adapter=adapter, backend_kwargs=backend_kwargs, **model_init_kwargs)
            except OSError as error:
                first = (str(error).strip().splitlines() or [""])[0]
                raise ValueError(f"model {path!r}: no such folder, and no Hub model of that id could be loaded "
                                 f"({first}).") from error
    raise ValueError(
        f"Unknown model type {config.get('model_type')!r} in {path!r}; supported families: {registered_backends()}."
    )


__all__ = [
    "BagelBackend",
    "GenerationConfig",
    "JanusBackend",
    "Rollout",
    "UMMBackend",
    "load_backend",
    "load_janus",
    "register_backend",
    "registered_backends",
]

# --- BAGEL (native implementation; official folders are detected by their files in load_backend, folders written
# by BagelBackend.save_pretrained also carry config.json with model_type "bagel")
from .bagel import BagelBackend, is_bagel_folder as _is_bagel_folder, load_bagel  # noqa: E402

register_backend("bagel", lambda cfg: cfg.get("model_type") == "bagel", load_bagel)
