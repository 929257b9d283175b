"""Region proposers: where in an image the judge looks for local scores.

A proposer is any callable `(image, prompt) -> list of (x0, y0, x1, y1)` pixel boxes. Three are provided:
[`GridProposer`] (default, no extra model), [`SAMProposer`] (segment-anything through transformers'
mask-generation pipeline, as the SRUM paper does) and [`CallableProposer`] (wrap your own detector).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
from PIL import Image


class RegionProposer(Protocol):
    """Anything that proposes boxes `(x0, y0, x1, y1)` (pixels, end-exclusive) for an image and its prompt."""

    def __call__(self, image: Image.Image, prompt: str) -> list[tuple[int, int, int, int]]: ...


class GridProposer:
    """Split the image into a `rows x cols` grid of near-equal cells (edges at evenly spaced, rounded positions).

    Args:
        rows: number of rows. cols: number of columns (default: `rows`).
    """

    def __init__(self, rows: int = 2, cols: int | None = None):
        cols = rows if cols is None else cols
        if rows < 1 or cols < 1:
            raise ValueError(f"GridProposer needs rows >= 1 and cols >= 1, got rows={rows}, cols={cols}.")
        self.rows, self.cols = rows, cols

    def __call__(self, image: Image.Image, prompt: str = "") -> list[tuple[int, int, int, int]]:
        width, height = image.size
        xs = np.linspace(0, width, self.cols + 1).round().astype(int)
        ys = np.linspace(0, height, self.rows + 1).round().astype(int)
        return [
            (int(xs[j]), int(ys[i]), int(xs[j + 1]), int(ys[i + 1]))
            for i in range(self.rows)
            for j in range(self.cols)
            if xs[j + 1] > xs[j] and ys[i + 1] > ys[i]
        ]

    def __repr__(self) -> str:
        return f"GridProposer(rows={self.rows}, cols={self.cols})"


class CallableProposer:
    """Wrap a function `fn(image, prompt) -> boxes` (any detector) as a proposer, keeping at most `max_regions`."""

    def __init__(self, fn: Callable[[Image.Image, str], list], max_regions: int | None = None):
        self.fn, self.max_regions = fn, max_regions

    def __call__(self, image: Image.Image, prompt: str = "") -> list[tuple[int, int, int, int]]:
        boxes = list(self.fn(image, prompt))  # as given: the judge checks them (`check_box`) and names any bad one
        return boxes[: self.max_regions] if self.max_regions else boxes

    def __repr__(self) -> str:
        name = f"{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"
        return f"CallableProposer({name}, max_regions={self.max_regions})"


class SAMProposer:
    """Segment-anything boxes through transformers' `pipeline("mask-generation")`, largest masks first.

    Args:
        model: a SAM checkpoint path / Hub id (e.g. "facebook/sam-vit-huge"), or a ready mask-generation pipeline.
        max_regions: keep the `max_regions` largest masks (the SRUM reference keeps 10).
        min_area_fraction: drop masks smaller than this fraction of the image.
        pipeline_kwargs: passed to each pipeline call (e.g. `points_per_batch`, `pred_iou_thresh`).
    """

    def __init__(self, model="facebook/sam-vit-base", max_regions: int = 10, min_area_fraction: float = 0.0,
                 device=None, **pipeline_kwargs):
        if isinstance(model, str):
            from transformers import pipeline

            model = pipeline("mask-generation", model=model, device=device)
        self.pipeline = model
        self.max_regions = max_regions
        self.min_area_fraction = min_area_fraction
        self.pipeline_kwargs = pipeline_kwargs

    @staticmethod
    def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
        """Tight end-exclusive box of a boolean mask (None if the mask is empty)."""
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            return None
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def __repr__(self) -> str:
        model = getattr(getattr(self.pipeline, "model", None), "name_or_path", "pipeline")
        return (f"SAMProposer({model}, max_regions={self.max_regions}, min_area_fraction={self.min_area_fraction}, "
                f"{self.pipeline_kwargs})")

    def __call__(self, image: Image.Image, prompt: str = "") -> list[tuple[int, int, int, int]]:
        masks = self.pipeline(image, **self.pipeline_kwargs)["masks"]
        masks = sorted((np.asarray(m, dtype=bool) for m in masks), key=lambda m: -int(m.sum()))
        min_area = self.min_area_fraction * image.size[0] * image.size[1]
        boxes = []
        for mask in masks:
            box = self.mask_to_box(mask)
            if box is not None and mask.sum() >= min_area:
                boxes.append(box)
            if len(boxes) == self.max_regions:
                break
        return boxes


def build_proposer(name: str, grid: int = 2, **kwargs) -> RegionProposer:
    """Proposer from a config name: "grid" (`grid` x `grid` cells), "none" (no regions) or "sam" (kwargs to SAM)."""
    if name == "grid":
        return GridProposer(grid)
    if name == "none":
        return CallableProposer(lambda image, prompt: [])
    if name == "sam":
        return SAMProposer(**kwargs)
    raise ValueError(f"Unknown region proposer {name!r}; use 'grid', 'sam', 'none' or pass a callable.")
