"""Manifests: small JSON files that record what made a folder of outputs (a rollout store, generated images), so that
a resumed or repeated run refuses to mix its outputs with those of other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

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


# ------------------------------------------------------------------------------------------ folders of images
#: The manifest `srum-trl generate` writes beside its `{line:05d}.png` images.
IMAGES_MANIFEST = "images.json"
_IMAGE_RE = re.compile(r"^\d{5}\.png$")


def numbered_images(folder: str) -> list[str]:
    """The `{line:05d}.png` files in `folder`."""
    return sorted(n for n in os.listdir(folder) if _IMAGE_RE.match(n)) if os.path.isdir(folder) else []


def check_image_folder(folder: str, manifest: dict, overwrite: bool = False, flag: str = "--overwrite",
                       write: bool = True) -> None:
    """Make sure `folder` holds only images made with `manifest`'s settings (so a repeated or resumed run adds to
    them), then (with `write`) record `manifest` there.

    Compared: every key of `manifest` except `source` (paths, kept for people), against the same keys of the stored
    manifest, so a first check before the model is loaded (`write=False`) can leave the model out. Images of other
    settings, or images without a manifest, are refused, naming `flag`; with `overwrite` they are deleted first.
    """
    path = os.path.join(folder, IMAGES_MANIFEST)
    images = numbered_images(folder)
    problem = None
    if os.path.exists(path):
        stored = read_manifest(path)
        current = {k: v for k, v in manifest.items() if k != "source"}
        diff = settings_diff({k: stored.get(k, "<absent>") for k in current}, current)
        if diff:
            problem = f"{folder} holds images made with other settings:\n  " + "\n  ".join(diff)
    elif images:
        problem = (f"{folder} holds {len(images)} numbered images but no {IMAGES_MANIFEST}: what made them is "
                   "unknown")
    if problem and not overwrite:
        raise ValueError(f"{problem}\nWrite to a new folder, or pass {flag} to delete those images and make new ones.")
    if problem:
        for name in images:
            os.remove(os.path.join(folder, name))
        if os.path.exists(path):
            os.remove(path)
    if write and not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        write_manifest(path, manifest)


def check_images_match_prompts(folder: str, prompts: list[str], flag: str = "--unchecked") -> None:
    """Raise unless `folder`'s manifest says its images were made from exactly `prompts` (in order)."""
    path = os.path.join(folder, IMAGES_MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"{folder} has no {IMAGES_MANIFEST}, so nothing says its images were made from these prompts. "
                         f"Make them with `srum-trl generate`, or pass {flag} to score them anyway.")
    stored = read_manifest(path)
    if stored.get("prompts_sha256") != prompts_fingerprint(prompts) or stored.get("num_prompts") != len(prompts):
        made_from = (stored.get("source") or {}).get("prompts", "a file")
        raise ValueError(f"The images in {folder} were made from another prompt list ({stored.get('num_prompts')} "
                         f"prompts, {made_from!r}) than the {len(prompts)} given here: "
                         f"scoring them would pair images with the wrong prompts. Pass the prompt file they were made "
                         f"from, or make them again with `srum-trl generate --overwrite`.")
