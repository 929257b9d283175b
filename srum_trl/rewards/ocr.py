"""OCR reward: for prompts that ask for rendered text, how close the text an OCR engine reads is to the text asked for.

The text asked for is what the prompt puts between double quotes (straight `"..."` or curly), several quoted parts
joined by a space; a prompt without quotes gets NaN (the reward does not apply). The engine is RapidOCR (the
`rapidocr` package on ONNX Runtime, whose wheel carries its detection and recognition models, so it runs offline):
`pip install 'srum-trl[ocr]'`.

Score: `1 - edit_distance(read, asked) / max(len(read), len(asked))` (1 minus the normalised Levenshtein distance),
in [0, 1], after normalising both texts: lowercase (unless `case_sensitive`) and without spaces (unless
`ignore_spaces=False`; OCR engines often drop or add spaces between words).
"""

from __future__ import annotations

import re

import numpy as np

from ._loading import as_rgb_images, check_prompts, require

_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')


def quoted_text(prompt: str) -> str | None:
    """The text a prompt asks to render: its double-quoted parts joined by a space, or None if it has none."""
    parts = [a or b for a, b in _QUOTED.findall(prompt)]
    parts = [p.strip() for p in parts if p.strip()]
    return " ".join(parts) if parts else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_similarity(read: str, asked: str) -> float:
    """`1 - edit_distance / max(len)`: 1 for equal texts, 0 when nothing matches (or nothing was read)."""
    longest = max(len(read), len(asked))
    return 1.0 if longest == 0 else 1.0 - edit_distance(read, asked) / longest


class OCRReward:
    """Reward for rendered text (TRL's reward signature): NaN for prompts without quoted text.

    Args:
        case_sensitive: compare letter case too (default False).
        ignore_spaces: drop every whitespace before comparing (default True).
        min_confidence: ignore text lines the engine reads with a lower confidence (0 keeps all).
        engine: a ready `rapidocr.RapidOCR` instance (or any callable with the same result: `.txts` and
            `.scores`); default: one built on first use with RapidOCR's bundled models.
        engine_params: `params` for `rapidocr.RapidOCR(params=...)` when the engine is built here.
        name: the name logged by the trainers.
    """

    def __init__(self, case_sensitive: bool = False, ignore_spaces: bool = True, min_confidence: float = 0.0,
                 engine=None, engine_params: dict | None = None, name: str = "ocr"):
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}.")
        if engine is None:
            require("rapidocr", "ocr", "OCRReward")
        self.case_sensitive = case_sensitive
        self.ignore_spaces = ignore_spaces
        self.min_confidence = min_confidence
        self.engine_params = dict(engine_params or {})
        self._engine = engine
        self.__name__ = name

    @property
    def engine(self):
        if self._engine is None:
            rapidocr = require("rapidocr", "ocr", "OCRReward")
            import logging

            self._engine = rapidocr.RapidOCR(params=self.engine_params or None)
            logging.getLogger("RapidOCR").setLevel(logging.WARNING)  # one INFO line per model file otherwise
        return self._engine

    def normalise(self, text: str) -> str:
        text = text if self.case_sensitive else text.lower()
        return "".join(text.split()) if self.ignore_spaces else " ".join(text.split())

    def read(self, images) -> list[str]:
        """What the engine reads in each image: its text lines in reading order joined by spaces ("" if none)."""
        out = []
        for image in as_rgb_images(images, "images"):
            result = self.engine(np.asarray(image))
            texts, scores = getattr(result, "txts", None) or (), getattr(result, "scores", None) or ()
            kept = [t for t, s in zip(texts, scores or [1.0] * len(texts)) if s >= self.min_confidence]
            out.append(" ".join(kept))
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        images = as_rgb_images(completions)
        prompts = check_prompts(prompts, len(images))
        asked = [quoted_text(p) for p in prompts]
        rows = [i for i, a in enumerate(asked) if a is not None]
        rewards = [float("nan")] * len(images)
        for i, read in zip(rows, self.read([images[i] for i in rows])):
            rewards[i] = text_similarity(self.normalise(read), self.normalise(asked[i]))
        return rewards
