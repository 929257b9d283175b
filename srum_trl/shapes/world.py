"""ShapesWorld: a tiny synthetic text-to-image world with an exact grammar.

Images are 64x64 RGB with a black background and a few filled shapes
(circle, square, apex-up triangle) in six pure colors.  Prompts follow a small
fixed grammar with four categories (single, pair, spatial, counting), and an
image is correct for a prompt iff its objects are exactly the ones named and,
for spatial prompts, the relation holds between the objects' centroids.

This module defines the grammar, the ground-truth semantics, an exact renderer
of correct images and a generator of hard negatives.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
from PIL import Image, ImageFilter

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = {"two": 2, "three": 3, "four": 4}
CATEGORIES = ("single", "pair", "spatial", "counting")

NEGATIVE_KINDS = (
    "wrong_color",
    "wrong_shape",
    "missing_object",
    "extra_object",
    "wrong_count",
    "swapped_relation",
    "rounded_square",
    "merged",
)

MIN_SIDE = 12  # smallest object box side (px)
MAX_SIDE = 20  # largest object box side (px)
MIN_GAP = 2  # minimum empty gap between two object boxes (px)
RELATION_MARGIN = 6.0  # minimum centroid difference for rendered relations (px)
ROUNDED_CORNER_FRACTION = 0.35  # corner radius of "rounded_square" negatives

# Shape used only by the "rounded_square" negative; never part of the grammar.
ROUNDED_SQUARE = "rounded_square"

_OPPOSITE_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
_MAX_LAYOUT_TRIES = 2000
_MAX_OBJECT_TRIES = 50


# --------------------------------------------------------------------------- #
# Data types
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: color name, shape name and box (x0, y0, x1, y1), x1/y1 exclusive."""

    color: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Centroid (cx, cy) of the filled shape in pixel coordinates (y grows downwards).

        For circles and squares this is the box center; for the apex-up
        triangle it lies two thirds of the way down the box.
        """
        x0, y0, x1, y1 = self.box
        cx = (x0 + x1) / 2.0
        if self.shape == "triangle":
            return cx, y0 + 2.0 * (y1 - y0) / 3.0
        return cx, (y0 + y1) / 2.0


@dataclass(frozen=True)
class PromptSpec:
    """Parsed prompt: category, required (color, shape) multiset and optional relation.

    For spatial prompts ``objects`` is (first, second) and ``relation`` reads
    "first <relation> second".
    """

    prompt: str
    category: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None


class _HasColorShapeCenter(Protocol):
    color: str
    shape: str

    @property
    def center(self) -> tuple[float, float]: ...


# --------------------------------------------------------------------------- #
# Grammar
# --------------------------------------------------------------------------- #
def _items() -> list[tuple[str, str]]:
    """All 18 (color, shape) pairs in grammar order."""
    return [(c, s) for c in COLORS for s in SHAPES]


@functools.lru_cache(maxsize=1)
def _prompt_table() -> dict[str, PromptSpec]:
    """Every prompt of the grammar mapped to its spec, in deterministic order."""
    table: dict[str, PromptSpec] = {}

    def add(prompt: str, category: str, objects, relation=None) -> None:
        table[prompt] = PromptSpec(prompt, category, tuple(objects), relation)

    items = _items()
    for c, s in items:
        add(f"a {c} {s}", "single", [(c, s)])
    for a, b in itertools.permutations(items, 2):
        add(f"a {a[0]} {a[1]} and a {b[0]} {b[1]}", "pair", [a, b])
    for a, b in itertools.permutations(items, 2):
        for rel in RELATIONS:
            add(f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}", "spatial", [a, b], rel)
    for word, n in NUMBERS.items():
        for c, s in items:
            add(f"{word} {c} {s}s", "counting", [(c, s)] * n)
    return table


_GRAMMAR_HELP = (
    "examples: 'a red circle' (single), 'a red circle and a blue square' (pair), "
    "'a red circle to the left of a blue square' (spatial; relations: "
    + ", ".join(repr(r) for r in RELATIONS)
    + "), 'three green triangles' (counting); colors: "
    + ", ".join(COLORS)
    + "; shapes: "
    + ", ".join(SHAPES)
    + "; numbers: "
    + ", ".join(NUMBERS)
)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a ShapesWorld prompt (surrounding whitespace allowed).

    Raises ValueError for anything outside the grammar.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    spec = _prompt_table().get(prompt.strip())
    if spec is None:
        raise ValueError(f"{prompt!r} is not in the ShapesWorld grammar; {_GRAMMAR_HELP}")
    return spec


def all_prompts() -> dict[str, list[str]]:
    """Every prompt of the grammar per category, in deterministic grammar order.

    Sizes: single 18, pair 306, spatial 1224, counting 54.
    """
    out: dict[str, list[str]] = {cat: [] for cat in CATEGORIES}
    for prompt, spec in _prompt_table().items():
        out[spec.category].append(prompt)
    return out


@functools.lru_cache(maxsize=16)
def _split(heldout_fraction: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    train: list[str] = []
    heldout: list[str] = []
    for index, (category, prompts) in enumerate(all_prompts().items()):
        n_heldout = int(np.floor(heldout_fraction * len(prompts) + 0.5))
        order = np.random.default_rng([seed, index]).permutation(len(prompts))
        held = set(order[:n_heldout].tolist())
        for i, prompt in enumerate(prompts):
            (heldout if i in held else train).append(prompt)
    return tuple(train), tuple(heldout)


def split_prompts(heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic stratified split of all prompts into (train, heldout).

    Each category is split on its own: its prompts are permuted with
    ``numpy.random.default_rng([seed, category_index])`` and the first
    ``round(heldout_fraction * n_category)`` (half rounded up) are held out.
    Both lists keep grammar order (see ``all_prompts``).  With the defaults
    the held-out set has 4 single, 61 pair, 245 spatial and 11 counting prompts.
    """
    if not 0.0 <= float(heldout_fraction) <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction!r}")
    train, heldout = _split(float(heldout_fraction), int(seed))
    return list(train), list(heldout)


