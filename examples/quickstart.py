"""SRUM in a few minutes, with no download: a measured gain first, then your own short run.

Uses the ShapesWorld base model and its SRUM adapter shipped inside the package (docs/shapes.md) and ShapesWorld's
exact scorer, which says whether an image shows exactly what its prompt asks for.

1. The shipped SRUM adapter against its base model on the same held-out prompts and the same seeds
   (`srum-trl eval --protocol shapes --compare_base`): the accuracy of each, and the paired difference with its
   standard error.
2. Your own short SRUM run with the shipped adapter's recipe (`SRUMTrainer`, 8 images per prompt, the judge's
   global score minus the mean of the prompt's images, plus each region's score against the same object in the
   prompt's other images), saving a LoRA adapter and a reward-map picture.
3. Your adapter on the same held-out prompts and seeds, against the same base images (`--no-evaluate_yours` leaves
   it out and prints the command that runs it).

Runs on a GPU when there is one (the same steps, faster).

    python examples/quickstart.py --output_dir runs/quickstart
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from srum_trl import SRUMConfig, SRUMTrainer
from srum_trl.eval import EvalSettings, evaluate_models, paired_difference
from srum_trl.shapes import assets
from srum_trl.shapes.questions import make_shapes_judge
from srum_trl.shapes.world import sample_prompts, train_prompts


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _difference(d: dict) -> str:
    if not d["se"] > 0:  # NaN, or every prompt moved the same way: no spread to measure an error from
        return f"{100 * d['mean']:+.1f} points (too few prompts to estimate its error)"
    z = d["mean"] / d["se"]
    verdict = ("beyond 2 standard errors: a real difference" if abs(z) >= 2 else
               "within 2 standard errors: not distinguishable from sampling noise")
    return f"{100 * d['mean']:+.1f} points ± {100 * d['se']:.1f} (standard error; {z:+.1f} SE, {verdict})"


def quiet():
    """Only this script's own lines: no library progress bars, per-step log dicts or deprecation notices."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


