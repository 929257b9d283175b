"""Text and image preprocessing of BAGEL: the Qwen2 tokenizer with BAGEL's four special tokens, and the NaViT image
transform (resize keeping the aspect ratio to a stride multiple, normalise to [-1, 1], cut into patches).

Special tokens (the official `add_special_tokens`): `<|im_start|>` (bos: opens every text block), `<|im_end|>` (eos:
closes it), `<|vision_start|>` / `<|vision_end|>` around every image block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    start_of_image: int
    end_of_image: int
    pad: int


def add_special_tokens(tokenizer) -> SpecialIds:
    """Make sure the four BAGEL tokens exist (adding the missing ones, as the official code does); their ids."""
    existing = set(getattr(tokenizer, "all_special_tokens", []) or [])
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in existing and t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else ids[1]
    return SpecialIds(bos=ids[0], eos=ids[1], start_of_image=ids[2], end_of_image=ids[3], pad=int(pad))


def load_tokenizer(path: str):
    """The tokenizer files of a BAGEL folder (Qwen2's). Falls back to `tokenizer.json` alone when
    `AutoTokenizer` cannot read the folder (the official folder's `config.json` is not a model config)."""
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

    try:  # an empty config: the folder's config.json is no transformers model config (none is needed to pick the class)
        return AutoTokenizer.from_pretrained(path, config=PretrainedConfig())
    except Exception:  # noqa: BLE001 - fall back to the raw tokenizer.json
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise
        return PreTrainedTokenizerFast(tokenizer_file=file)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (the official `tokenizer.encode` of Qwen2 adds none)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------------------------------- images


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def navit_size(width: int, height: int, max_size: int, min_size: int, stride: int,
               max_pixels: int | None = None) -> tuple[int, int]:
    """Target `(width, height)` of the official `MaxLongEdgeMinShortEdgeResize`: long edge at most `max_size`,
    short edge at least `min_size`, both multiples of `stride`, at most `max_pixels` pixels."""

    def scaled(w, h, s):
        return _make_divisible(round(w * s), stride), _make_divisible(round(h * s), stride)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = scaled(width, height, scale)
    if max_pixels is not None and w * h > max_pixels:
        w, h = scaled(w, h, max_pixels / (w * h))
    if max(w, h) > max_size:
        w, h = scaled(w, h, max_size / max(w, h))
    return w, h


def image_to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image -> `[3, H, W]` float32 in [-1, 1] (mean 0.5, std 0.5), resized (bicubic) to `size` = (w, h)."""
    image = _to_rgb(image)
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """`[C, H, W]` -> `[(H/p) * (W/p), p * p * C]`, patches row-major, each flattened as (row, col, channel)."""
    c, h, w = pixels.shape
    x = pixels.reshape(c, h // patch, patch, w // patch, patch)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, patch * patch * c)


def latents_to_tokens(latents: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Latents `[B, C, 2h, 2w]` -> generation tokens `[B, h*w, p*p*C]` (the official packing)."""
    b, c, hh, ww = latents.shape
    x = latents.reshape(b, c, hh // p, p, ww // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (hh // p) * (ww // p), p * p * c)


def tokens_to_latents(tokens: torch.Tensor, grid: tuple[int, int], channels: int, p: int = 2) -> torch.Tensor:
    """The inverse of [`latents_to_tokens`]."""
    b = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(b, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, h * p, w * p)


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """`[3, H, W]` in [-1, 1] -> PIL RGB."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))
