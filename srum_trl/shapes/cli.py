"""`srum-trl shapes ...`: ShapesWorld tools (score generated images, pretrain the base model, the evidence run)."""

from __future__ import annotations

import argparse
import json
import os


def cmd_eval(argv):
    """Score a folder written by `srum-trl generate` ({line:05d}.png) against its prompt file; print and write JSON."""
    from ..data.images import open_image
    from ..data.manifest import check_images_match_prompts
    from ..data.prompts import load_prompts
    from .scorer import accuracy_by_category, score

    parser = argparse.ArgumentParser(prog="srum-trl shapes eval", description=cmd_eval.__doc__)
    parser.add_argument("--images", required=True, help="folder of {line:05d}.png images")
    parser.add_argument("--prompts", required=True, help="the prompt file the images were generated from")
    parser.add_argument("--out", default=None, help="JSON output (default: IMAGES/shapes_eval.json)")
    parser.add_argument("--unchecked", action="store_true",
                        help="score a folder without the images.json of `srum-trl generate` (nothing then checks "
                             "that its images were made from these prompts)")
    parser.add_argument("--max_image_pixels", type=int, default=None,
                        help="refuse larger images (default 4096 x 4096, or $SRUM_TRL_MAX_IMAGE_PIXELS)")
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts)
    if not (args.unchecked and not os.path.exists(os.path.join(args.images, "images.json"))):
        check_images_match_prompts(args.images, prompts)  # images of another prompt file are never scored
    missing = [i for i in range(len(prompts)) if not os.path.exists(os.path.join(args.images, f"{i:05d}.png"))]
    if missing:
        raise SystemExit(f"{len(missing)} images missing in {args.images} (first: {missing[0]:05d}.png); "
                         "run `srum-trl generate` with the same prompt file first.")
    results = [score(open_image(os.path.join(args.images, f"{i:05d}.png"), args.max_image_pixels), p)
               for i, p in enumerate(prompts)]
    summary = {"num_images": len(results), "accuracy": accuracy_by_category(results),
               "per_image": [{"line": i, "prompt": p, "correct": r.correct, "checks": r.checks}
                             for i, (p, r) in enumerate(zip(prompts, results))]}
    out = args.out or os.path.join(args.images, "shapes_eval.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    for category, value in summary["accuracy"].items():
        print(f"{category:10s} {100 * value:6.1f}%")
    print(f"written to {out}")


def cmd_pretrain(argv):
    """Pretrain the ShapesWorld base model from scratch (see `python -m srum_trl.shapes.pretrain --help`)."""
    from .pretrain import main

    main(argv)


def cmd_flow_pretrain(argv):
    """Pretrain the ShapesWorld flow base (a tiny BAGEL) from scratch (see `python -m srum_trl.shapes.flow_pretrain
    --help`)."""
    from .flow_pretrain import main

    main(argv)


def cmd_evidence(argv):
    """Run the evidence table: base vs self-SFT vs SRUM and its ablations vs oracle, several seeds."""
    from .evidence import main

    main(argv)


def cmd_prompts(argv):
    """Write ShapesWorld prompts (train or held-out split) to a file, one per line."""
    from .world import sample_prompts

    parser = argparse.ArgumentParser(prog="srum-trl shapes prompts", description=cmd_prompts.__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", choices=["train", "heldout", "all"], default="heldout")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        f.write("\n".join(sample_prompts(args.n, args.split, seed=args.seed)) + "\n")
    print(f"{args.n} {args.split} prompts in {args.out}")


COMMANDS = {"eval": cmd_eval, "prompts": cmd_prompts, "pretrain": cmd_pretrain, "flow-pretrain": cmd_flow_pretrain,
            "evidence": cmd_evidence}
