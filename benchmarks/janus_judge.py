#!/usr/bin/env python
"""GPU benchmark of the self-judge in logits mode (`UMMJudgeRewardFunction(mode="logits")`) at Janus-Pro-1B
dimensions with random bf16 weights (no download), against a plain transformers forward of the same model.

Needs torch, transformers, peft, accelerate, trl, datasets; `srum_trl` is imported from this checkout.

    # one GPU (bf16, SDPA, 384 px images, 576 image tokens, ~40-token question), batch 64
    python benchmarks/janus_judge.py --out janus_judge_1b.json

    # plumbing check on the CPU with tiny dimensions (seconds); the host profile still uses 384 px images
    python benchmarks/janus_judge.py --smoke --out /tmp/janus_judge_smoke.json

What is timed (after one warm-up call each, `torch.cuda.synchronize` around every call, `--repeat` calls):

* `baseline`: `JanusForConditionalGeneration(input_ids, attention_mask, pixel_values, logits_to_keep=1,
  use_cache=False)` on one batch of inputs that the processor made beforehand and that already sit on the GPU
  (pixel values in bf16). Only the GPU forward is timed: no image or text processing.
* `ours (global)`: `judge.judge(images, prompts, grid)` exactly as `SRUMTrainer._judge` calls it, on PIL images and
  prompts, with the global question only (`use_local=False`): question formatting, the processor (PIL resize,
  rescale, normalise; tokenizer), the copy to the GPU, `JanusBackend.yes_probability` in chunks of
  `understanding_batch_size` (library default 32), the reward maps.
* `ours (global + local)`: the same with the default grid proposer (2 x 2 cells, crops): 1 + 4 questions per image.
* `ours: judge from device pixels, global` and `..., global + local`: the judge calls that the trainers make inside
  the real pipeline, `judge.judge(images, prompts, grid, pixels=rollout.pixels)`, with the images also given as the
  uint8 `[B, H, W, 3]` tensor on the GPU that Janus `generate` leaves in `Rollout.pixels` (made before timing): the
  whole image and the crop boxes are views of that tensor, cropped, resized (Pillow's algorithm in torch) and
  normalised on the GPU; no PIL image is converted or cropped.

`img/s` = images judged per second; `q/s` = questions (forward rows) per second; `crops/s` = local questions per
second. `LM TFLOP/s` (baseline) = language-model FLOPs of one batch (2 x non-embedding parameters x tokens +
4 x layers x hidden x length^2 per row for attention, full square counted, + the last-position lm_head) over the
time of the whole forward (the vision tower included, so it is a lower bound on the language model's own rate).

Before its rows are timed, the device pixel path is checked on the benchmark's device: its float32 pixel values for
the whole images and the 2 x 2 crops against the processor's on the PIL images and PIL crops (`info.device_pixels`:
max |diff|, expected 0); its rows also give the largest score difference from the PIL rows
(`max_abs_diff_vs_pil_path`).

`host prep %` (the breakdown of one extra, instrumented call): the time spent in `_understanding_inputs` (input
preparation: host work and its device kernels, the device synchronised before and after each chunk so that no
forward is counted in it) over that call's total.

A host profile (CPU only, real 384 px dimensions, also in `--smoke`) times, per image, each host-side stage of the
judge: the processor call of `_understanding_inputs`, its image and text parts, a 192 px crop upsampled by the
processor, the grid proposer + reward map; it gives the host-bound ceiling of the judge on one thread of this CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import janus_rollouts as jr  # noqa: E402  (model builder, timing and memory helpers)
from janus_rollouts import matmul_rate, peak_gib, release, sync  # noqa: E402,F401  (also used by janus_train)

# vocabulary of the offline WordLevel tokenizer: the words of the judge's questions ("yes" and "no" must be single
# tokens) and of the random prompts; words glued to punctuation become <unk>, which costs the same
WORDS = ("does this image match the description answer yes or no part of an for show what asks well rendered "
         "a photo red green blue yellow black white cat dog car bus tree house person chair table cup bottle clock "
         "two three four left right above below next to on in small large wooden metal glass painting sunset city "
         "street mountain river and with near under behind front").split()

NOMINAL_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16, for reference


# ---------------------------------------------------------------------------------------------- shared helpers
def device_setup(args, parser):
    """(device, dtype, model size) of a run: CUDA in bf16, or with --smoke the CPU in float32, single-threaded
    (tiny tensors: more threads only add contention and OpenMP spin-waits on a busy CPU)."""
    import torch

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke on the CPU")
    if args.smoke:
        torch.set_num_threads(1)
    return device, (torch.float32 if args.smoke else torch.bfloat16), ("smoke" if args.smoke else args.model)


def build_janus(size: str, device, dtype, seed: int = 0):
    """A random Janus model of the given size (janus_rollouts' builder) with the judge's vocabulary: model,
    processor and a `JanusBackend` with library defaults."""
    import srum_trl.models.janus as janus

    model, processor, backend = jr.build(janus, size, device, dtype, words=WORDS, seed=seed)
    assert backend.image_size == (32 if size == "smoke" else 384)
    return model, processor, backend


def prompts_for(n: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[21:]) for _ in range(words)) for _ in range(n)]


def random_images(n: int, size: int, seed: int = 0):
    """`n` RGB noise images of `size` px (what the judge sees does not change its cost)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def time_calls(fn, device, warmup: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def environment(device, dtype, **extra) -> dict:
    """Device, versions, date and command line, for the JSON."""
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return dict(device=name, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                trl=trl.__version__, accelerate=accelerate.__version__, python=platform.python_version(),
                dtype=str(dtype), date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=jr.command_line(), cpu_threads=torch.get_num_threads(), **extra)


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path, payload) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {path}")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------- judge FLOPs
def judge_flops(model, rows: int, length: int, image_tokens: int) -> dict:
    """Forward FLOPs of one judge batch: language model, lm_head at the last position, vision tower + aligner."""
    lm = model.model.language_model
    c = lm.config
    lm_params = n_params(lm) - lm.embed_tokens.weight.numel()
    lm_flops = rows * (2 * lm_params * length + 4 * c.num_hidden_layers * c.hidden_size * length**2)
    head_flops = rows * 2 * model.lm_head.weight.numel()
    v, vc = model.model.vision_model, model.config.vision_config
    vision_flops = rows * (2 * n_params(v) * image_tokens + 4 * vc.num_hidden_layers * vc.hidden_size * image_tokens**2
                           + 2 * n_params(model.model.aligner) * image_tokens)
    return dict(lm_flops=lm_flops + head_flops, vision_flops=vision_flops,
                total_flops=lm_flops + head_flops + vision_flops, lm_params=lm_params, vision_params=n_params(v))


# ------------------------------------------------------------------------------------------------------- paths
def run_baseline(model, backend, images, questions, device, dtype, warmup, repeat) -> tuple[dict, object]:
    """Plain transformers forward on inputs prepared beforehand (on the device, pixel values in the model dtype)."""
    import torch

    enc = backend.processor(text=[backend.format_question(q) for q in questions], images=images,
                            return_tensors="pt", padding=True)
    inputs = {k: v.to(device) for k, v in enc.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def forward():
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]

    times = time_calls(forward, device, warmup, repeat)
    logits = forward().float()
    yes, no = torch.logsumexp(logits[:, backend._yes_ids], -1), torch.logsumexp(logits[:, backend._no_ids], -1)
    p_yes = torch.sigmoid(yes - no)  # what yes_probability computes
    return dict(times_s=times, rows=len(images), length=inputs["input_ids"].shape[1]), p_yes.cpu()


def run_ours(judge, images, prompts, grid, device, warmup, repeat, pixels=None) -> tuple[dict, list]:
    """The judge as the trainer calls it (`SRUMTrainer._judge` -> `judge.judge(images, prompts, grid)`, with
    `pixels=rollout.pixels` for the device pixel path)."""
    questions_before = judge.stats["questions"]
    times = time_calls(lambda: judge.judge(images, prompts, grid, pixels=pixels), device, warmup, repeat)
    questions = (judge.stats["questions"] - questions_before) // (warmup + repeat)
    maps = judge.judge(images, prompts, grid, pixels=pixels)
    return dict(times_s=times, rows=questions), maps


def ours_breakdown(judge, images, prompts, grid, device, pixels=None) -> dict:
    """One instrumented call: input preparation (`_understanding_inputs`: processor or fast path, copy to the
    device; the device synchronised before and after it, so that only its own work is counted) against the rest
    (the forwards, the P(yes) read back, the reward maps). The wrapper lives on this backend object only."""
    backend, spent = judge.backend, []
    original = backend._understanding_inputs

    def timed_inputs(*args, **kwargs):
        sync(device)  # the previous chunk's forward is not preparation
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        spent.append(time.perf_counter() - start)
        return out

    backend._understanding_inputs = timed_inputs
    try:
        (total,) = time_calls(lambda: judge.judge(images, prompts, grid, pixels=pixels), device, 0, 1)
    finally:
        del backend._understanding_inputs  # back to the class's method
    return dict(total_s=total, host_preprocessing_s=sum(spent), chunks=len(spent),
                preprocessing_fraction=sum(spent) / total)


def device_pixels(images, device):
    """The images as `Rollout.pixels` holds them: uint8 `[B, H, W, 3]` on the device."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).to(device)


def check_device_pixels(backend, images, pixels, grid_cells: int = 2) -> dict:
    """On the benchmark's device: the pixel values that the device path makes from `pixels` (whole images and the
    grid proposer's crops) against the processor's on the PIL images and crops (float32, max |diff|)."""
    import torch

    from srum_trl.models.base import PixelViews
    from srum_trl.rewards import GridProposer

    n = min(len(images), 4)
    boxes = GridProposer(grid_cells)(images[0])
    index = list(range(n)) + [i for i in range(n) for _ in boxes]
    views = PixelViews(pixels, index, [None] * n + boxes * n)
    fast, kinds = backend.input_builder.fast_pixels(views)
    pil = [images[i] if b is None else images[i].crop(b) for i, b in zip(views.index, views.boxes)]
    ref = backend.processor.image_processor(pil, return_tensors="pt")["pixel_values"]
    diff = (fast.float().cpu() - ref).abs().amax(dim=(1, 2, 3))
    return dict(rows=len(index), kinds=sorted(set(kinds)), max_abs_diff_whole=float(diff[:n].max()),
                max_abs_diff_crops=float(diff[n:].max()), identical=bool(torch.equal(fast.float().cpu(), ref)))


def max_score_diff(maps_a, maps_b) -> float:
    """Largest |difference| between two judgements' global and region scores."""
    diffs = [0.0]
    for a, b in zip(maps_a, maps_b):
        if a.global_score is not None:
            diffs.append(abs(a.global_score - b.global_score))
        diffs += [abs(r.score - q.score) for r, q in zip(a.regions, b.regions)]
    return max(diffs)


def host_profile(n: int) -> dict:
    """Per-image (per-crop) milliseconds of each host-side stage of the judge at real dimensions (384 px, 576 image
    tokens), on the CPU whatever the benchmark's device, and the host-bound ceiling they imply on one thread."""
    import torch
    from transformers import JanusImageProcessorPil, JanusProcessor

    from srum_trl.models.janus import JanusBackend, build_tokenizer
    from srum_trl.rewards import GridProposer, Region, RewardMap

    tokenizer = build_tokenizer(WORDS)
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(size={"height": 384, "width": 384}),
                               tokenizer=tokenizer, num_image_tokens=576)
    backend = JanusBackend(torch.nn.Linear(1, 1), processor)  # a CPU stand-in: only the model's device is read
    images, prompts = random_images(n, 384, seed=1), prompts_for(n, 28, seed=1)
    questions = [f'Does this image match the description "{p}"? Answer yes or no.' for p in prompts]
    expanded = [backend.format_question(q).replace(processor.image_token, processor.image_start_token
                                                   + processor.image_token * 576 + processor.image_end_token)
                for q in questions]
    grid = GridProposer(2)

    def maps():
        for im in images:
            RewardMap.from_scores(im.size, (24, 24), 0.1, [Region(tuple(b), 0.2) for b in grid(im)])

    stages = {
        "global question: _understanding_inputs (text + 384 px image)": (
            lambda: backend._understanding_inputs(images, questions)),
        "  of which the image processor (PIL resize, rescale, normalise, float32)": (
            lambda: processor.image_processor(images, return_tensors="pt")),
        "  of which the tokenizer (576 placeholders expanded)": (
            lambda: tokenizer(expanded, return_tensors="pt", padding=True)),
        "local question: crop + _understanding_inputs (192 px crop upsampled to 384)": (
            lambda: backend._understanding_inputs([im.crop((0, 0, 192, 192)) for im in images], questions)),
        "grid proposer + reward map per image (2 x 2, bilinear)": maps,
    }
    cpu = torch.device("cpu")
    ms = {name: 1e3 * min(time_calls(fn, cpu, 1, 3)) / n for name, fn in stages.items()}
    names = list(stages)
    per_global = ms[names[0]] + ms[names[4]]
    per_local = per_global + 4 * ms[names[3]]
    return dict(images=n, ms_per_image=ms, pixel_values_bytes_per_image_float32=3 * 384 * 384 * 4,
                pixel_values_bytes_per_image_uint8=3 * 384 * 384, host_ms_per_image_global=per_global,
                host_ms_per_image_global_local=per_local, host_bound_img_per_s_global=1e3 / per_global,
                host_bound_img_per_s_global_local=1e3 / per_local)


