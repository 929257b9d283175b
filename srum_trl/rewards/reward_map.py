"""Dense reward maps: a global score and region scores turned into one weight per image token.

A *map rule* turns `(global score g, regions with scores s_k)` into a pixel map; [`RewardMap.from_scores`] then
downsamples it to the generation token grid. Rules are plain functions registered in `MAP_RULES`, so a new rule
is one function.

SRUM's rule (`"srum"`, the default, as the paper's reference code does it):

    M = 0.5 everywhere;  for each region k: M[box_k] = max(M[box_k], (s_k + 1) / 2);  M *= (g + 1) / 2

Its quirk: because of the `max` and the 0.5 floor, a *negative* local score never pushes a weight below
0.5 * (g + 1) / 2; bad regions are treated like the background, they are never pushed away.

The signed rule (`"signed"`) lets bad regions push away: the local map starts at 0 (neutral); inside each box the
score with the larger magnitude wins; the token weight is the average of the local and the global opinion,
`(L + g) / 2`, in [-1, 1]. With the SRUM loss weight `R + lambda`, tokens inside a bad region of a bad image get a
negative weight, i.e. the loss lowers their probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..warn import warn


@dataclass
class Region:
    """A scored region: `box` is (x0, y0, x1, y1) in pixels, end-exclusive; `score` in [-1, 1]."""

    box: tuple[int, int, int, int]
    score: float
    label: str = ""


def check_box(box, width: int, height: int, where: str = "box") -> tuple[tuple[int, int, int, int] | None, bool]:
    """A box as end-exclusive integer pixels inside a `width x height` image, and whether it had to be clamped.

    Malformed boxes raise a ValueError naming `where`: not four numbers, a NaN or infinite coordinate, or an
    inverted or empty box (x1 <= x0 or y1 <= y0; boxes are (x0, y0, x1, y1), not (x, y, w, h)). A box reaching
    outside the image is clamped to it, as the SRUM reference does; one entirely outside is returned as None
    (nothing of it is in the image). Coordinates are rounded to the nearest pixel.
    """
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be four numbers (x0, y0, x1, y1) in pixels, got {box!r}.") from None
    if len(values) != 4:
        raise ValueError(f"{where} must be four numbers (x0, y0, x1, y1) in pixels, got {box!r}.")
    if not all(np.isfinite(values)):
        raise ValueError(f"{where} {tuple(box)!r} has a NaN or infinite coordinate.")
    x0, y0, x1, y1 = (int(round(v)) for v in values)
    if x1 <= x0 or y1 <= y0:
        kind = "empty" if (x1 == x0 or y1 == y0) else "inverted"
        raise ValueError(f"{where} {tuple(box)!r} is {kind}: x1 must exceed x0 and y1 must exceed y0 (boxes are "
                         "(x0, y0, x1, y1) in pixels, not (x, y, width, height)).")
    clamped = (max(0, x0), max(0, y0), min(width, x1), min(height, y1))
    changed = clamped != (x0, y0, x1, y1)
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return None, True
    return clamped, changed


def check_boxes(boxes, width: int, height: int, where: str = "box") -> tuple[list[tuple[int, int, int, int]], int, int]:
    """[`check_box`] over a list: the boxes kept (clamped into the image), how many were clamped and how many were
    dropped (entirely outside the image)."""
    kept, clamped, dropped = [], 0, 0
    for k, box in enumerate(boxes):
        checked, changed = check_box(box, width, height, where=f"{where} {k}")
        if checked is None:
            dropped += 1
            continue
        clamped += changed
        kept.append(checked)
    return kept, clamped, dropped


def warn_clamped(clamped: int, dropped: int, width: int, height: int, source: str) -> None:
    """One warning for the boxes of `source` that reached outside the image."""
    if clamped or dropped:
        warn(f"{source}: {clamped + dropped} box(es) reached outside the {width}x{height} image; {clamped} were "
             f"clamped to it and {dropped} (entirely outside) were dropped.", stacklevel=3)


def _check_score(value: float, where: str) -> float:
    """A score in [-1, 1]; NaN (a missing score: the judge gave none) passes through."""
    value = float(value)
    if np.isnan(value):
        return value
    if not np.isfinite(value) or value < -1.0 - 1e-6 or value > 1.0 + 1e-6:
        raise ValueError(f"{where} must be a number in [-1, 1] (or NaN for a missing score), got {value!r}.")
    return min(1.0, max(-1.0, value))


def srum_rule(height: int, width: int, global_score: float, regions: list[Region]) -> np.ndarray:
    """SRUM's map: 0.5 floor, max-combined region weights (s+1)/2, scaled by (g+1)/2. Values in [0, 1]."""
    pixel = np.full((height, width), 0.5, dtype=np.float32)
    for region in regions:
        x0, y0, x1, y1 = region.box
        np.maximum(pixel[y0:y1, x0:x1], (region.score + 1.0) / 2.0, out=pixel[y0:y1, x0:x1])
    return pixel * (global_score + 1.0) / 2.0


