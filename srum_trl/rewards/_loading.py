"""What the reward functions on other models share: reading the images they are given, checking the prompts, loading
the checkpoint a user names (and refusing one of the wrong kind by name), placing it on a device, and importing an
optional library with a message that names the extra to install."""

from __future__ import annotations

import importlib
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def as_rgb_images(completions, name: str = "completions") -> list[Image.Image]:
    """`completions` as RGB PIL images. Accepted per entry: a PIL image, a uint8 array `[H, W, 3]` (or `[H, W]`), a
    float array in [0, 1], a tensor `[3, H, W]` / `[H, W, 3]` (uint8, or float in [0, 1]), or an image file path.
    Anything else raises a `ValueError` naming `name[i]`."""
    if isinstance(completions, (Image.Image, np.ndarray, torch.Tensor, str)):
        raise ValueError(f"{name} must be a list of images (one per prompt), got a single {type(completions).__name__}.")
    return [_as_rgb(item, f"{name}[{i}]") for i, item in enumerate(completions)]


def _as_rgb(item, where: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{where} is a path that does not open as an image ({item!r}): {err}") from None
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        if item.dim() == 3 and item.shape[0] in (1, 3) and item.shape[-1] not in (1, 3):
            item = item.permute(1, 2, 0)
        item = item.float().numpy() if item.is_floating_point() else item.numpy()
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)) or array.size == 0:
            raise ValueError(f"{where} is an array of shape {item.shape}; an image is [H, W, 3] or [H, W].")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
                raise ValueError(f"{where} is a float array outside [0, 1]; pass uint8 pixels or floats in [0, 1].")
            array = np.round(array * 255.0).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise ValueError(f"{where} is a {array.dtype} array; pass uint8 pixels or floats in [0, 1].")
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise ValueError(f"{where} is a {type(item).__name__}, not an image: pass PIL images, arrays, tensors or paths.")


def check_prompts(prompts, count: int, name: str = "prompts") -> list[str]:
    """`prompts` as a list of `count` strings, or a `ValueError` naming the first bad entry."""
    if isinstance(prompts, str):
        raise ValueError(f"{name} must be a list of strings (one per image), got a single string.")
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {len(prompts)} {name} for {count} images; pass one prompt per image.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{name}[{i}] is a {type(prompt).__name__}, not a string ({prompt!r}).")
    return prompts


def require(module: str, extra: str, what: str):
    """Import `module`, or raise an `ImportError` saying which extra of srum-trl installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs the `{module}` package: pip install 'srum-trl[{extra}]' ({err}).") from None


def default_device(device=None) -> torch.device:
    """`device`, or CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or one of float32, bfloat16, float16, auto; got {dtype!r}.")
    return value


def load_checkpoint(model, processor, auto_class, model_types, what: str, example: str, device=None, dtype=None,
                    arg: str = "model"):
    """Load `model` (a folder / Hub id, or a model object) and its processor for the reward `what`.

    Args:
        model: a path or Hub id, or an already built `PreTrainedModel` (then `processor` is required).
        processor: a processor object, a path / Hub id to load it from, or None (the model's own folder).
        auto_class: the transformers auto class that builds the model (e.g. `AutoModelForImageTextToText`).
        model_types: the `config.model_type` values this reward accepts (a checkpoint of another type is refused
            with an error naming `arg`, its type and `example`).
        device: where to put the model (default: CUDA when available).
        dtype: torch dtype (or its name) to load the weights in (default: the checkpoint's, float32 for most).

    Returns:
        `(model, processor)`, the model in eval mode on `device`.
    """
    from transformers import AutoConfig, AutoProcessor

    model_types = set(model_types)
    target = default_device(device)
    if isinstance(model, torch.nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in model_types:
            raise ValueError(f"{arg} is a {type(model).__name__} (model_type {model_type!r}); {what} needs one of "
                             f"{sorted(model_types)}, e.g. {example}.")
        if processor is None or isinstance(processor, (str, os.PathLike)):
            if processor is None:
                raise ValueError(f"{arg} is a model object: pass its processor too (processor=...).")
            processor = _load_processor(AutoProcessor, processor, "processor")
        if dtype is not None:
            model = model.to(_dtype(dtype))
        return model.to(target).eval(), processor
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"{arg} must be a checkpoint folder, a Hub id or a model object, got {type(model).__name__}.")
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{arg}={str(model)!r} could not be read as a transformers checkpoint: {err}") from None
    if config.model_type not in model_types:
        raise ValueError(f"{arg}={str(model)!r} is a {config.model_type!r} checkpoint; {what} needs one of "
                         f"{sorted(model_types)}, e.g. {example}.")
    kwargs = {} if dtype is None else {"dtype": _dtype(dtype)}
    try:
        built = auto_class.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"{arg}={str(model)!r}: the weights could not be loaded: {err}") from None
    if not isinstance(processor, (str, os.PathLike)) and processor is not None:
        return built.to(target).eval(), processor
    processor = _load_processor(AutoProcessor, processor or model, "processor" if processor else arg)
    return built.to(target).eval(), processor


def _load_processor(auto_processor, source, arg: str):
    try:
        return auto_processor.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{arg}={str(source)!r}: no processor could be loaded from it: {err}") from None


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