def judge_builds_kv_cache(backend) -> bool:
    """Whether the forward that `yes_probability` runs (no `use_cache` given) builds a K/V cache it never reads."""
    import torch

    size = backend.image_size
    enc = backend._understanding_inputs(random_images(1, size), ["Does this image match? Answer yes or no."])
    with torch.no_grad():
        from srum_trl.models._compat import output_cache

        return output_cache(backend.core(**enc, logits_to_keep=1)) is not None


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b", choices=["1b", "7b"])
    parser.add_argument("--batch", type=int, default=64, help="images per judge call")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls of the baseline and the global judge")
    parser.add_argument("--local-repeat", type=int, default=2, help="timed calls of the global + local judge")
    parser.add_argument("--prompt-words", type=int, default=28, help="words per prompt (question ~ words + 10 tokens)")
    parser.add_argument("--judge-chunk", type=int, default=None,
                        help="JanusBackend.understanding_batch_size (default: the library's, 32)")
    parser.add_argument("--host-images", type=int, default=None, help="images of the host profile (default 32)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the device-pixel judge with `JanusBackend.compile_understanding` (torch.compile)")
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU (plumbing check)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    from srum_trl.rewards import UMMJudgeRewardFunction

    device, dtype, size = device_setup(args, parser)
    batch = min(args.batch, 8) if args.smoke else args.batch
    repeat, local_repeat = (2, 1) if args.smoke else (args.repeat, args.local_repeat)
    peak = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 256, repeat=20)
    info = environment(device, dtype, model=size, batch=batch, measured_matmul_tflops=peak / 1e12,
                       nominal_bf16_tflops=NOMINAL_BF16_TFLOPS, smoke=args.smoke)
    print(f"{info['device']}: matmul {peak / 1e12:.1f} TFLOP/s measured (nominal dense bf16 {NOMINAL_BF16_TFLOPS:.0f})")

    model, processor, backend = build_janus(size, device, dtype)
    if args.judge_chunk:
        backend.understanding_batch_size = args.judge_chunk
    info.update(understanding_batch_size=backend.understanding_batch_size, image_processor=type(
        processor.image_processor).__name__, attn_implementation=model.config.text_config._attn_implementation,
        vision_attn_implementation=model.config.vision_config._attn_implementation)
    images = random_images(batch, backend.image_size)
    prompts = prompts_for(batch, args.prompt_words)
    grid = backend.token_grid
    global_judge = UMMJudgeRewardFunction(backend, mode="logits", use_local=False)
    local_judge = UMMJudgeRewardFunction(backend, mode="logits", region_proposer="grid", region_grid=2)
    questions = [global_judge._global_question(p) for p in prompts]
    results = []

    release(device)
    base, p_yes = run_baseline(model, backend, images, questions, device, dtype, 1, repeat)
    base.update(path="baseline (transformers forward)", peak_gib=peak_gib(device),
                **judge_flops(model, batch, base["length"], backend.num_image_tokens))
    results.append(base)
    release(device)
    ours, maps = run_ours(global_judge, images, prompts, grid, device, 1, repeat)
    ours.update(path="ours: judge, global", peak_gib=peak_gib(device),
                breakdown=ours_breakdown(global_judge, images, prompts, grid, device),
                max_abs_diff_vs_baseline=float((torch.tensor([2 * p - 1 for p in p_yes.tolist()]) - torch.tensor(
                    [m.global_score for m in maps])).abs().max()))
    results.append(ours)
    release(device)
    local, local_maps = run_ours(local_judge, images, prompts, grid, device, 1, local_repeat)
    local.update(path="ours: judge, global + local (2x2 crops)", peak_gib=peak_gib(device),
                 breakdown=ours_breakdown(local_judge, images, prompts, grid, device))
    results.append(local)

    # the device pixel path: the images also as `Rollout.pixels` (uint8 on the device), as in generate -> judge
    pixels = device_pixels(images, device)
    info["device_pixels"] = check_device_pixels(backend, images, pixels)
    release(device)
    px, px_maps = run_ours(global_judge, images, prompts, grid, device, 1, repeat, pixels=pixels)
    px.update(path="ours: judge from device pixels, global", peak_gib=peak_gib(device),
              breakdown=ours_breakdown(global_judge, images, prompts, grid, device, pixels=pixels),
              max_abs_diff_vs_baseline=float((torch.tensor([2 * p - 1 for p in p_yes.tolist()]) - torch.tensor(
                  [m.global_score for m in px_maps])).abs().max()),
              max_abs_diff_vs_pil_path=max_score_diff(px_maps, maps))
    results.append(px)
    release(device)
    px_local, px_local_maps = run_ours(local_judge, images, prompts, grid, device, 1, local_repeat, pixels=pixels)
    px_local.update(path="ours: judge from device pixels, global + local (2x2 crops)", peak_gib=peak_gib(device),
                    breakdown=ours_breakdown(local_judge, images, prompts, grid, device, pixels=pixels),
                    max_abs_diff_vs_pil_path=max_score_diff(px_local_maps, local_maps))
    results.append(px_local)
    if args.compile:
        release(device)
        backend.compile_understanding = {"backend": "eager"} if args.smoke else True
        t0 = time.perf_counter()
        run_ours(global_judge, images, prompts, grid, device, 0, 1, pixels=pixels)  # compiles
        compile_s = time.perf_counter() - t0
        pxc, pxc_maps = run_ours(global_judge, images, prompts, grid, device, 1, repeat, pixels=pixels)
        pxc.update(path="ours: judge from device pixels + torch.compile, global", peak_gib=peak_gib(device),
                   first_call_s=compile_s, max_abs_diff_vs_pil_path=max_score_diff(pxc_maps, maps))
        results.append(pxc)
        backend.compile_understanding = False

    for row in results:
        row["batch"] = batch
        row["mean_s"] = statistics.mean(row["times_s"])
        row["images_per_s"] = batch / row["mean_s"]
        row["questions_per_s"] = row["rows"] / row["mean_s"]
        row["crops_per_s"] = (row["rows"] - batch) / row["mean_s"] if "local" in row["path"] else 0.0
        row["ratio_vs_baseline"] = row["images_per_s"] / results[0]["images_per_s"]
    base["lm_tflops"] = base["lm_flops"] / base["mean_s"] / 1e12
    base["total_tflops"] = base["total_flops"] / base["mean_s"] / 1e12
    base["lm_fraction_of_measured_peak"] = base["lm_tflops"] * 1e12 / peak
    info["kv_cache_built_by_judge_forward"] = judge_builds_kv_cache(backend)
    model = backend = global_judge = local_judge = pixels = None
    release(device)
    host = host_profile(args.host_images or (8 if args.smoke else 32))
    targets = dict(ours_at_least_baseline=ours["images_per_s"] >= base["images_per_s"],
                   ours_at_least_220_img_per_s=ours["images_per_s"] >= 220.0,
                   device_pixels_at_least_baseline=px["images_per_s"] >= base["images_per_s"],
                   device_pixels_at_least_220_img_per_s=px["images_per_s"] >= 220.0)

    print()
    print(markdown(("path", "batch", "q/img", "mean ms", "img/s", "q/s", "crops/s", "vs baseline", "host prep %",
                    "peak GiB"), [
        (r["path"], r["batch"], r["rows"] // r["batch"], f"{1e3 * r['mean_s']:.1f}", f"{r['images_per_s']:.1f}",
         f"{r['questions_per_s']:.1f}", f"{r['crops_per_s']:.1f}" if r["crops_per_s"] else "-",
         f"{r['ratio_vs_baseline']:.2f}x",
         f"{100 * r['breakdown']['preprocessing_fraction']:.0f}" if "breakdown" in r else "-",
         r["peak_gib"] if r["peak_gib"] is not None else "-") for r in results]))
    print(f"\nbaseline: {base['length']} tokens per row; language model {base['lm_tflops']:.1f} TFLOP/s "
          f"({100 * base['lm_fraction_of_measured_peak']:.0f}% of the measured matmul peak), whole forward "
          f"{base['total_tflops']:.1f} TFLOP/s; ours (global) vs baseline P(yes) max |diff| "
          f"{ours['max_abs_diff_vs_baseline']:.3g} (as 2p-1)")
    check = info["device_pixels"]
    print(f"device pixels: pixel values vs the processor on PIL images / crops, max |diff| "
          f"{check['max_abs_diff_whole']:.3g} / {check['max_abs_diff_crops']:.3g} (identical: {check['identical']}); "
          f"scores vs the PIL path max |diff| {px['max_abs_diff_vs_pil_path']:.3g} (global), "
          f"{px_local['max_abs_diff_vs_pil_path']:.3g} (global + local); P(yes) vs baseline "
          f"{px['max_abs_diff_vs_baseline']:.3g} (as 2p-1)")
    print(f"targets: ours >= baseline: {targets['ours_at_least_baseline']}; ours >= 220 img/s: "
          f"{targets['ours_at_least_220_img_per_s']}; device pixels >= baseline: "
          f"{targets['device_pixels_at_least_baseline']}; device pixels >= 220 img/s: "
          f"{targets['device_pixels_at_least_220_img_per_s']}; judge forward builds an unused K/V cache: "
          f"{info['kv_cache_built_by_judge_forward']}")
    print(f"\nhost profile (CPU, {host['images']} images at 384 px, {info['cpu_threads']} torch threads):")
    print(markdown(("host stage", "ms / image"), [(k, f"{v:.2f}") for k, v in host["ms_per_image"].items()]))
    print(f"host-bound ceiling on this CPU: {host['host_bound_img_per_s_global']:.0f} img/s (global), "
          f"{host['host_bound_img_per_s_global_local']:.0f} img/s (global + 4 crops)")
    payload = dict(info=info, results=results, targets=targets, host_profile=host)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
