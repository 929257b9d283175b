"""Per-token credit for SRUM: how judged reward maps become loss weights, compared like with like.

Every function here is a pure tensor rule over one round of rollouts (all processes' rows, gathered), so it is
tested against hand computations and shared by the trainers. Rows are grouped by their prompt: the
`num_generations` images of one prompt form a group.

- [`prompt_baselines`]: per image, the mean of a per-image value over its prompt's images (SRUM's
  `reward_baseline="prompt"`).
- [`position_baselines`]: per image and token, the mean over the prompt's images of the weight at the same token
  position (`reward_baseline="position"`): a background that every image of the prompt shares carries no weight,
  where subtracting one number per image would give it a negative one.
- [`object_credit`]: region credit tied to what a region is about (`local_credit="object"`): each judged region's
  score against the mean score of the regions with the same label (the local question that scored best) in the
  prompt's *other* images, spread over the tokens that the region covers and over no other token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _nanmean(values) -> float:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else math.nan


def prompt_groups(prompts: list[str]) -> list[list[int]]:
    """Row indices grouped by prompt, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return list(groups.values())


def prompt_baselines(prompts: list[str], image_means: list[float]) -> list[float]:
    """Per image, the mean of `image_means` over the images of the same prompt (NaN values left out)."""
    out = [math.nan] * len(prompts)
    for rows in prompt_groups(prompts):
        mean = _nanmean(image_means[i] for i in rows)
        for i in rows:
            out[i] = mean
    return out


def position_baselines(prompts: list[str], weights: torch.Tensor) -> torch.Tensor:
    """`[N, T]`: for each row and token position, the mean of `weights[:, t]` over the rows of the same prompt."""
    out = torch.empty_like(weights, dtype=torch.float32)
    for rows in prompt_groups(prompts):
        index = torch.tensor(rows, dtype=torch.long, device=weights.device)
        out[index] = weights[index].float().mean(dim=0, keepdim=True)
    return out


def region_cover(box, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """`[h * w]`: the share of each token's pixels that `box` = (x0, y0, x1, y1) covers (row-major token order).

    `image_size` is `(width, height)` in pixels, `grid` the token grid `(h, w)`; a token covers an equal block of
    pixels. The exact area mean of the box's indicator, so a box smaller than a token still counts.
    """
    width, height = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = torch.zeros(1, 1, height, width)
    mask[..., max(0, y0):min(height, y1), max(0, x0):min(width, x1)] = 1.0
    return F.adaptive_avg_pool2d(mask, tuple(grid)).reshape(-1)


def object_credit(
    prompts: list[str],
    regions: list[list[tuple[str, float, tuple]]],
    image_size: tuple[int, int],
    grid: tuple[int, int],
) -> torch.Tensor:
    """`[N, h * w]` credit of judged regions against the same object in the prompt's other images.

    Args:
        prompts: the prompt of each row (rows of one prompt form a group).
        regions: per row, its judged regions as `(label, score, box)`; `label` names what the region was judged
            to be (e.g. the local question that scored best), `score` is in [-1, 1], `box` in pixels.
        image_size: `(width, height)` of the images; `grid`: the token grid `(h, w)`.

    A region's credit is `score - b`, with `b` the mean score of the regions with the same label in the other
    rows of its group (leave-one-out, so the region's own score is not in its baseline); a region whose label
    appears in no other row of the group gets no credit (nothing to compare it with). Each token receives the
    coverage-weighted mean of the credits of the regions that cover it (`sum_k c_k a_k / max(1, sum_k c_k)`, with
    `c_k` the share of the token that region k covers): 0 outside every region.
    """
    n, tokens = len(prompts), grid[0] * grid[1]
    if len(regions) != n:
        raise ValueError(f"object_credit got {len(regions)} region lists for {n} prompts.")
    credit = torch.zeros(n, tokens)
    for rows in prompt_groups(prompts):
        # per label, the (row, score) pairs of the group
        by_label: dict[str, list[tuple[int, float]]] = {}
        for i in rows:
            for label, score, _ in regions[i]:
                by_label.setdefault(label, []).append((i, float(score)))
        for i in rows:
            total = torch.zeros(tokens)
            cover_sum = torch.zeros(tokens)
            for label, score, box in regions[i]:
                others = [s for j, s in by_label[label] if j != i]
                if not others:
                    continue
                cover = region_cover(box, image_size, grid)
                total += cover * (float(score) - float(np.mean(others)))
                cover_sum += cover
            credit[i] = total / cover_sum.clamp(min=1.0)
    return credit
