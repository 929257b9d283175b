"""Run a protocol on one model or several (a base and its adapters) with the same prompts and seeds; write per-image
scores, per-category JSON and a markdown table with standard errors and paired differences."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from .protocols import OVERALL, build_protocol, load_records

PERCENT = ("shapes", "geneval")  # 0/1 scores, shown as percentages


def metric_path(name: str) -> str:
    """Folder of an `evaluate` module shipped with srum_trl (`evaluate.load(metric_path("category_score"))`)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise ValueError(f"no evaluate module {name!r} in srum_trl (have: category_score).")
    return path


def category_scores(scores: list[float], categories: list[str], groups: list[int], overall: str) -> dict:
    """Per-category means and standard errors through the shipped `category_score` evaluate module."""
    import evaluate

    metric = evaluate.load(metric_path("category_score"))
    return metric.compute(predictions=scores, references=categories, groups=groups, overall=overall)


def paired_difference(base: list[float], other: list[float], groups: list[int]) -> dict:
    """Mean of `other - base` over prompts (images of one prompt averaged first; NaN pairs left out) and its
    standard error: the two models saw the same prompts and seeds, so the error is that of the differences."""
    units: dict[int, list[float]] = {}
    for a, b, g in zip(base, other, groups):
        if not (math.isnan(a) or math.isnan(b)):
            units.setdefault(g, []).append(b - a)
    diffs = [sum(v) / len(v) for v in units.values()]
    n = len(diffs)
    if n < 2:
        return {"mean": sum(diffs) / n if n else float("nan"), "se": float("nan"), "n": n}
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return {"mean": mean, "se": se, "n": n}


@dataclass
class EvalSettings:
    """What every evaluated model shares."""

    protocol: str
    prompts: str
    out: str
    seed: int = 0
    samples_per_prompt: int = 1
    guidance_scale: float | None = None  # None: the checkpoint's own (`backend.default_generation_config()`)
    temperature: float | None = None
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"


def _name(adapter: str | None, taken: set) -> str:
    name = "base" if adapter is None else os.path.basename(os.path.normpath(adapter)) or "adapter"
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _sampling(backend, settings: EvalSettings):
    """The sampling settings: those given, else the checkpoint's own."""
    from dataclasses import replace

    config = backend.default_generation_config()
    return replace(config, batch_size=settings.batch_size,
                   guidance=config.guidance if settings.guidance_scale is None else settings.guidance_scale,
                   temperature=config.temperature if settings.temperature is None else settings.temperature)


