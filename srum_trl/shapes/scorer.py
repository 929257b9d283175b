"""Rule-based scorer for ShapesWorld images.

``detect_objects`` segments an image by color, labels connected components and
classifies each component's shape from its geometry; ``score`` checks the
detections against a prompt with the ground-truth semantics of
``world.evaluate_objects``.  The detector is built to tolerate images decoded
by a VQ tokenizer: slight color shifts, pixel noise, blur and soft edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from .world import CATEGORIES, COLORS, IMAGE_SIZE, SHAPES, evaluate_objects, parse_prompt, shape_mask

# A pixel is background when its brightest channel is below this value.
BACKGROUND_THRESHOLD = 128
# A channel is "on" when it reaches this fraction of the pixel's brightest channel.
CHANNEL_ON_RATIO = 0.5
# Components smaller than this many pixels are dropped as specks.  The smallest
# real object (a 12 px triangle) covers about 80 px, so 30 leaves ample room
# for blur eroding its edges while removing noise specks and fringe fragments.
MIN_OBJECT_AREA = 30
# A component is only given a shape name if its IoU with that ideal shape is at least this.
MIN_SHAPE_IOU = 0.65

# Pixel labels: 0 is background, 1..6 the palette colors.  A palette color is
# identified by its (r, g, b) on/off pattern; white (all on) is not one.
_COLOR_NAMES = ("background",) + tuple(COLORS)
_PATTERN_TO_LABEL = {
    tuple(v > 0 for v in rgb): label for label, rgb in enumerate(COLORS.values(), start=1)
}

_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass
class DetectedObject:
    """One detected object: color, shape ("circle", "square", "triangle" or "other"),
    bounding box (x0, y0, x1, y1; x1/y1 exclusive), mass centroid (cx, cy) and area in px."""

    color: str
    shape: str
    box: tuple[int, int, int, int]
    center: tuple[float, float]
    area: int


@dataclass
class ScoreResult:
    """Outcome of scoring one image against one prompt.

    ``checks`` holds the individual criteria (see ``world.evaluate_objects``),
    ``missing`` the required (color, shape) pairs not found and ``extra`` the
    detected objects not named by the prompt.
    """

    correct: bool
    category: str
    checks: dict[str, bool]
    detected: list[DetectedObject] = field(default_factory=list)
    missing: list = field(default_factory=list)
    extra: list = field(default_factory=list)


# --------------------------------------------------------------------------- #
# Detection
# --------------------------------------------------------------------------- #
def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8 array of the image, resized to IMAGE_SIZE x IMAGE_SIZE if needed."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 image array, got shape {array.shape}")
        if array.dtype != np.uint8:
            scale = 255.0 if array.max() <= 1.0 else 1.0  # accept floats in [0, 1]
            array = np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        pil = Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(pil)


def _classify_pixels(pixels: np.ndarray) -> np.ndarray:
    """Label map: 0 background/unknown, 1..6 palette colors (order of ``COLORS``)."""
    values = pixels.astype(np.float32)
    brightest = values.max(axis=2)
    on = (values >= CHANNEL_ON_RATIO * brightest[..., None]) & (brightest[..., None] >= BACKGROUND_THRESHOLD)
    labels = np.zeros(pixels.shape[:2], dtype=np.int32)
    for pattern, label in _PATTERN_TO_LABEL.items():
        labels[np.all(on == np.array(pattern), axis=2)] = label
    return labels


def _shifted(array: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[y, x] = array[y + dy, x + dx]``, with ``fill`` outside the image."""
    h, w = array.shape
    out = np.full_like(array, fill)
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = array[
        max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


def _remove_specks(labels: np.ndarray) -> np.ndarray:
    """Clear labelled pixels with at most one 8-neighbour of the same label (specks, spurs)."""
    same = sum((_shifted(labels, dy, dx, 0) == labels).astype(np.int32) for dy, dx in _NEIGHBOURS_8)
    return np.where((labels > 0) & (same <= 1), 0, labels)


def _connected_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-zero labels; returns component ids (0 = none).

    Each pixel starts with its own id and repeatedly takes the smallest id of
    its same-label neighbours until nothing changes (fine for 64x64 images).
    """
    h, w = labels.shape
    sentinel = h * w + 1
    ids = np.where(labels > 0, np.arange(1, h * w + 1).reshape(h, w), sentinel)
    same_label = [
        (dy, dx, (_shifted(labels, dy, dx, 0) == labels) & (labels > 0)) for dy, dx in _NEIGHBOURS_8
    ]
    while True:
        new = ids
        for dy, dx, same in same_label:
            new = np.minimum(new, np.where(same, _shifted(ids, dy, dx, sentinel), sentinel))
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(labels > 0, ids, 0)


def _trim(mask: np.ndarray, max_trim: int = 2) -> np.ndarray:
    """Drop up to ``max_trim`` border rows/columns per side holding a single pixel.

    Such lines are usually noise protrusions; removing them gives a bounding
    box that fits the object's body (it may also clip a triangle's apex pixel).
    """
    for _ in range(4):  # top, right, bottom, left (rotating the mask each time)
        for _ in range(max_trim):
            if mask.shape[0] > 4 and mask[0].sum() <= 1:
                mask = mask[1:]
        mask = np.rot90(mask)
    return mask


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of a component mask (cropped to its bounding box) with each ideal shape
    drawn in the same (trimmed) box."""
    mask = _trim(mask)
    h, w = mask.shape
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, (0, 0, w, h), size=max(h, w))[:h, :w]
        scores[shape] = float((mask & template).sum() / (mask | template).sum())
    return scores