def train_prompts() -> list[str]:
    """Training prompts of the default split (``split_prompts()``)."""
    return split_prompts()[0]


def heldout_prompts() -> list[str]:
    """Held-out prompts of the default split (``split_prompts()``)."""
    return split_prompts()[1]


def sample_prompts(
    n: int,
    split: str = "train",
    seed: int = 0,
    categories: tuple[str, ...] = CATEGORIES,
) -> list[str]:
    """Sample n prompts (with replacement) from the "train", "heldout" or "all" split.

    Each prompt's category is drawn uniformly from ``categories``, then the
    prompt uniformly within that category.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split == "all":
        pool = _prompt_table().keys()
    elif split == "train":
        pool = train_prompts()
    elif split == "heldout":
        pool = heldout_prompts()
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if isinstance(categories, str):
        categories = (categories,)
    categories = tuple(categories)
    if not categories or any(c not in CATEGORIES for c in categories):
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories!r}")
    by_category: dict[str, list[str]] = {c: [] for c in categories}
    for prompt in pool:
        category = _prompt_table()[prompt].category
        if category in by_category:
            by_category[category].append(prompt)
    empty = [c for c, prompts in by_category.items() if not prompts]
    if empty:
        raise ValueError(f"categories {empty} have no prompts in split {split!r}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(n)):
        prompts = by_category[categories[rng.integers(len(categories))]]
        out.append(prompts[rng.integers(len(prompts))])
    return out


# --------------------------------------------------------------------------- #
# Semantics
# --------------------------------------------------------------------------- #
def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str, margin: float = 0.0) -> bool:
    """Whether ``first <relation> second`` holds for two centroids, by more than ``margin`` px."""
    (ax, ay), (bx, by) = first, second
    if relation == "to the left of":
        return bx - ax > margin
    if relation == "to the right of":
        return ax - bx > margin
    if relation == "above":
        return by - ay > margin
    if relation == "below":
        return ay - by > margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def evaluate_objects(
    objects: Sequence[_HasColorShapeCenter], spec: PromptSpec | str
) -> tuple[dict[str, bool], list[tuple[str, str]], list]:
    """Compare objects (anything with color, shape, center) against a prompt.

    Returns ``(checks, missing, extra)``: ``checks`` has "objects" (exact
    multiset match), "no_missing", "no_extra", "count" (same number of
    objects) and, for spatial prompts, "relation" (every object matching the
    first named pair is in the relation to every object matching the second,
    and both exist).  ``missing`` lists the required (color, shape) pairs not
    found, ``extra`` the objects not accounted for by the prompt.
    """
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    remaining = Counter(spec.objects)
    extra = []
    for obj in objects:
        key = (obj.color, obj.shape)
        if remaining[key] > 0:
            remaining[key] -= 1
        else:
            extra.append(obj)
    missing = [key for key, k in remaining.items() for _ in range(k)]
    checks = {
        "objects": not missing and not extra,
        "no_missing": not missing,
        "no_extra": not extra,
        "count": len(objects) == len(spec.objects),
    }
    if spec.relation is not None:
        firsts = [o for o in objects if (o.color, o.shape) == spec.objects[0]]
        seconds = [o for o in objects if (o.color, o.shape) == spec.objects[1]]
        checks["relation"] = bool(firsts and seconds) and all(
            relation_holds(a.center, b.center, spec.relation) for a in firsts for b in seconds
        )
    return checks, missing, extra


def objects_touch(a: ShapeObject, b: ShapeObject, size: int = IMAGE_SIZE) -> bool:
    """Whether the drawn pixels of two objects overlap or are 8-neighbours."""
    mask_a = _dilate(shape_mask(a.shape, a.box, size))
    return bool((mask_a & shape_mask(b.shape, b.box, size)).any())


def is_correct(objects: Sequence[ShapeObject], prompt: str | PromptSpec) -> bool:
    """Ground truth: whether drawn ``objects`` form a correct image for ``prompt``.

    Requires an exact match of the named objects, the relation (spatial) and
    that no two objects touch (touching objects would render as one blob).
    """
    checks, _, _ = evaluate_objects(objects, prompt)
    if not all(checks.values()):
        return False
    return not any(objects_touch(a, b) for a, b in itertools.combinations(objects, 2))


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #
def shape_mask(shape: str, box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a filled shape in ``box``, sampled at pixel centers.

    Shapes: "circle" (ellipse inscribed in the box), "square" (the box),
    "triangle" (apex at top-center, base on the bottom row; every row of the
    box is non-empty) and "rounded_square" (corner radius 35% of the side).
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    ys, xs = np.mgrid[0:size, 0:size]
    px, py = xs + 0.5, ys + 0.5
    inside = (px > x0) & (px < x1) & (py > y0) & (py < y1)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & (((px - cx) / (w / 2.0)) ** 2 + ((py - cy) / (h / 2.0)) ** 2 <= 1.0)
    if shape == "triangle":
        # Row r (0 = top) has half-width (r + 1) / h * w / 2, measured at its bottom edge.
        half_width = (ys - y0 + 1) / h * (w / 2.0)
        return inside & (np.abs(px - cx) <= half_width)
    if shape == ROUNDED_SQUARE:
        r = ROUNDED_CORNER_FRACTION * min(w, h)
        qx = np.clip(px, x0 + r, x1 - r)  # nearest point of the inner (shrunk) box
        qy = np.clip(py, y0 + r, y1 - r)
        return inside & ((px - qx) ** 2 + (py - qy) ** 2 <= r * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + (ROUNDED_SQUARE,)}")


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation with a 3x3 square structuring element."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def draw_objects(objects: Iterable[ShapeObject], size: int = IMAGE_SIZE) -> Image.Image:
    """Render objects on a black background, exactly (palette colors and black only).

    Later objects are drawn over earlier ones.
    """
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown color {obj.color!r}; expected one of {tuple(COLORS)}")
        canvas[shape_mask(obj.shape, obj.box, size)] = COLORS[obj.color]
    return Image.fromarray(canvas, mode="RGB")


def add_noise(
    image: Image.Image | np.ndarray,
    rng: np.random.Generator | int | None = None,
    sigma: float = 20.0,
    blur: float = 0.7,
    blur_kind: str = "gaussian",
) -> Image.Image:
    """Degrade an image like a VQ decoder would: optional blur, then gaussian pixel noise.

    ``sigma`` is the noise std on the 0..255 scale; ``blur`` is the PIL
    GaussianBlur radius (or BoxBlur radius with ``blur_kind="box"``), 0 for none.
    """
    rng = _as_rng(rng)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB")
    image = image.convert("RGB")
    if blur > 0:
        if blur_kind == "gaussian":
            image = image.filter(ImageFilter.GaussianBlur(radius=blur))
        elif blur_kind == "box":
            image = image.filter(ImageFilter.BoxBlur(radius=blur))
        else:
            raise ValueError(f"blur_kind must be 'gaussian' or 'box', got {blur_kind!r}")
    pixels = np.asarray(image, dtype=np.float32)
    if sigma > 0:
        pixels = pixels + rng.normal(0.0, sigma, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = MIN_GAP) -> bool:
    """Whether two boxes are separated by at least ``gap`` empty pixels along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _random_box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    return x0, y0, x0 + side, y0 + side


