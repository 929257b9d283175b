"""A picture for people: an image beside its reward-map overlay, with region boxes and scores."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .reward_map import RewardMap


def _colormap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Blue (low) -> white (middle) -> red (high), as uint8 RGB; grey where a value is missing (NaN)."""
    missing = np.isnan(values)[..., None]
    t = np.clip((np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-6), 0.0, 1.0)[..., None]
    blue, white, red = np.array([40, 80, 255.0]), np.array([255, 255, 255.0]), np.array([255, 40, 40.0])
    rgb = np.where(t < 0.5, blue + (white - blue) * (t * 2), white + (red - white) * (t * 2 - 1))
    return np.where(missing, 128.0, rgb).astype(np.uint8)


def render_reward_map(image: Image.Image, reward_map: RewardMap, prompt: str = "", scale: int = 4) -> Image.Image:
    """Return a PNG-ready picture: the image, then the token-map overlay with boxes and scores, then a caption."""
    w, h = image.size
    size = (w * scale, h * scale)
    left = image.convert("RGB").resize(size, Image.NEAREST)
    low = -1.0 if reward_map.rule == "signed" else 0.0
    heat = Image.fromarray(_colormap(reward_map.token_map, low, 1.0)).resize(size, Image.NEAREST)
    right = Image.blend(left, heat, 0.55)
    draw = ImageDraw.Draw(right)
    font = ImageFont.load_default()
    for region in reward_map.regions:
        x0, y0, x1, y1 = (v * scale for v in region.box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 0, 0), width=2)
        draw.text((x0 + 3, y0 + 2), f"{region.score:+.2f}", fill=(0, 0, 0), font=font)
    caption_h = 34
    canvas = Image.new("RGB", (size[0] * 2 + 8, size[1] + caption_h), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size[0] + 8, 0))
    g = "off" if reward_map.global_score is None else f"{reward_map.global_score:+.2f}"
    text = f"{prompt}\nglobal {g}  |  rule {reward_map.rule}  |  token map mean {reward_map.token_map.mean():.2f}"
    ImageDraw.Draw(canvas).multiline_text((4, size[1] + 3), text, fill=(0, 0, 0), font=font)
    return canvas
