"""Manifests: small JSON files that record what made a folder of outputs (a rollout store, generated images), so that
a resumed or repeated run refuses to mix its outputs with those of other settings.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch


def read_manifest(path: str) -> dict:
    """The JSON object in `path`; a ValueError naming the file when it is cut short, edited or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): it was "
                         "cut short or edited. Restore it, or write to a new folder.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: it is not a manifest written by srum_trl.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object srum_trl writes there.")
    return data


def write_manifest(path: str, data: dict) -> None:
    """Write `data` as JSON to `path` atomically (a temporary file renamed into place)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _plain(value):
    """`value` as JSON would read it back (tuples become lists), so that stored and fresh settings compare equal."""
    return json.loads(json.dumps(value))


def settings_diff(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Lines `key: X in the folder, Y now` for every (nested) setting that differs."""
    lines = []
    stored, current = _plain(stored), _plain(current)
    for key in sorted(set(stored) | set(current), key=str):
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += settings_diff(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} in the folder, {new!r} now")
    return lines


def prompts_fingerprint(prompts: list[str]) -> str:
    """A short hash of a prompt list (order matters)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """A short hash of a model's parameters: names, shapes, dtypes and `samples` evenly spaced values of each.

    It tells checkpoints and adapters apart (a LoRA adapter's weights are parameters too) without reading every
    weight of a large model; a moved or copied checkpoint keeps its fingerprint."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            values = flat[::step][:samples].float().cpu().numpy()
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            digest.update(values.tobytes())
    return digest.hexdigest()[:16]


#: Backend attributes that change what a sampler draws (BAGEL's time grid and CFG; Janus's decode path).
_SAMPLER_ATTRIBUTES = ("num_timesteps", "timestep_shift", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
                       "decode_path")


def model_signature(backend) -> dict:
    """What identifies the model that made some outputs: its family, its weights (base and adapters), dtype, image
    size, token grid and sampler settings. `model` (the checkpoint's path or id) is recorded for people; the
    weights' fingerprint is what is compared."""
    model = backend.model
    config = getattr(model, "config", None)
    dtype = next(model.parameters()).dtype
    return {
        "family": type(backend).__name__,
        "weights": weights_fingerprint(model),
        "dtype": str(dtype).replace("torch.", ""),
        "image_size": int(backend.image_size),
        "token_grid": list(backend.token_grid),
        "sampler": {name: getattr(backend, name) for name in _SAMPLER_ATTRIBUTES if hasattr(backend, name)},
        "model": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
    }


def comparable(signature: dict) -> dict:
    """A signature without the fields kept for people only (paths)."""
    return {k: v for k, v in signature.items() if k not in ("model", "source")}