def _box_near(rng: np.random.Generator, anchor: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """A random box overlapping ``anchor`` partially (for merged negatives)."""
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    ax, ay = (anchor[0] + anchor[2]) / 2.0, (anchor[1] + anchor[3]) / 2.0
    reach = 0.5 * ((anchor[2] - anchor[0]) + side)  # center distance at which boxes just touch
    angle = rng.uniform(0.0, 2.0 * np.pi)
    dist = rng.uniform(0.35, 0.75) * reach
    x0 = int(round(ax + dist * np.cos(angle) - side / 2.0))
    y0 = int(round(ay + dist * np.sin(angle) - side / 2.0))
    x0, y0 = min(max(x0, 0), size - side), min(max(y0, 0), size - side)
    return x0, y0, x0 + side, y0 + side


def _place(
    items: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    relation: str | None = None,
    merge: tuple[int, int] | None = None,
    size: int = IMAGE_SIZE,
) -> list[ShapeObject]:
    """Rejection-sample a layout for ``items`` (list of (color, shape)).

    All boxes keep ``MIN_GAP`` px apart, except the pair ``merge = (i, j)``
    (i < j) whose shapes are made to overlap or touch.  With ``relation``, items 0 and 1
    satisfy it with a centroid margin of at least ``RELATION_MARGIN`` px.
    """
    for _ in range(_MAX_LAYOUT_TRIES):
        objects: list[ShapeObject] = []
        for index, (color, shape) in enumerate(items):
            merging = merge is not None and index == merge[1]
            for _ in range(_MAX_OBJECT_TRIES):
                box = _box_near(rng, objects[merge[0]].box, size) if merging else _random_box(rng, size)
                candidate = ShapeObject(color, shape, box)
                others = [o for k, o in enumerate(objects) if not (merging and k == merge[0])]
                if not all(_boxes_apart(box, o.box) for o in others):
                    continue
                if merging and not objects_touch(objects[merge[0]], candidate, size):
                    continue
                objects.append(candidate)
                break
            else:
                break  # this object did not fit: restart the layout
        if len(objects) != len(items):
            continue
        if relation is not None and not relation_holds(
            objects[0].center, objects[1].center, relation, RELATION_MARGIN
        ):
            continue
        return objects
    raise RuntimeError(
        f"could not place {list(items)} (relation={relation!r}, merge={merge}) "
        f"after {_MAX_LAYOUT_TRIES} tries"
    )


def render(
    prompt: str, rng: np.random.Generator | int | None = None
) -> tuple[Image.Image, list[ShapeObject]]:
    """Render a random image that is correct for ``prompt``.

    Returns the image and its objects (in prompt order).  Spatial relations
    hold with a centroid margin of at least ``RELATION_MARGIN`` px.
    """
    spec = parse_prompt(prompt)
    objects = _place(spec.objects, _as_rng(rng), relation=spec.relation)
    return draw_objects(objects), objects


def negative_kinds_for(prompt: str | PromptSpec) -> tuple[str, ...]:
    """The hard-negative kinds applicable to a prompt (subset of ``NEGATIVE_KINDS``)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    kinds = ["wrong_color", "wrong_shape", "missing_object", "extra_object"]
    if spec.category == "counting":
        kinds.append("wrong_count")
    if spec.category == "spatial":
        kinds.append("swapped_relation")
    if any(shape == "square" for _, shape in spec.objects):
        kinds.append("rounded_square")
    if len(spec.objects) >= 2:
        kinds.append("merged")
    return tuple(k for k in NEGATIVE_KINDS if k in kinds)


def _negative_layout(spec: PromptSpec, kind: str, rng: np.random.Generator) -> list[ShapeObject]:
    """One layout of a ``kind`` negative for ``spec`` (see ``render_negative``)."""
    items = list(spec.objects)
    relation = spec.relation
    index = int(rng.integers(len(items)))
    color, shape = items[index]
    if kind == "wrong_color":
        items[index] = (str(rng.choice([c for c in COLORS if c != color])), shape)
    elif kind == "wrong_shape":
        items[index] = (color, str(rng.choice([s for s in SHAPES if s != shape])))
    elif kind == "missing_object":
        del items[index]
        relation = None
    elif kind == "extra_object":
        items.append(_items()[int(rng.integers(18))])
    elif kind == "wrong_count":
        n = len(items) + int(rng.choice([-1, 1]))
        items = [items[0]] * n
    elif kind == "swapped_relation":
        relation = _OPPOSITE_RELATION[spec.relation]
    elif kind == "rounded_square":
        squares = [i for i, (_, s) in enumerate(items) if s == "square"]
        i = squares[int(rng.integers(len(squares)))]
        items[i] = (items[i][0], ROUNDED_SQUARE)
    elif kind == "merged":
        if spec.relation is not None:
            pair = (0, 1)  # the two related objects
        else:
            pair = tuple(sorted(rng.choice(len(items), size=2, replace=False).tolist()))
        return _place(items, rng, merge=pair)
    return _place(items, rng, relation=relation)


def render_negative(
    prompt: str,
    rng: np.random.Generator | int | None = None,
    kind: str | None = None,
) -> tuple[Image.Image, list[ShapeObject], str]:
    """Render a hard negative: an image that is NOT correct for ``prompt``.

    Kinds (``NEGATIVE_KINDS``): "wrong_color" / "wrong_shape" (one named object
    changed), "missing_object", "extra_object", "wrong_count" (counting only,
    count +-1 within 1..5), "swapped_relation" (spatial only, opposite
    relation with a clear margin), "rounded_square" (a named square drawn with
    corners rounded by 35% of its side) and "merged" (two named objects
    overlapping into one blob).  Other named objects and relations are kept.
    ``kind=None`` picks uniformly among ``negative_kinds_for(prompt)``.
    Returns (image, objects, kind).
    """
    spec = parse_prompt(prompt)
    rng = _as_rng(rng)
    valid = negative_kinds_for(spec)
    if kind is None:
        kind = valid[int(rng.integers(len(valid)))]
    elif kind not in valid:
        raise ValueError(f"kind {kind!r} is not valid for {spec.prompt!r}; valid kinds: {valid}")
    for _ in range(100):
        objects = _negative_layout(spec, kind, rng)
        if not is_correct(objects, spec):
            return draw_objects(objects), objects, kind
    raise RuntimeError(f"could not render a {kind!r} negative for {spec.prompt!r}")


__all__ = [
    "IMAGE_SIZE",
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "NUMBERS",
    "CATEGORIES",
    "NEGATIVE_KINDS",
    "ShapeObject",
    "PromptSpec",
    "parse_prompt",
    "all_prompts",
    "split_prompts",
    "train_prompts",
    "heldout_prompts",
    "sample_prompts",
    "relation_holds",
    "evaluate_objects",
    "objects_touch",
    "is_correct",
    "shape_mask",
    "draw_objects",
    "add_noise",
    "render",
    "negative_kinds_for",
    "render_negative",
]
