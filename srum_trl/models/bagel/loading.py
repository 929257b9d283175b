"""Load an official BAGEL folder (`llm_config.json`, `vit_config.json`, `ema.safetensors`, `ae.safetensors`,
tokenizer files) into a [`BagelBackend`], strictly: every tensor of `ema.safetensors` must match a parameter of
[`BagelModel`] by name and shape, and every parameter must be in the file.

The model is built on the meta device and the weights are assigned from the file, so nothing is allocated twice;
with `device="cuda:N"` the file is read straight onto that GPU.
"""

from __future__ import annotations

import os

import torch

from .backend import BagelBackend
from .config import VAE_WEIGHTS_FILE, WEIGHTS_FILE, BagelConfig, is_bagel_folder
from .modeling import BagelModel, PositionEmbedding
from .processing import load_tokenizer
from .vae import build_vae, load_vae

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: keyword arguments of `load_bagel` / `model_init_kwargs` that configure the backend rather than the weights
BACKEND_KEYS = (
    "image_size", "num_timesteps", "timestep_shift", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
    "vit_max_size", "vit_min_size", "vit_max_pixels", "understanding_batch_size", "think", "generation_format",
    "question_format", "vae_dtype", "guidance_scale",
)
#: a folder's own backend settings (sampler and judge image transform it was measured with; any of `BACKEND_KEYS`
#: but `vae_dtype`); the official folder has none, and explicit arguments override it
GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(path: str) -> dict:
    """The backend settings stored in a BAGEL folder's `generation_config.json` ({} when it has none)."""
    import json

    file = os.path.join(path, GENERATION_CONFIG_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        stored = json.load(f)
    allowed = set(BACKEND_KEYS) - {"vae_dtype"}
    unknown = sorted(set(stored) - allowed)
    if unknown:
        raise ValueError(f"{file}: unknown settings {unknown}; it may hold {sorted(allowed)}.")
    return stored
#: BAGEL settings that the official loader sets in code rather than in the folder's files (defaults: 64, 70, 2)
CONFIG_KEYS = ("max_latent_size", "vit_max_num_patch_per_side", "latent_patch_size", "timestep_shift")


def _dtype(value):
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return None if value == "auto" else value
    if value not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {value!r}.")
    return _DTYPES[value]


def write_generation_config(path: str, backend: BagelBackend) -> dict:
    """Write a backend's settings (sampler, `guidance_scale`, judge image transform) as the folder's
    `generation_config.json`, which `load_bagel` reads back; returns them."""
    import json

    settings = {key: getattr(backend, key) for key in BACKEND_KEYS if key != "vae_dtype"}
    settings["image_size"] = backend.image_size
    settings["cfg_interval"] = list(settings["cfg_interval"])
    with open(os.path.join(path, GENERATION_CONFIG_FILE), "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")
    return settings


def load_bagel_model(path: str, dtype=None, device=None, weights_file: str = WEIGHTS_FILE,
                     **config_overrides) -> BagelModel:
    """The [`BagelModel`] of a folder, loaded strictly from `weights_file` (official: `ema.safetensors`).

    `latent_pos_embed.pos_embed` / `vit_pos_embed.pos_embed` are fixed sin-cos tables; when the file lacks them (the
    official trainer drops them on resume) or holds them for another size, they are recomputed (reported in
    `model.load_report`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = BagelConfig.from_folder(path, **config_overrides)
    file = os.path.join(path, weights_file)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no {weights_file}; a BAGEL folder holds the weights in {WEIGHTS_FILE}.")
    with safe_open(file, framework="pt") as f:
        names = list(f.keys())
    with torch.device("meta"):
        model = BagelModel(config)
    expected = dict(model.state_dict())
    report = {"missing": [], "unexpected": [], "shape_mismatch": [], "recomputed": []}
    for name in names:
        if name not in expected:
            report["unexpected"].append(name)
    state = load_file(file, device=str(device) if device is not None else "cpu")
    for name in list(state):
        if name in expected and tuple(state[name].shape) != tuple(expected[name].shape):
            if name.endswith("pos_embed.pos_embed"):
                report["recomputed"].append(name)
                del state[name]
            else:
                report["shape_mismatch"].append((name, tuple(state[name].shape), tuple(expected[name].shape)))
    for name in expected:
        if name not in state and name not in report["recomputed"]:
            if name.endswith("pos_embed.pos_embed"):
                report["recomputed"].append(name)
            else:
                report["missing"].append(name)
    if report["missing"] or report["unexpected"] or report["shape_mismatch"]:
        raise ValueError(
            f"{file} does not match the BAGEL architecture of {path!r} (llm_config.json / vit_config.json): "
            f"{len(report['missing'])} missing, e.g. {report['missing'][:5]}; {len(report['unexpected'])} unexpected, "
            f"e.g. {report['unexpected'][:5]}; shape mismatches {report['shape_mismatch'][:5]}."
        )
    ref = next(iter(state.values()))
    target_device = ref.device
    for name in report["recomputed"]:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        table = torch.nn.Parameter(torch.empty(module.max_per_side**2, module.hidden, device=target_device,
                                               dtype=ref.dtype), requires_grad=False)
        module.pos_embed = table
        module.reset()
        state[name] = module.pos_embed.data
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # assign=True copies requires_grad from the file's tensors (True): refreeze
        if isinstance(module, PositionEmbedding):
            module.pos_embed.requires_grad_(False)
    dtype = _dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    model.load_report = report
    model._vae_file = os.path.join(path, VAE_WEIGHTS_FILE)
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)  # what PEFT records as an adapter's base model
    return model.eval()


def load_bagel(path: str, adapter: str | None = None, backend_kwargs: dict | None = None, dtype=None,
               device=None, attn_implementation: str | None = None, **kwargs) -> BagelBackend:
    """Load a BAGEL folder into a [`BagelBackend`] (`load_backend` calls this for BAGEL folders).

    Args:
        path: the folder (official layout, or one written by `BagelBackend.save_pretrained`).
        adapter: a PEFT adapter folder to load on top.
        backend_kwargs: settings of [`BagelBackend`] (image_size, num_timesteps, ...); they may also be given as
            keyword arguments (so that they fit in `SRUMConfig.model_init_kwargs`).
        dtype: "bfloat16" (the checkpoint's own), "float32", "float16", a torch dtype, or None / "auto" (as stored).
        device: where to load the weights ("cuda:0", ...); default CPU.
        max_latent_size, vit_max_num_patch_per_side, latent_patch_size, timestep_shift: BAGEL settings that the
            official loader sets in code (64, 70, 2, 1.0); folders written by `save_pretrained` store them.

    A folder's `generation_config.json` (not part of the official layout) gives the backend settings it was
    measured with (sampler, `guidance_scale`, judge image transform); arguments override them.
        attn_implementation: only "sdpa" (PyTorch SDPA with an explicit mask) is implemented; "eager" is accepted
            as the same; anything else raises.
    """
    if not is_bagel_folder(path):
        raise ValueError(f"{path!r} is not a BAGEL folder: it needs llm_config.json and vit_config.json.")
    if attn_implementation not in (None, "sdpa", "eager"):
        raise ValueError(f"BAGEL runs on PyTorch SDPA; attn_implementation={attn_implementation!r} is not supported.")
    settings = {**read_generation_config(path), **(backend_kwargs or {})}
    overrides = {}
    for key in list(kwargs):
        if key in BACKEND_KEYS:
            settings[key] = kwargs.pop(key)
        elif key in CONFIG_KEYS:
            overrides[key] = kwargs.pop(key)
    if kwargs:
        raise ValueError(f"Unknown BAGEL loading arguments {sorted(kwargs)}; backend settings: {BACKEND_KEYS}; "
                         f"model settings: {CONFIG_KEYS}.")
    if isinstance(settings.get("vae_dtype"), str):
        settings["vae_dtype"] = _dtype(settings["vae_dtype"])
    model = load_bagel_model(path, dtype=dtype, device=device, **overrides)
    config = model.config
    vae_file = os.path.join(path, VAE_WEIGHTS_FILE)
    if os.path.isfile(vae_file):
        vae = load_vae(vae_file, config.vae_config, device=device)
    else:
        raise ValueError(f"{path!r} has no {VAE_WEIGHTS_FILE} (the FLUX VAE).")
    tokenizer = load_tokenizer(path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return BagelBackend(model, tokenizer, vae, **settings)


def random_bagel_backend(config: BagelConfig, tokenizer, device=None, dtype=None, seed: int = 0,
                         **backend_kwargs) -> BagelBackend:
    """A randomly initialised BAGEL backend (tests, benchmarks)."""
    torch.manual_seed(seed)
    model = BagelModel(config)
    # a random velocity head (the official init is zero, which makes every sample the mean latent)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    vae = build_vae(config.vae_config).eval().requires_grad_(False)
    if device is not None:
        vae.to(device)
    return BagelBackend(model, tokenizer, vae, **backend_kwargs)