def classify_shape(mask: np.ndarray) -> str:
    """Classify a component mask (cropped to its bounding box) as a shape name.

    The best-matching ideal shape (``shape_scores``: IoU with an ideal circle,
    square or apex-up triangle filling the bounding box) wins if its IoU is at
    least ``MIN_SHAPE_IOU``; blobs that are too elongated (aspect ratio > 1.45),
    too small or match nothing well are "other".
    """
    h, w = _trim(mask).shape
    if min(h, w) < 4 or max(h, w) > 1.45 * min(h, w):
        return "other"
    scores = shape_scores(mask)
    best = max(scores, key=scores.get)
    return best if scores[best] >= MIN_SHAPE_IOU else "other"


def detect_objects(image: Image.Image | np.ndarray) -> list[DetectedObject]:
    """Detect the colored objects of an image (PIL image or HxWx3 uint8 array).

    Pipeline: resize to 64x64 if needed; classify each pixel to a palette
    color or background (dark pixels, brightest channel < 128, are background;
    a channel counts as on when it reaches half of the brightest channel);
    remove specks (pixels with at most one same-color neighbour); find 8-connected same-color components; drop
    components smaller than ``MIN_OBJECT_AREA`` (30 px; real objects have
    >= ~80 px); classify each component's shape with ``classify_shape``.
    Objects are returned sorted by (x, y) of their centroids.
    """
    labels = _remove_specks(_classify_pixels(_to_array(image)))
    components = _connected_components(labels)
    detected = []
    for component_id in np.unique(components[components > 0]):
        ys, xs = np.nonzero(components == component_id)
        if len(ys) < MIN_OBJECT_AREA:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        mask = components[y0:y1, x0:x1] == component_id
        detected.append(
            DetectedObject(
                color=_COLOR_NAMES[labels[ys[0], xs[0]]],
                shape=classify_shape(mask),
                box=(x0, y0, x1, y1),
                center=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                area=int(len(ys)),
            )
        )
    return sorted(detected, key=lambda d: d.center)


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #
def score(image: Image.Image | np.ndarray, prompt: str) -> ScoreResult:
    """Score one image against a prompt: correct iff every check of
    ``world.evaluate_objects`` passes on the detected objects."""
    spec = parse_prompt(prompt)
    detected = detect_objects(image)
    checks, missing, extra = evaluate_objects(detected, spec)
    return ScoreResult(
        correct=all(checks.values()),
        category=spec.category,
        checks=checks,
        detected=detected,
        missing=missing,
        extra=extra,
    )


def score_batch(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> list[ScoreResult]:
    """Score images against prompts pairwise (equal lengths required)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return [score(image, prompt) for image, prompt in zip(images, prompts)]


def accuracy_by_category(results: Sequence[ScoreResult]) -> dict[str, float]:
    """Fraction of correct results per category present (grammar order) plus "overall"."""
    out: dict[str, float] = {}
    for category in CATEGORIES:
        hits = [r.correct for r in results if r.category == category]
        if hits:
            out[category] = float(np.mean(hits))
    out["overall"] = float(np.mean([r.correct for r in results])) if results else float("nan")
    return out


__all__ = [
    "BACKGROUND_THRESHOLD",
    "CHANNEL_ON_RATIO",
    "MIN_OBJECT_AREA",
    "DetectedObject",
    "ScoreResult",
    "classify_shape",
    "detect_objects",
    "score",
    "score_batch",
    "accuracy_by_category",
]