def main():
    quiet()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/quickstart")
    parser.add_argument("--num_prompts", type=int, default=256, help="held-out prompts scored per model")
    parser.add_argument("--max_steps", type=int, default=3, help="steps of your SRUM run")
    parser.add_argument("--prompts_per_step", type=int, default=2, help="x 8 images each")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate_yours", action=argparse.BooleanOptionalAction, default=True,
                        help="score your adapter on the held-out prompts too")
    args = parser.parse_args()
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    heldout = os.path.join(args.output_dir, "heldout.txt")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(heldout, "w") as f:
        f.write("\n".join(sample_prompts(args.num_prompts, "heldout", seed=1)) + "\n")
    settings = EvalSettings(protocol="shapes", prompts=heldout, out=os.path.join(args.output_dir, "eval"), seed=1234,
                            guidance_scale=2.0, batch_size=args.num_prompts, device=device)
    print(f"ShapesWorld base model ({assets.base_model_path()}) on {where}; {args.num_prompts} held-out prompts "
          "(never used for training), classifier-free guidance 2, the exact scorer.\n")

    # 1. the shipped adapter against its base, same prompts and seeds
    print("1/3  The shipped SRUM adapter against its base model")
    report = evaluate_models(assets.base_model_path(), [None, assets.srum_lora_path()], settings, progress=False)
    print(report["table"])
    base, shipped = report["models"]["base"], report["models"]["srum-lora"]
    print(f"\n     Each cell: the share of images that the exact scorer accepts (all objects, colours, counts and the "
          f"relation right,\n     nothing extra), ± its standard error. The shipped adapter (SRUMTrainer, 300 steps "
          f"of 128 images on a GPU,\n     docs/shapes.md) against the base: {_difference(report['differences']['srum-lora'])}."
          f"\n     ({time.perf_counter() - start:.0f} s so far)\n")

    # 2. your own short run with the evidence's recipe
    steps, batch = args.max_steps, 8 * args.prompts_per_step
    print(f"2/3  Your SRUM run: {steps} steps of {batch} images ({args.prompts_per_step} training prompts x 8), "
          f"learning rate {args.learning_rate:g}, LoRA r 32")
    config = SRUMConfig(
        output_dir=os.path.join(args.output_dir, "adapter"), max_steps=steps, per_device_train_batch_size=batch,
        num_generations=8, reward_baseline="prompt", local_credit="object", constraint_weight=0.0,
        learning_rate=args.learning_rate,
        warmup_steps=0, guidance_scale=2.0, seed=args.seed, logging_steps=1, save_strategy="no",
        report_to="none", save_reward_maps=1, disable_tqdm=True,
        model_init_kwargs={"dtype": "float32"})  # as the evidence trained it (the folder's weights are bfloat16)
    trainer = SRUMTrainer(
        assets.base_model_path(),
        reward_funcs=[make_shapes_judge()],  # the model's own judge: a global score and a score per region
        args=config,
        train_dataset=Dataset.from_dict({"prompt": train_prompts()}),
        peft_config=LoraConfig(r=32, lora_alpha=64),
    )
    trainer.remove_callback(PrinterCallback)  # the step metrics are summarised below
    trainer.train()
    trainer.save_model(config.output_dir)
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    print(f"     the judge's mean reward of each step's images (2 P(yes) - 1 on training prompts): "
          f"{' '.join(f'{r:+.2f}' for r in rewards)}")
    pictures = sorted(os.listdir(os.path.join(config.output_dir, "reward_maps")))
    picture = os.path.join(args.output_dir, "reward_map.png")
    os.replace(os.path.join(config.output_dir, "reward_maps", pictures[-1]), picture)
    print(f"     ({time.perf_counter() - start:.0f} s so far)\n")
    if not args.evaluate_yours:
        print(f"3/3  Your adapter is not scored (--no-evaluate_yours; another {args.num_prompts} images). A run this "
              f"short ({steps * batch} images)\n     is not expected to show a significant gain: the shipped adapter saw "
              "38,400. To measure yours, paired with the base:\n"
              f"     srum-trl eval --protocol shapes --model {assets.base_model_path()} --adapter {config.output_dir} "
              f"--compare_base \\\n         --prompts {heldout} --guidance_scale 2 --batch_size {args.num_prompts} "
              f"--seed 1234 --out {os.path.join(args.output_dir, 'eval_yours')}")
        print(f"\nYour LoRA adapter: {config.output_dir}; reward-map picture (an image beside the judge's map): "
              f"{picture}.\nWall time: {time.perf_counter() - start:.0f} s")
        return

    # 3. your adapter on the same held-out prompts and seeds
    print("3/3  Your adapter on the same held-out prompts and seeds")
    mine = evaluate_models(assets.base_model_path(), [config.output_dir],
                           dataclasses.replace(settings, out=os.path.join(args.output_dir, "eval_yours")), progress=False)
    yours = mine["models"]["adapter"]
    groups = list(range(args.num_prompts))
    d = paired_difference(report["scores"]["base"], mine["scores"]["adapter"], groups)
    print(f"     base {_pct(base['overall'])}, shipped adapter {_pct(shipped['overall'])}, yours "
          f"{_pct(yours['overall'])} ± {100 * yours['overall_se']:.1f}")
    print(f"     yours against the base: {_difference(d)}.")
    if not abs(d["mean"]) >= 2 * d["se"] > 0:
        print(f"     A run this short ({steps * batch} images) is not expected to show a significant gain: the shipped "
              "adapter saw 38,400\n     (python -m srum_trl.shapes.evidence reproduces it on a GPU in a few minutes).")
    print(f"\nYour LoRA adapter: {config.output_dir}; reward-map picture (an image beside the judge's map): {picture};"
          f"\ntables and per-image scores: {settings.out} and {os.path.join(args.output_dir, 'eval_yours')}.")
    print(f"Wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
