"""What the ShapesWorld judge sees: its global and region scores against the exact scorer, per category.

Dense credit can only help where region scores carry information of their own. On the model's own images for
training-split prompts (recipes are never chosen on held-out ones) this prints and writes:

- global: per category, the AUC of the judge's global score for the exact scorer's verdict, and its agreement at
  P(yes) > 0.5;
- regions: each judged region (the judge's own proposer and questions) is matched to the scorer's detections whose
  centre lies inside its box; a region holding exactly one detection is "right" when that object's colour and shape
  are named by the prompt and "wrong" otherwise. The AUC of the region score for right vs wrong, overall and per
  category, and the same AUC within groups of one prompt and one label (what `local_credit="object"` compares);
- for wrong images, the share with at least one wrong region (what a global score cannot localise).

    python scripts/shapes_judge_diagnostics.py --model srum_trl/shapes/assets/base --prompts 256 --images_per_prompt 4 \
        --out docs/results/shapes_judge_diagnostics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _auc(scores, labels):
    from srum_trl.shapes.pretrain import auc

    value = auc(scores, labels)
    return None if value is None else round(value, 4)


def region_truth(box, detections, named) -> bool | None:
    """True / False when the box holds exactly one detected object, named by the prompt or not; None otherwise."""
    x0, y0, x1, y1 = box
    inside = [d for d in detections if x0 <= d.center[0] < x1 and y0 <= d.center[1] < y1]
    if len(inside) != 1:
        return None
    return (inside[0].color, inside[0].shape) in named


def diagnose(model: str, adapter: str | None, num_prompts: int, per_prompt: int, guidance: float, seed: int) -> dict:
    import torch

    from srum_trl.models import GenerationConfig, load_backend
    from srum_trl.shapes.questions import make_shapes_judge
    from srum_trl.shapes.scorer import score
    from srum_trl.shapes.world import parse_prompt, sample_prompts

    torch.manual_seed(seed)
    backend = load_backend(model, adapter=adapter, dtype="float32")
    if torch.cuda.is_available():
        backend.model.to("cuda")
    prompts = [p for p in sample_prompts(num_prompts, "train", seed=seed) for _ in range(per_prompt)]
    start = time.perf_counter()
    rollout = backend.generate(prompts, GenerationConfig(guidance=guidance, batch_size=64), seed=seed)
    judge = make_shapes_judge(backend)
    maps = judge.judge(rollout.images, prompts, rollout.grid, pixels=rollout.pixels)
    seconds = time.perf_counter() - start

    glob = defaultdict(lambda: ([], []))
    regions = defaultdict(lambda: ([], []))
    grouped = defaultdict(lambda: ([], []))  # (prompt, label) -> scores, truths
    wrong_images, wrong_with_bad_region = defaultdict(int), defaultdict(int)
    for image, prompt, reward_map in zip(rollout.images, prompts, maps):
        result = score(image, prompt)
        spec = parse_prompt(prompt)
        named = set(spec.objects)
        for key in (result.category, "overall"):
            glob[key][0].append(reward_map.global_score)
            glob[key][1].append(result.correct)
        bad_region = False
        for region in reward_map.regions:
            truth = region_truth(region.box, result.detected, named)
            if truth is None:
                continue
            bad_region |= not truth
            for key in (result.category, "overall"):
                regions[key][0].append(region.score)
                regions[key][1].append(truth)
            grouped[(prompt, region.label)][0].append(region.score)
            grouped[(prompt, region.label)][1].append(truth)
        if not result.correct:
            for key in (result.category, "overall"):
                wrong_images[key] += 1
                wrong_with_bad_region[key] += int(bad_region)

    # within-group AUC: pairs (right, wrong) of regions with the same prompt and label
    concordant = ties = pairs = 0
    for scores, truths in grouped.values():
        s, t = np.asarray(scores), np.asarray(truths, dtype=bool)
        if t.all() or not t.any():
            continue
        diff = s[t][:, None] - s[~t][None, :]
        concordant += int((diff > 0).sum())
        ties += int((diff == 0).sum())
        pairs += diff.size
    out = {"model": model, "adapter": adapter, "guidance": guidance, "prompts": num_prompts,
           "images_per_prompt": per_prompt, "images": len(prompts), "seed": seed,
           "seconds_generate_and_judge": round(seconds, 1), "global": {}, "regions": {}}
    for key, (scores, truths) in sorted(glob.items()):
        p_yes = (np.asarray(scores) + 1) / 2
        out["global"][key] = {"images": len(truths), "scorer_correct": round(float(np.mean(truths)), 4),
                              "auc": _auc(scores, truths),
                              "agreement": round(float(np.mean((p_yes > 0.5) == np.asarray(truths))), 4)}
    for key, (scores, truths) in sorted(regions.items()):
        out["regions"][key] = {"regions": len(truths), "right_share": round(float(np.mean(truths)), 4),
                               "auc": _auc(scores, truths),
                               "wrong_images_with_a_wrong_region": round(wrong_with_bad_region[key]
                                                                         / max(1, wrong_images[key]), 4)}
    out["regions_within_prompt_and_label"] = {
        "pairs": pairs, "auc": round((concordant + ties / 2) / pairs, 4) if pairs else None}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped ShapesWorld base)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--prompts", type=int, default=256, help="training-split prompts")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.model is None:
        from srum_trl.shapes.assets import base_model_path

        args.model = base_model_path()
    result = diagnose(args.model, args.adapter, args.prompts, args.images_per_prompt, args.guidance, args.seed)
    result["command"] = "python scripts/shapes_judge_diagnostics.py " + " ".join(argv or sys.argv[1:])
    print(f"{'category':10} {'images':>6} {'correct':>8} {'global AUC':>10} {'agree':>6} | {'regions':>7} "
          f"{'right':>6} {'region AUC':>10} {'wrong imgs w/ wrong region':>26}")
    for key in result["global"]:
        g, r = result["global"][key], result["regions"].get(key, {})
        print(f"{key:10} {g['images']:6d} {g['scorer_correct']:8.3f} {str(g['auc']):>10} {g['agreement']:6.3f} | "
              f"{r.get('regions', 0):7d} {r.get('right_share', float('nan')):6.3f} {str(r.get('auc')):>10} "
              f"{r.get('wrong_images_with_a_wrong_region', float('nan')):26.3f}")
    print("region AUC within one prompt and label:", result["regions_within_prompt_and_label"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
