"""ShapesWorld scenes for pretraining base models: rendered images with their labels, the local (crop) questions
about them, worker processes that render and score, and the pool of scenes a training stage draws from.

Shared by the Janus base (`pretrain.py`) and the BAGEL-architecture flow base (`flow_pretrain.py`): the data, its
labels and its augmentations are the same for both; only how a model reads them differs.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from .questions import CAPTION_QUESTION, all_local_questions, global_question
from .scorer import score
from .world import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    NEGATIVE_KINDS,
    SHAPES,
    ShapeObject,
    draw_objects,
    heldout_prompts,
    is_correct,
    objects_touch,
    parse_prompt,
    render,
    render_negative,
    train_prompts,
)

# Scene kinds: a correct render, one of the world's hard negatives, a render of another prompt, or a render whose
# object is stretched out of shape (aspect ratio >= 1.7, which the scorer calls "other").
KINDS = ("positive",) + NEGATIVE_KINDS + ("other_prompt", "stretched")
_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_PAIR_INDEX = {pair: i for i, pair in enumerate(_PAIRS)}


def log(start: float, message: str) -> None:
    print(f"[pretrain {time.time() - start:7.1f}s] {message}", flush=True)


class QuestionRows:
    """The question/answer row layout that both base models' pretraining tables share. Row order: the global
    question of prompt p with answer a (0 no, 1 yes) at `2 p + a`; local question q with answer a at `2 P + 2 q + a`;
    the caption of prompt p at `2 P + 2 Q + p`."""

    def question_rows(self, prompts: list[str], words, yes: int, no: int) -> list[tuple[list[int], list[int]]]:
        """`(question ids, answer ids)` in the layout's order; `words(text)` tokenizes. Sets the row offsets."""
        self.local_questions = all_local_questions()
        rows = []
        for question in [global_question(p) for p in prompts] + self.local_questions:
            q = words(question)
            rows += [(q, [no]), (q, [yes])]
        caption = words(CAPTION_QUESTION)
        rows += [(caption, words(p)) for p in prompts]
        self.num_prompts, self.num_local = len(prompts), len(self.local_questions)
        self.caption_offset = 2 * self.num_prompts + 2 * self.num_local
        return rows

    def global_row(self, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        return 2 * prompt + answer.long()

    def local_row(self, question: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        return 2 * self.num_prompts + 2 * question.long() + answer.long()

    def caption_row(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.caption_offset + prompt


def run_setup(args, scales: dict, **overrides):
    """A pretraining command's `(config, device, autocast)`: the `--scale` preset with `--time-budget-s`,
    `--workers` and the given `overrides` (None: keep the preset's) applied, the `--device` (cuda when available),
    and a bf16 autocast context on CUDA (a no-op context elsewhere)."""
    cfg = scales[args.scale]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.time_budget_s is not None:
        changes["time_budget_s"] = args.time_budget_s
    if args.workers is not None:
        changes["workers"] = args.workers
    elif cfg.workers > 0:
        changes["workers"] = max(0, min(cfg.workers, (os.cpu_count() or 1) - 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    return replace(cfg, **changes), device, autocast


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- rendering
def _inside(inner, outer) -> bool:
    return inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _stretch(objects: list[ShapeObject], rng: np.random.Generator):
    """The objects with one of them stretched to an aspect ratio in [1.7, 2.3] (same center, not touching the
    others), and that object's index; None if no object can be stretched."""
    size = IMAGE_SIZE
    for i in rng.permutation(len(objects)):
        obj = objects[int(i)]
        side = obj.box[2] - obj.box[0]
        ratio = rng.uniform(1.7, 2.3)
        long_side = min(size, int(round(side * math.sqrt(ratio))))
        short_side = max(6, int(round(long_side / ratio)))
        if long_side / short_side < 1.7:
            continue
        w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        x0 = min(max(int(round(cx - w / 2)), 0), size - w)
        y0 = min(max(int(round(cy - h / 2)), 0), size - h)
        new = ShapeObject(obj.color, obj.shape, (x0, y0, x0 + w, y0 + h))
        others = [o for k, o in enumerate(objects) if k != int(i)]
        if any(objects_touch(new, o) for o in others):
            continue
        return others[: int(i)] + [new] + others[int(i) :], int(i)
    return None


def _make_scene(prompt: str, prompts: list[str], rng: np.random.Generator, positive_fraction: float):
    """One rendered scene for `prompt`: (image, objects, indices of malformed objects, label, kind)."""
    if rng.random() < positive_fraction:
        image, objects = render(prompt, rng)
        return image, objects, set(), True, "positive"
    u = rng.random()
    if u < 0.15:
        image, objects = render(prompt, rng)
        stretched = _stretch(objects, rng)
        if stretched is not None:
            objects, index = stretched
            return draw_objects(objects), objects, {index}, False, "stretched"
    elif u < 0.35:
        other = prompts[int(rng.integers(len(prompts)))]
        image, objects = render(other, rng)
        return image, objects, set(), bool(is_correct(objects, prompt)), "other_prompt"
    image, objects, kind = render_negative(prompt, rng)
    bad = {k for k, o in enumerate(objects) if o.shape not in SHAPES}
    return image, objects, bad, False, kind


def _background_box(objects, rng: np.random.Generator, tries: int = 20):
    for _ in range(tries):
        side = int(rng.integers(10, 23))
        x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if not any(_overlaps(box, (o.box[0] - 2, o.box[1] - 2, o.box[2] + 2, o.box[3] + 2)) for o in objects):
            return box
    return None


def _local_sample(objects, bad: set, rng: np.random.Generator, background_fraction=0.1, true_fraction=0.6):
    """A (crop box, local question index, label) around one object (or of empty background)."""
    if rng.random() < background_fraction:
        box = _background_box(objects, rng)
        if box is not None:
            return box, int(rng.integers(len(_PAIRS))), False
    obj = objects[int(rng.integers(len(objects)))]
    pads = rng.integers(1, 4, size=4)
    x0, y0, x1, y1 = obj.box
    box = (
        max(0, x0 - int(pads[0])),
        max(0, y0 - int(pads[1])),
        min(IMAGE_SIZE, x1 + int(pads[2])),
        min(IMAGE_SIZE, y1 + int(pads[3])),
    )
    own = (obj.color, obj.shape if obj.shape in SHAPES else "square")
    if rng.random() < true_fraction:
        pair = own
    else:
        v = rng.random()
        if v < 0.35:
            pair = (own[0], str(rng.choice([s for s in SHAPES if s != own[1]])))
        elif v < 0.7:
            pair = (str(rng.choice([c for c in COLORS if c != own[0]])), own[1])
        else:
            pair = _PAIRS[int(rng.choice([k for k in range(len(_PAIRS)) if _PAIRS[k] != own]))]
    label = any(
        k not in bad and (o.color, o.shape) == pair and _inside(o.box, box) for k, o in enumerate(objects)
    )
    return box, _PAIR_INDEX[pair], label


def _prompts_by_category(prompts: list[str]) -> list[list[int]]:
    by_category = {c: [] for c in CATEGORIES}
    for i, p in enumerate(prompts):
        by_category[parse_prompt(p).category].append(i)
    return [v for v in by_category.values() if v]


def render_scenes(job: tuple) -> dict[str, np.ndarray]:
    """Render a chunk of scenes (run in worker processes).

    `job = (seed, n, split, positive_fraction, local_slots)`; prompts are drawn category-uniformly from `split`
    ("train" or "heldout"). Returns arrays: `images` [n, 64, 64, 3] uint8, `prompt` (index into the split's prompt
    list), `label` (the image is correct for the prompt), `kind` (index into `KINDS`) and, per local slot,
    `local_box` [n, slots, 4], `local_q` (index into `all_local_questions()`), `local_label`, `local_valid`.
    """
    seed, n, split, positive_fraction, slots = job
    prompts = train_prompts() if split == "train" else heldout_prompts()
    groups = _prompts_by_category(prompts)
    rng = np.random.default_rng(seed)
    out = {
        "images": np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "prompt": np.zeros(n, np.int32),
        "label": np.zeros(n, bool),
        "kind": np.zeros(n, np.int8),
        "local_box": np.zeros((n, slots, 4), np.int16),
        "local_q": np.zeros((n, slots), np.int16),
        "local_label": np.zeros((n, slots), bool),
        "local_valid": np.zeros((n, slots), bool),
    }
    for i in range(n):
        group = groups[int(rng.integers(len(groups)))]
        p = group[int(rng.integers(len(group)))]
        image, objects, bad, label, kind = _make_scene(prompts[p], prompts, rng, positive_fraction)
        out["images"][i] = np.asarray(image)
        out["prompt"][i], out["label"][i], out["kind"][i] = p, label, KINDS.index(kind)
        if kind == "merged" or not objects:
            continue
        for k in range(slots):
            box, q, lab = _local_sample(objects, bad, rng)
            out["local_box"][i, k], out["local_q"][i, k] = box, q
            out["local_label"][i, k], out["local_valid"][i, k] = lab, True
    return out


def score_job(job: tuple):
    """Score one `(image array, prompt)` pair with the exact scorer (run in worker processes)."""
    image, prompt = job
    return score(image, prompt)


def concat_arrays(chunks: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class Workers:
    """A fork-based process pool for rendering and scoring; with `n == 0` everything runs in-process."""

    def __init__(self, n: int):
        self.n = n
        self.pool = multiprocessing.get_context("fork").Pool(n) if n > 0 else None

    def map(self, fn, jobs, chunksize: int = 1) -> list:
        """`[fn(j) for j in jobs]`, in parallel when there are workers."""
        if self.pool is None:
            return [fn(j) for j in jobs]
        return self.pool.map(fn, jobs, chunksize=chunksize)

    def map_async(self, fn, jobs, chunksize: int = 1):
        """Start `map` in the background; `.get()` of the result waits for it (in-process: runs now)."""
        if self.pool is None:
            return _Done([fn(j) for j in jobs])
        return self.pool.map_async(fn, jobs, chunksize=chunksize)

    def close(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def scene_jobs(seed: int, stage: int, total: int, chunk: int, split: str, positive_fraction: float, slots: int):
    jobs, start = [], 0
    while start < total:
        n = min(chunk, total - start)
        jobs.append(((seed, stage, len(jobs)), n, split, positive_fraction, slots))
        start += n
    return jobs


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float in [-1, 1] (Janus' VQ pixel range)."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_u8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounding exactly as `JanusBackend.decode` does."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5)."""
    a, t = -0.5, t.abs()
    inner = ((a + 2) * t - (a + 3)) * t * t + 1
    outer = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))


def resize_weights(start, length, out_length, offset, size: int, n_in: int):
    """Per-sample [B, size, n_in] matrices of PIL's bicubic resize of `[start, start + length)` to `out_length`
    pixels placed at `offset` of a `size` canvas (rows outside the placed range are zero), and the valid rows."""
    device, dtype = start.device, torch.float32
    rel = torch.arange(size, device=device, dtype=dtype)[None] - offset[:, None]
    scale = length / out_length
    support_scale = scale.clamp(min=1.0)
    center = (rel + 0.5) * scale[:, None]
    source = torch.arange(n_in, device=device, dtype=dtype)[None] - start[:, None]
    t = (source[:, None, :] + 0.5 - center[:, :, None]) / support_scale[:, None, None]
    weights = bicubic(t) * ((source >= 0) & (source < length[:, None]))[:, None, :]
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    valid = (rel >= 0) & (rel < out_length[:, None])
    return weights * valid[:, :, None], valid


# ---------------------------------------------------------------------------------------------- scene pool
class ScenePool:
    """Rendered scenes on the training device, with their image codes (VQ tokens or latents) and the images that
    the model's own image tokenizer gives back (`recon`) once it is trained."""

    def __init__(self, arrays: dict[str, np.ndarray], device):
        self.images = torch.from_numpy(arrays["images"]).to(device)
        self.prompt = torch.from_numpy(arrays["prompt"]).long().to(device)
        self.label = torch.from_numpy(arrays["label"]).to(device)
        self.kind = torch.from_numpy(arrays["kind"]).long().to(device)
        self.local_box = torch.from_numpy(arrays["local_box"]).long().to(device)
        self.local_q = torch.from_numpy(arrays["local_q"]).long().to(device)
        self.local_label = torch.from_numpy(arrays["local_label"]).to(device)
        self.local_valid = torch.from_numpy(arrays["local_valid"]).to(device)
        self.tokens: torch.Tensor | None = None
        self.recon: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @torch.no_grad()
    def encode(self, roundtrip, batch: int) -> None:
        """Fill `tokens` and `recon` from `roundtrip(images_u8) -> (codes, reconstructed uint8 images)`, run on
        chunks of `batch` images."""
        tokens, recon = [], []
        for chunk in self.images.split(batch):
            t, r = roundtrip(chunk)
            tokens.append(t)
            recon.append(r)
        self.tokens, self.recon = torch.cat(tokens), torch.cat(recon)

    def augmented(self, scenes: torch.Tensor, recon_prob: float, noise_prob: float, noise_sigma_max: float,
                  generator) -> torch.Tensor:
        """The scenes' images as float `[n, 3, H, W]` in 0..255 (whole numbers): a `recon_prob` share shown as the
        image tokenizer gives them back, a `noise_prob` share with gaussian pixel noise of std up to
        `noise_sigma_max`."""
        n = len(scenes)
        images = self.images[scenes]
        if self.recon is not None and recon_prob > 0:
            use = torch.rand(n, device=images.device, generator=generator) < recon_prob
            images = torch.where(use[:, None, None, None], self.recon[scenes], images)
        x = images.permute(0, 3, 1, 2).float()
        noisy = torch.rand(n, device=x.device, generator=generator) < noise_prob
        sigma = torch.rand(n, device=x.device, generator=generator) * noise_sigma_max * noisy
        x = (x + sigma[:, None, None, None] * torch.randn(x.shape, device=x.device, generator=generator)).clamp(0, 255)
        return x.round()

    def draw(self, strata: dict, und_batch: int, cap_batch: int, generator):
        """A balanced understanding batch from `strata` (the same number of global yes / no and local yes / no
        items, `und_batch` in all) followed by `cap_batch` captions: (scenes, text rows, crop boxes, yes/no count)."""
        names = [k for k in ("global_yes", "global_no", "local_yes", "local_no") if len(strata[k][0])]
        parts = []
        for name in names:
            scenes, rows, boxes = strata[name]
            pick = torch.randint(0, len(scenes), (und_batch // len(names),), device=scenes.device, generator=generator)
            parts.append((scenes[pick], rows[pick], boxes[pick]))
        n_und = sum(len(p[0]) for p in parts)
        if cap_batch and len(strata["caption"][0]):
            scenes, rows, boxes = strata["caption"]
            pick = torch.randint(0, len(scenes), (cap_batch,), device=scenes.device, generator=generator)
            parts.append((scenes[pick], rows[pick], boxes[pick]))
        scenes, rows, boxes = (torch.cat(x) for x in zip(*parts))
        return scenes, rows, boxes, n_und

    def strata(self, tables) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Understanding items per stratum: (scene index, text row, crop box). `tables` numbers the text rows:
        `global_row(prompt, answer)`, `local_row(question, answer)`, `caption_row(prompt)`."""
        device = self.images.device
        full = torch.tensor([0, 0, IMAGE_SIZE, IMAGE_SIZE], device=device)
        scenes = torch.arange(len(self), device=device)
        out = {}
        for name, want in (("global_yes", True), ("global_no", False)):
            idx = scenes[self.label == want]
            out[name] = (idx, tables.global_row(self.prompt[idx], torch.full_like(idx, int(want))),
                         full.expand(len(idx), 4))
        valid = self.local_valid
        slot_scene = scenes[:, None].expand_as(valid)
        for name, want in (("local_yes", True), ("local_no", False)):
            sel = valid & (self.local_label == want)
            idx = slot_scene[sel]
            out[name] = (idx, tables.local_row(self.local_q[sel], self.local_label[sel]), self.local_box[sel])
        pos = scenes[self.label & (self.kind == 0)]
        out["caption"] = (pos, tables.caption_row(self.prompt[pos]), full.expand(len(pos), 4))
        return out


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    ramp = min(1.0, (step + 1) / max(1, warmup))
    progress = min(max(progress, 0.0), 1.0)
    return ramp * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def score_images(workers: Workers, images: list[np.ndarray], prompts: list[str]) -> list:
    """Scorer results of `images` against `prompts`, computed by the workers."""
    jobs = list(zip(images, prompts))
    return workers.map(score_job, jobs, chunksize=max(1, len(jobs) // (4 * max(1, workers.n))))


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