def signed_rule(height: int, width: int, global_score: float, regions: list[Region]) -> np.ndarray:
    """Signed map: local opinion L (0 = neutral, strongest region score wins), weight (L + g) / 2 in [-1, 1]."""
    local = np.zeros((height, width), dtype=np.float32)
    for region in regions:
        x0, y0, x1, y1 = region.box
        patch = local[y0:y1, x0:x1]
        np.copyto(patch, np.float32(region.score), where=abs(region.score) > np.abs(patch))
    return (local + global_score) / 2.0


MAP_RULES: dict[str, Callable[[int, int, float, list[Region]], np.ndarray]] = {
    "srum": srum_rule,
    "signed": signed_rule,
}


def global_weight(global_score: float | None, rule: str | Callable = "srum") -> float:
    """The weight that `rule` gives every token of an image judged only globally (no regions): `(g + 1) / 4` for
    "srum", `g / 2` for "signed"; g = 1 when `global_score` is None, as in [`RewardMap.from_scores`]."""
    rule_fn = MAP_RULES.get(rule) if isinstance(rule, str) else rule
    if rule_fn is None:
        raise ValueError(f"Unknown map rule {rule!r}; choose one of {sorted(MAP_RULES)} or pass a function.")
    g = 1.0 if global_score is None else float(global_score)
    return float(np.asarray(rule_fn(1, 1, g, []), dtype=np.float32).reshape(-1)[0])


DOWNSAMPLE_MODES = ("bilinear", "area")


def downsample(pixel_map: np.ndarray, grid: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Downsample a pixel map to the token grid `(h, w)`.

    "bilinear" (default, as the SRUM reference does it): the bilinear value at each token's center, i.e. a blend
    of the few pixels nearest that center; a box smaller than a token can be missed. "area": each token gets the
    exact mean of the pixels it covers, so every box counts in proportion to its area.
    """
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}.")
    tensor = torch.from_numpy(np.ascontiguousarray(pixel_map, dtype=np.float32))[None, None]
    if mode == "area":
        out = F.adaptive_avg_pool2d(tensor, tuple(grid))
    else:
        out = F.interpolate(tensor, size=tuple(grid), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


@dataclass
class RewardMap:
    """The judge's verdict on one image.

    Attributes:
        global_score: g in [-1, 1] (None when the global judge is off; the rule then uses g = 1).
        regions: the scored regions.
        pixel_map: `[H, W]` weights from the map rule.
        token_map: `[h, w]` weights on the generation token grid, the R of the SRUM loss.
        rule: name of the map rule that made it.
    """

    global_score: float | None
    regions: list[Region]
    pixel_map: np.ndarray
    token_map: np.ndarray
    rule: str = "srum"
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_scores(
        cls,
        image_size: tuple[int, int],
        grid: tuple[int, int],
        global_score: float | None,
        regions: list[Region],
        rule: str | Callable = "srum",
        downsample_mode: str = "bilinear",
    ) -> "RewardMap":
        """Validate scores and boxes, apply `rule` on a `(width, height)` image, and downsample to `grid`.

        Boxes are checked by [`check_box`] (malformed ones raise; ones reaching outside the image are clamped, with a
        warning). A NaN score is a missing one: a region without a score is kept in `regions` but left out of the
        map; without a global score there is no verdict on the image and the whole map is NaN (the trainers leave
        such images out).
        """
        width, height = image_size
        g = 1.0 if global_score is None else _check_score(global_score, "global score")
        checked, clamped, dropped = [], 0, 0
        for k, region in enumerate(regions):
            box, changed = check_box(region.box, width, height, where=f"region {k} box")
            if box is None:
                dropped += 1
                continue
            clamped += changed
            checked.append(Region(box, _check_score(region.score, f"region {k} score"), region.label))
        warn_clamped(clamped, dropped, width, height, "RewardMap.from_scores")
        rule_fn = MAP_RULES.get(rule) if isinstance(rule, str) else rule
        if rule_fn is None:
            raise ValueError(f"Unknown map rule {rule!r}; choose one of {sorted(MAP_RULES)} or pass a function.")
        if np.isnan(g):
            pixel = np.full((height, width), np.nan, dtype=np.float32)
        else:
            scored = [r for r in checked if not np.isnan(r.score)]
            pixel = np.asarray(rule_fn(height, width, g, scored), dtype=np.float32)
        rule_name = rule if isinstance(rule, str) else getattr(rule, "__name__", "custom")
        return cls(global_score, checked, pixel, downsample(pixel, grid, downsample_mode), rule_name)

    @property
    def local_scores(self) -> list[float]:
        return [r.score for r in self.regions]

    def to_dict(self) -> dict:
        """A JSON/Arrow-friendly dict (the pixel map is dropped; it is recomputable from the scores)."""
        return {
            "global_score": self.global_score,
            "regions": [{"box": list(r.box), "score": r.score, "label": r.label} for r in self.regions],
            "token_map": self.token_map.astype(np.float32).tolist(),
            "rule": self.rule,
        }