def evaluate_models(model, adapters: list[str | None], settings: EvalSettings, options: dict | None = None,
                    save_images: bool = True, progress: bool = True) -> dict:
    """Evaluate `model` with each of `adapters` (None: the model itself) on the prompt file, the same images seeds for
    all; return (and write to `settings.out`) the results. See `srum-trl eval --help` and docs/eval.md."""
    import torch

    from ..models import load_backend

    options = dict(options or {})
    options.setdefault("device", settings.device)
    records = load_records(settings.prompts)
    protocol = build_protocol(settings.protocol, options, settings.prompts)
    protocol.prepare(records)  # bad records and checkpoints fail before any image is generated
    if settings.samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {settings.samples_per_prompt}.")
    rows = [(i, s) for i in range(len(records)) for s in range(settings.samples_per_prompt)]
    row_records = [records[i] for i, _ in rows]
    prompts = [r["prompt"] for r in row_records]
    groups = [i for i, _ in rows]
    categories = [protocol.category(r) for r in row_records]
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(settings.out, exist_ok=True)
    taken, results = set(), {}
    for adapter in adapters:
        name = _name(adapter, taken)
        backend = load_backend(model, adapter=adapter, dtype=settings.dtype,
                               attn_implementation=settings.attn_implementation)
        if adapter is not None and settings.protocol != "judge" and hasattr(backend.model, "merge_and_unload"):
            backend.model = backend.model.merge_and_unload()  # same outputs, generation as fast as the base's
        backend.model.to(device)
        config = _sampling(backend, settings)
        rollout = backend.generate(prompts, config, seed=settings.seed, progress=progress)
        scored = protocol.score(rollout.images, row_records, backend=backend)
        folder = os.path.join(settings.out, name)
        os.makedirs(folder, exist_ok=True)
        if save_images:
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            for (i, s), image in zip(rows, rollout.images):
                image.save(os.path.join(folder, "images", f"{i:05d}_{s}.png"))
        scores = [float(x["score"]) for x in scored]
        summary = category_scores(scores, categories, groups, OVERALL[settings.protocol])
        per_image = [{"line": i, "sample": s, "prompt": p, "category": c, **x}
                     for (i, s), p, c, x in zip(rows, prompts, categories, scored)]
        with open(os.path.join(folder, "scores.json"), "w") as f:
            json.dump({"model": str(model), "adapter": adapter, "summary": summary, "per_image": per_image}, f,
                      indent=1, default=str)
        results[name] = {"adapter": adapter, "summary": summary, "scores": scores}
        del backend
    names = list(results)
    report = {
        "protocol": settings.protocol, "model": str(model), "prompts": settings.prompts,
        "num_prompts": len(records), "samples_per_prompt": settings.samples_per_prompt, "seed": settings.seed,
        "guidance_scale": config.guidance, "temperature": config.temperature,
        "batch_size": settings.batch_size, "options": {k: v for k, v in options.items() if v is not None},
        "models": {n: {"adapter": r["adapter"], **r["summary"]} for n, r in results.items()},
        "differences": {n: paired_difference(results[names[0]]["scores"], results[n]["scores"], groups)
                        for n in names[1:]},
    }
    with open(os.path.join(settings.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    table = markdown_table(report)
    with open(os.path.join(settings.out, "results.md"), "w") as f:
        f.write(table + "\n")
    report["table"] = table
    report["scores"] = {n: r["scores"] for n, r in results.items()}  # per image, in prompt order (not in the JSON)
    return report


def _fmt(value: float, se: float, percent: bool, unit: str = "%") -> str:
    if math.isnan(value):
        return "n/a"
    scale, unit = (100.0, unit) if percent else (1.0, "")
    digits = 1 if percent or abs(value) >= 10 else 3
    text = f"{value * scale:.{digits}f}{unit}"
    return text if math.isnan(se) else f"{text} ± {se * scale:.{digits}f}"


def markdown_table(report: dict) -> str:
    """Rows: categories then overall; columns: each model (mean ± standard error, n images), then each model's
    paired difference from the first."""
    percent = report["protocol"] in PERCENT
    names = list(report["models"])
    first = report["models"][names[0]]
    header = ["category", *[f"{n}" for n in names]]
    lines = []
    for category, stats in first["categories"].items():
        cells = [_fmt(report["models"][n]["categories"][category]["mean"],
                      report["models"][n]["categories"][category]["se"], percent) for n in names]
        lines.append([category, *cells] + [""] * (len(names) - 1))
    overall = [_fmt(report["models"][n]["overall"], report["models"][n]["overall_se"], percent) for n in names]
    diffs = []
    for n in names[1:]:
        d = report["differences"][n]
        sign = "+" if d["mean"] >= 0 else ""
        diffs.append(sign + _fmt(d["mean"], d["se"], percent, unit=" pts") + _verdict(d))
    lines.append(["**overall**", *overall, *diffs])
    header += [f"{n} - {names[0]}" for n in names[1:]]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in lines]
    n_images = first["num_images"]
    out.append("")
    out.append(f"{report['protocol']} protocol, {report['num_prompts']} prompts x {report['samples_per_prompt']} "
               f"sample(s) = {n_images} images per model, seed {report['seed']}, guidance {report['guidance_scale']}; "
               "mean ± standard error over prompts; the difference is paired (same prompts and seeds).")
    return "\n".join(out)


def _verdict(d: dict) -> str:
    """Plain words for a paired difference: beyond two standard errors, or within noise."""
    if math.isnan(d["se"]) or d["se"] == 0:
        return ""
    z = d["mean"] / d["se"]
    return f" ({z:+.1f} SE)" if abs(z) >= 2 else f" ({z:+.1f} SE: within noise)"
