"""The judge's questions for ShapesWorld, and a judge that asks them.

Everything is written in the tiny tokenizer's vocabulary: lowercase whitespace-separated words, no punctuation.

- [`global_question`]: one question about the whole image ("does this image show a red circle").
- [`local_questions`]: one question per distinct (color, shape) that a prompt names ("is there a red circle here");
  the judge shows the model a crop of a region and keeps the highest P(yes) over these questions.
- [`CAPTION_QUESTION`]: the instruction used to teach the model to describe an image (pretraining only).
- [`VOCABULARY`]: every word the grammar, the questions and the answers use.
- [`object_regions`]: a small blob detector (bright connected components) used as the judge's region proposer.
- [`make_shapes_judge`]: a [`UMMJudgeRewardFunction`] wired with all of the above.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

from .world import COLORS, NUMBERS, RELATIONS, SHAPES, parse_prompt

GLOBAL_TEMPLATE = "does this image show {prompt}"
LOCAL_TEMPLATE = "is there a {color} {shape} here"
CAPTION_QUESTION = "describe this image"
YES, NO = "yes", "no"

# Blob detector defaults (see `object_regions`).
REGION_THRESHOLD = 90
REGION_PAD = 2
REGION_MAX = 6
REGION_MIN_AREA = 12


def _unique(words) -> list[str]:
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def _grammar_words() -> list[str]:
    relation_words = [w for relation in RELATIONS for w in relation.split()]
    return _unique(
        ["a", "and", *COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), *NUMBERS, *relation_words]
    )


def _template_words(*templates: str) -> list[str]:
    return [w for t in templates for w in t.split() if not w.startswith("{")]


#: Every word needed by ShapesWorld prompts, questions and answers, in a fixed order (the tokenizer's word order).
VOCABULARY: list[str] = _unique(
    _grammar_words() + _template_words(GLOBAL_TEMPLATE, LOCAL_TEMPLATE, CAPTION_QUESTION) + [YES, NO]
)


def global_question(prompt: str) -> str:
    """The question about the whole image: ``"does this image show <prompt>"``.

    The prompt must be in the ShapesWorld grammar (surrounding whitespace is dropped).
    """
    return GLOBAL_TEMPLATE.format(prompt=parse_prompt(prompt).prompt)


def local_question(color: str, shape: str) -> str:
    """The question about one region: ``"is there a <color> <shape> here"``."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown color/shape {color!r} {shape!r}; colors {tuple(COLORS)}, shapes {SHAPES}")
    return LOCAL_TEMPLATE.format(color=color, shape=shape)


def local_questions(prompt: str) -> list[str]:
    """One local question per distinct (color, shape) named by `prompt`, in the prompt's order."""
    pairs = _unique(parse_prompt(prompt).objects)
    return [local_question(color, shape) for color, shape in pairs]


def all_local_questions() -> list[str]:
    """The 18 local questions, one per (color, shape) of the grammar, in grammar order."""
    return [local_question(c, s) for c in COLORS for s in SHAPES]


# --------------------------------------------------------------------------------------------------- regions
def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(int(y0), int(x0))]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.asarray(pixels))
    return out


def object_regions(
    image: Image.Image | np.ndarray,
    prompt: str = "",
    threshold: int = REGION_THRESHOLD,
    pad: int = REGION_PAD,
    max_regions: int = REGION_MAX,
    min_area: int = REGION_MIN_AREA,
) -> list[tuple[int, int, int, int]]:
    """Boxes `(x0, y0, x1, y1)` (end-exclusive) of the bright blobs of an image, largest first.

    A pixel is part of a blob when its brightest channel exceeds `threshold`; blobs are 8-connected components with
    at least `min_area` pixels; each box is padded by `pad` pixels and clipped to the image; at most `max_regions`
    boxes are returned. `prompt` is ignored (the proposer signature is `(image, prompt)`).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    mask = pixels[..., :3].max(axis=2) > threshold
    blobs = [c for c in _components(mask) if len(c) >= min_area]
    blobs.sort(key=lambda c: (-len(c), int(c[:, 1].min()), int(c[:, 0].min())))
    boxes = []
    for c in blobs[:max_regions]:
        ys, xs = c[:, 0], c[:, 1]
        boxes.append(
            (
                max(0, int(xs.min()) - pad),
                max(0, int(ys.min()) - pad),
                min(w, int(xs.max()) + 1 + pad),
                min(h, int(ys.max()) + 1 + pad),
            )
        )
    return boxes


def make_shapes_judge(backend=None, **kwargs):
    """A logits-mode [`UMMJudgeRewardFunction`] asking ShapesWorld's questions.

    The global question is [`global_question`], the local questions [`local_questions`] (a region's score is the
    best over them), and regions come from [`object_regions`] (bright blobs, at most 6, largest first) unless
    `region_proposer` is given. Other keyword arguments go to `UMMJudgeRewardFunction`.
    """
    from ..rewards import CallableProposer, UMMJudgeRewardFunction

    kwargs.setdefault("region_proposer", CallableProposer(object_regions, max_regions=REGION_MAX))
    kwargs.setdefault("name", "shapes_judge")
    return UMMJudgeRewardFunction(
        backend,
        mode="logits",
        global_question=global_question,
        local_question=local_questions,
        **kwargs,
    )


__all__ = [
    "CAPTION_QUESTION",
    "GLOBAL_TEMPLATE",
    "LOCAL_TEMPLATE",
    "NO",
    "VOCABULARY",
    "YES",
    "all_local_questions",
    "global_question",
    "local_question",
    "local_questions",
    "make_shapes_judge",
    "object_regions",
]
