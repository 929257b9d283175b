"""Metrics of a pretrained ShapesWorld base model, shared by the Janus base (`pretrain.py`) and the flow base
(`flow_pretrain.py`): generation accuracy by the exact scorer under several sampler settings, the agreement of the
judge's global P(yes) with the scorer on the model's own images, and yes/no understanding on fresh renders.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
from PIL import Image

from ..models.base import GenerationConfig
from .questions import all_local_questions, global_question
from .scenes import Workers, log, score_images
from .scorer import accuracy_by_category


def auc(scores, labels) -> float | None:
    """Area under the ROC curve of `scores` for boolean `labels` (ties count half); None with a single class."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def agreement(p_yes, correct) -> dict:
    """How the judge's P(yes) agrees with the scorer's verdicts: accuracy at 0.5, AUC, count, share correct."""
    p, c = np.asarray(p_yes, dtype=np.float64), np.asarray(correct, dtype=bool)
    return {"accuracy": float(np.mean((p > 0.5) == c)) if len(c) else None, "auc": auc(p, c), "n": int(len(c)),
            "scorer_correct_fraction": float(c.mean()) if len(c) else None}


def understanding_items(arrays: dict[str, np.ndarray], prompts: list[str]):
    """(images, questions, labels, kinds) of global and local yes/no items of rendered scenes (PIL crops)."""
    local_questions = all_local_questions()
    images, questions, labels, kinds = [], [], [], []
    for i in range(len(arrays["images"])):
        image = Image.fromarray(arrays["images"][i])
        images.append(image)
        questions.append(global_question(prompts[arrays["prompt"][i]]))
        labels.append(bool(arrays["label"][i]))
        kinds.append("global")
        for k in np.nonzero(arrays["local_valid"][i])[0]:
            images.append(image.crop(tuple(int(v) for v in arrays["local_box"][i, k])))
            questions.append(local_questions[arrays["local_q"][i, k]])
            labels.append(bool(arrays["local_label"][i, k]))
            kinds.append("local")
    return images, questions, labels, kinds


def evaluate_generation(backend, workers: Workers, prompts: list[str], settings: dict[str, dict], seed: int,
                        batch_size: int, autocast=nullcontext, start: float | None = None) -> dict:
    """Scorer accuracy per category of the model's images for each sampler setting, and the judge's agreement.

    `settings` maps a label to `{"guidance": w, **backend attributes}` (e.g. `timestep_shift`), set on the backend
    while that setting samples. Every setting samples the same prompts with the same seed. Returns
    `{"generation": {label: accuracy by category}, "judge_agreement": {"pooled": ..., "per_setting": ...}}`.
    """
    questions = [global_question(p) for p in prompts]
    generation, per_setting, all_p, all_c = {}, {}, [], []
    for label, setting in settings.items():
        t = time.time()
        attributes = {k: v for k, v in setting.items() if k != "guidance"}
        previous = {k: getattr(backend, k) for k in attributes}
        try:
            for k, v in attributes.items():
                setattr(backend, k, v)
            with autocast():
                rollout = backend.generate(prompts, GenerationConfig(guidance=setting["guidance"],
                                                                     batch_size=batch_size), seed=seed)
                p_yes = backend.yes_probability(rollout.images, questions).tolist()
        finally:
            for k, v in previous.items():
                setattr(backend, k, v)
        results = score_images(workers, [np.asarray(im) for im in rollout.images], prompts)
        generation[label] = accuracy_by_category(results)
        correct = [r.correct for r in results]
        per_setting[label] = agreement(p_yes, correct)
        all_p += p_yes
        all_c += correct
        if start is not None:
            log(start, f"eval: {label}: generation {generation[label]} judge {per_setting[label]} "
                       f"({time.time() - t:.1f}s)")
    return {"generation": generation, "judge_agreement": {"pooled": agreement(all_p, all_c),
                                                          "per_setting": per_setting}}


def evaluate_understanding(backend, arrays: dict[str, np.ndarray], recon_images: np.ndarray, prompts: list[str],
                           recon_name: str, autocast=nullcontext) -> dict:
    """Yes/no accuracy on the scenes `arrays` (global and local items) as rendered ("clean") and as the model's
    image tokenizer gives them back (`recon_images`, named `recon_name`); `accuracy` pools every item of both."""
    images, questions, labels, kinds = understanding_items(arrays, prompts)
    recon, _, _, _ = understanding_items({**arrays, "images": recon_images}, prompts)
    out, correct_all = {}, []
    for view, view_images in (("clean", images), (recon_name, recon)):
        with autocast():
            p_yes = backend.yes_probability(view_images, questions).numpy()
        right = (p_yes > 0.5) == np.asarray(labels)
        correct_all.append(right)
        for kind in ("global", "local"):
            sel = np.asarray(kinds) == kind
            out[f"{kind}_{view}"] = float(right[sel].mean())
    out["n_items"] = len(labels)
    out["yes_fraction"] = float(np.mean(labels))
    out["accuracy"] = float(np.concatenate(correct_all).mean())
    return out
