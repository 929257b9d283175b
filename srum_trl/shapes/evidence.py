"""The ShapesWorld evidence table: does self-rewarding improve generation, and is understanding kept?

Starting from a shipped base model (the Janus base or the flow base, a tiny BAGEL), on training prompts only, each
arm fine-tunes a LoRA adapter with [`SRUMTrainer`] for the same number of steps, and is scored on held-out prompts by
the exact scorer. On a flow base the SRUM arms use the paper's conditional flow loss with 0.1 prompt dropout (the
defaults of `train_bagel.py`; `--loss_guidance` changes it), on Janus the guided loss:

| arm | what trains | loss weight per image token |
|---|---|---|
| `sft` | self-SFT: the model's own images, unweighted (the paper's SFT baseline; UniRL's SFT) | 1 |
| `srum` | SRUM, global + local reward maps from the model's own judge | R + 0.5 |
| `srum_global` | SRUM, global score only (the paper's ablation) | R + 0.5 |
| `srum_local` | SRUM, local scores only (the paper's ablation) | R + 0.5 |
| `srum_signed` | SRUM with the signed map rule (bad regions push away) | R + 0.5 |
| `srum_centered` | SRUM, global + local maps, minus the round's mean weight, lambda 0 (`reward_baseline="batch"`) | R - mean(R) |
| `srum_grouped` | the same with groups of 8 images per prompt, minus the mean of the prompt's images (`"prompt"`) | R - mean_prompt(R) |
| `srum_grouped_global` | `srum_grouped` with the global score only (a uniform map per image) | R - mean_prompt(R) |
| `srum_position` | global + local maps, minus the mean at the same token position over the prompt's 8 images | R - mean_prompt,t(R) |
| `srum_object` | the global score centred per prompt, plus each region's score against the same object in the prompt's other images, on that region's tokens (`local_credit="object"`) | (g - mean_prompt g)/4 + (s - b_object)/4 |
| `grpo` | GRPO (UniRL) on the judge's global score, groups of 8 images per prompt | scalar advantage |
| `grpo_dense` | the same with per-token advantages modulated by the judge's reward map | dense advantage |
| `oracle` | only the images the exact scorer accepts (an upper-bound control, never shipped) | 0.5 if correct else 0 |

The base may be the Janus base or a BAGEL-architecture (flow-matching) base: on a flow base the GRPO arms are flow
GRPO (SDE rollouts, per-step log-probabilities; `--grpo_config` sets its fields, e.g. `'{"noise_level": 1.0}'`) and
`--backend_kwargs` passes sampler settings the folder does not carry (e.g. `'{"num_timesteps": 16}'`).

An arm may carry its own learning rate as `ARM@LR` (e.g. `srum_centered@3e-4`); it is then reported under that
label, so one run can compare learning rates. Held-out accuracy and the guidance margin are tracked during training (every `track_every` steps), so a collapse is
seen when it starts; yes/no understanding is measured before and after. Run:

    python -m srum_trl.shapes.evidence --base srum_trl/shapes/assets/base --out runs/evidence --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

ARMS = ("sft", "srum", "srum_global", "srum_local", "srum_signed", "srum_centered", "srum_grouped",
        "srum_grouped_global", "srum_position", "srum_object", "grpo", "grpo_dense", "oracle", "grpo_oracle")
GRPO_ARMS = ("grpo", "grpo_dense", "grpo_oracle")
GROUPED_ARMS = GRPO_ARMS + ("srum_grouped", "srum_grouped_global", "srum_position", "srum_object")  # groups per prompt
CONTROL_ARMS = ("oracle", "grpo_oracle")  # rewarded by the exact scorer: upper-bound controls, never shipped


def parse_arm(spec: str) -> tuple[str, float | None]:
    """`"ARM"` or `"ARM@LR"` -> (arm, learning rate or None); a ValueError names what is wrong."""
    name, _, lr = spec.partition("@")
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r} in {spec!r}; arms are {', '.join(ARMS)} (optionally ARM@LR).")
    if not lr:
        return name, None
    try:
        value = float(lr)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ValueError(f"arm {spec!r}: the learning rate after '@' must be a positive number, e.g. {name}@3e-4.")
    return name, value


def arm_order(labels) -> list[str]:
    """Arm labels in table order: ARMS order, then by label."""
    return sorted(labels, key=lambda label: (ARMS.index(parse_arm(label)[0]), label))


def arm_learning_rate(spec: str, cfg: "EvidenceConfig") -> float:
    name, lr = parse_arm(spec)
    if lr is not None:
        return lr
    return cfg.grpo_learning_rate if name in GRPO_ARMS else cfg.learning_rate


@dataclass
class EvidenceConfig:
    """Settings of one evidence run (shared by every arm)."""

    base: str
    out: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    steps: int = 150
    batch_size: int = 32
    learning_rate: float = 2e-4
    grpo_learning_rate: float = 5e-5
    num_generations: int = 8
    lora_r: int = 32
    constraint_weight: float = 0.5
    guidance: float | None = None  # None: the base model's best guidance from its metrics.json, else 3.0
    eval_prompts: int = 1024
    train_eval_prompts: int = 512  # scorer accuracy on training-split prompts: what a recipe may be chosen by
    track_prompts: int = 256
    track_every: int = 25
    understanding_prompts: int = 256
    device: str | None = None
    parallel: int = 1
    save_adapters: bool = True
    decode_path: str = "reference"  # "fast": the CUDA-graph decoder of docs/speed.md (same tokens on CPU); Janus only
    loss_guidance: str | None = None  # None: "conditional" for flow bases (the paper's BAGEL loss), else "guided"
    backend_kwargs: dict | None = None  # backend settings on top of the folder's (e.g. a flow base's sampler)
    grpo_config: dict | None = None  # GRPOUMMConfig overrides of the GRPO arms (e.g. flow GRPO's noise_level)
    train_until: float | None = None  # a safety net: wall-clock time (time.time()) at which every arm stops training


# ------------------------------------------------------------------------------------------------ rewards
def scorer_reward(prompts, completions, **kwargs) -> list[float]:
    """The oracle: +1 when the exact scorer accepts the image, -1 otherwise."""
    from .scorer import score

    return [1.0 if score(image, prompt).correct else -1.0 for image, prompt in zip(completions, prompts)]


def zero_weight(prompts, completions, **kwargs) -> list[float]:
    """A global score of -1 for every image: with no local judge the SRUM map is then 0 everywhere, so the loss
    weight is lambda alone (self-SFT when lambda = 1)."""
    return [-1.0] * len(prompts)


# --------------------------------------------------------------------------------------------- evaluation
def generation_accuracy(backend, prompts: list[str], guidance: float, seed: int, batch_size: int = 256) -> dict:
    """Exact-scorer accuracy per category and overall, mean guidance margin, mean extra objects per image.

    The guidance margin is the rollout's own (discrete backends: mean log p_cond - log p_uncond of the sampled
    tokens); a flow backend's rollouts carry none, and its `guidance_margin(prompts, rollout)` (the distance between
    conditional and unconditional velocities on the images' latents) is measured instead."""
    from ..models import GenerationConfig
    from .scorer import accuracy_by_category, score

    rollout = backend.generate(prompts, GenerationConfig(guidance=guidance, batch_size=batch_size), seed=seed)
    results = [score(image, prompt) for image, prompt in zip(rollout.images, prompts)]
    out = accuracy_by_category(results)
    margin = rollout.guidance_margin
    if (margin is None or bool(torch.isnan(margin).all())) and hasattr(backend, "guidance_margin"):
        margin = torch.cat([backend.guidance_margin(prompts[i : i + batch_size], rollout.select(slice(i, i + batch_size)))
                            for i in range(0, len(prompts), batch_size)])
    out["guidance_margin"] = float(np.nanmean(margin.numpy())) if margin is not None else math.nan
    out["extra_objects"] = float(np.mean([len(r.extra) for r in results]))
    return out


def train_prompt_accuracy(backend, cfg: "EvidenceConfig", guidance: float) -> dict:
    """Scorer accuracy on a fixed sample of training-split prompts. Recipes (learning rate, steps, arm) are compared
    on this number, so that the held-out prompts are never used to choose anything."""
    from .world import sample_prompts

    return generation_accuracy(backend, sample_prompts(cfg.train_eval_prompts, "train", seed=7), guidance, seed=8)


def understanding_items(num_prompts: int, seed: int):
    """Seeded yes/no items on fresh renders of held-out prompts: (images, questions, labels).

    Global: a correct render (yes) and a hard negative (no) per prompt. Local: a crop around one object, asked
    about its own color and shape (yes) and about another pair the prompt does not name (no).
    """
    from .questions import global_question, local_question
    from .world import COLORS, SHAPES, render, render_negative, sample_prompts

    rng = np.random.default_rng(seed)
    images, questions, labels = [], [], []
    for prompt in sample_prompts(num_prompts, "heldout", seed=seed):
        image, objects = render(prompt, rng)
        images.append(image)
        questions.append(global_question(prompt))
        labels.append(True)
        kinds = [k for k in ("wrong_color", "wrong_shape", "missing_object", "extra_object", "wrong_count",
                             "swapped_relation") if _kind_fits(k, prompt)]
        negative, _, _ = render_negative(prompt, rng, kind=str(rng.choice(kinds)))
        images.append(negative)
        questions.append(global_question(prompt))
        labels.append(False)
        obj = objects[int(rng.integers(len(objects)))]
        x0, y0, x1, y1 = obj.box
        crop = image.crop((max(0, x0 - 2), max(0, y0 - 2), min(64, x1 + 2), min(64, y1 + 2)))
        named = {(o.color, o.shape) for o in objects}
        others = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in named]
        other = others[int(rng.integers(len(others)))]
        images += [crop, crop]
        questions += [local_question(obj.color, obj.shape), local_question(*other)]
        labels += [True, False]
    return images, questions, labels


def _kind_fits(kind: str, prompt: str) -> bool:
    from .world import negative_kinds_for

    return kind in negative_kinds_for(prompt)


def understanding_accuracy(backend, items) -> float:
    images, questions, labels = items
    p_yes = backend.yes_probability(images, questions).numpy()
    return float(np.mean((p_yes > 0.5) == np.asarray(labels)))


def judge_agreement(backend, judge, prompts, guidance, seed) -> dict:
    """How often the judge's global verdict (P(yes) > 0.5) agrees with the exact scorer on the model's images."""
    from ..models import GenerationConfig
    from .scorer import score

    rollout = backend.generate(prompts, GenerationConfig(guidance=guidance, batch_size=256), seed=seed)
    judge.bind(backend)
    questions = [judge._global_question(p) for p in prompts]
    with backend.frozen():
        p_yes = backend.yes_probability(rollout.images, questions).numpy()
    correct = np.array([score(im, p).correct for im, p in zip(rollout.images, prompts)])
    return {"accuracy": float(np.mean((p_yes > 0.5) == correct)), "yes_rate": float(np.mean(p_yes > 0.5)),
            "scorer_correct": float(correct.mean())}


# ---------------------------------------------------------------------------------------------------- arms
def _arm_setup(arm: str, cfg: EvidenceConfig):
    """(reward_funcs, SRUMConfig overrides) of an arm."""
    from .questions import make_shapes_judge

    if arm == "sft":
        return [make_shapes_judge(use_local=False), zero_weight], {"constraint_weight": 1.0}
    if arm == "oracle":
        return [make_shapes_judge(use_local=False), scorer_reward], {"constraint_weight": 0.0}
    if arm == "srum_centered":
        return [make_shapes_judge()], {"constraint_weight": 0.0, "reward_baseline": "batch"}
    if arm in ("srum_grouped", "srum_grouped_global"):
        return [make_shapes_judge(use_local=arm == "srum_grouped")], {"constraint_weight": 0.0, "reward_baseline": "prompt",
                                       "num_generations": cfg.num_generations}
    if arm == "srum_position":
        return [make_shapes_judge()], {"constraint_weight": 0.0, "reward_baseline": "position",
                                       "num_generations": cfg.num_generations}
    if arm == "srum_object":
        return [make_shapes_judge()], {"constraint_weight": 0.0, "reward_baseline": "prompt", "local_credit": "object",
                                       "num_generations": cfg.num_generations}
    settings = {"srum": {}, "srum_global": {"use_local": False}, "srum_local": {"use_global": False},
                "srum_signed": {"map_rule": "signed"}}
    if arm not in settings:
        raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")
    return [make_shapes_judge(**settings[arm])], {"constraint_weight": cfg.constraint_weight}


def run_arm(spec: str, seed: int, cfg: EvidenceConfig, guidance: float) -> dict:
    """Train one arm (`ARM` or `ARM@LR`) with one seed and evaluate it; returns its row of results."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from ..trainers import SRUMConfig, SRUMTrainer
    from .world import sample_prompts, train_prompts

    arm, learning_rate = parse_arm(spec)[0], arm_learning_rate(spec, cfg)
    torch.manual_seed(seed)
    backend = load_base(cfg)
    track = sample_prompts(cfg.track_prompts, "heldout", seed=10_000 + seed)
    history = []

    class Track(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cfg.track_every == 0 or state.global_step == cfg.steps:
                acc = generation_accuracy(trainer.backend, track, guidance, seed=20_000 + state.global_step)
                history.append({"step": state.global_step, "heldout_accuracy": acc["overall"],
                                "guidance_margin": acc["guidance_margin"], "extra_objects": acc["extra_objects"]})
            if cfg.train_until is not None and time.time() > cfg.train_until:
                control.should_training_stop = True  # recorded in the row: `steps` < the recipe's

    out_dir = os.path.join(cfg.out, f"{spec.replace('@', '-lr')}-seed{seed}")
    common = dict(output_dir=out_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
                  warmup_steps=10, guidance_scale=guidance, seed=seed, logging_steps=10, save_strategy="no",
                  report_to="none", disable_tqdm=True, bf16=False,
                  adam_epsilon=1e-8)  # the AdamW eps the recorded evidence was trained with (SRUMConfig's is 1e-15)
    loss_guidance = arm_loss_guidance(cfg, backend)
    if arm in GRPO_ARMS:
        from ..trainers import GRPOUMMConfig, GRPOUMMTrainer
        from .questions import make_shapes_judge

        reward_funcs = [scorer_reward] if arm == "grpo_oracle" else [make_shapes_judge(use_local=arm == "grpo_dense")]
        args = GRPOUMMConfig(learning_rate=learning_rate, num_generations=cfg.num_generations,
                             advantage_mode="dense" if arm == "grpo_dense" else "scalar",
                             **{**common, **(cfg.grpo_config or {})})
        loss_guidance = None
        trainer_cls = GRPOUMMTrainer
    else:
        reward_funcs, overrides = _arm_setup(arm, cfg)
        args = SRUMConfig(learning_rate=learning_rate, loss_guidance=loss_guidance, **common, **overrides)
        trainer_cls = SRUMTrainer
    trainer = trainer_cls(backend, reward_funcs=reward_funcs, args=args,
                          train_dataset=Dataset.from_dict({"prompt": train_prompts()}),
                          peft_config=LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r),
                          callbacks=[Track()])
    history.append({"step": 0, **_pick(generation_accuracy(backend, track, guidance, seed=20_000))})
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    final = generation_accuracy(trainer.backend, sample_prompts(cfg.eval_prompts, "heldout", seed=1),
                                guidance, seed=2)
    row = {
        "arm": spec, "seed": seed, "learning_rate": learning_rate, "loss_guidance": loss_guidance,
        "steps": trainer.state.global_step, "train_seconds": train_s, "heldout": final,
        "train_prompts": train_prompt_accuracy(trainer.backend, cfg, guidance),
        "understanding": understanding_accuracy(trainer.backend, understanding_items(cfg.understanding_prompts, 3)),
        "history": history,
        "train_logs": [log for log in trainer.state.log_history if "reward" in log],
    }
    if cfg.save_adapters:
        trainer.save_model(os.path.join(out_dir, "adapter"))
    return row


def load_base(cfg: EvidenceConfig):
    """The base model of the run on its device, in float32 (Janus with the run's decode path); `cfg.backend_kwargs`
    on top of the folder's settings."""
    from ..models import load_backend
    from ..models.bagel import is_bagel_folder

    settings = {} if is_bagel_folder(cfg.base) else {"decode_path": cfg.decode_path}
    backend = load_backend(cfg.base, dtype="float32", backend_kwargs={**settings, **(cfg.backend_kwargs or {})})
    backend.model.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend.understanding_batch_size = 256
    return backend


def arm_loss_guidance(cfg: EvidenceConfig, backend) -> str:
    """The SRUM arms' loss: `cfg.loss_guidance`, else the paper's conditional flow loss (with its 0.1 prompt
    dropout) on flow backends and the guided loss on discrete ones (the Janus table's)."""
    if cfg.loss_guidance is not None:
        return cfg.loss_guidance
    return "conditional" if backend.token_kind == "continuous" else "guided"


def _pick(acc: dict) -> dict:
    return {"heldout_accuracy": acc["overall"], "guidance_margin": acc["guidance_margin"],
            "extra_objects": acc["extra_objects"]}


BASE_JOB = "base"


def evaluate_base(cfg: EvidenceConfig, guidance: float) -> dict:
    """The base model's row: held-out and training-prompt accuracy, understanding, and the judge's agreement with
    the scorer on its own images of training prompts (sampled with the reference decoder)."""
    from ..models import load_backend
    from .questions import make_shapes_judge
    from .world import sample_prompts

    backend = load_backend(cfg.base, dtype="float32")
    backend.model.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend.understanding_batch_size = 256
    return {
        "heldout": generation_accuracy(backend, sample_prompts(cfg.eval_prompts, "heldout", seed=1), guidance, 2),
        "train_prompts": train_prompt_accuracy(backend, cfg, guidance),
        "understanding": understanding_accuracy(backend, understanding_items(cfg.understanding_prompts, 3)),
        "judge_agreement": judge_agreement(backend, make_shapes_judge(),
                                           sample_prompts(cfg.track_prompts, "train", seed=5), guidance, 6),
    }


def _run_job(job):
    arm, seed, cfg, guidance = job
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(cfg.parallel, 1)))
    try:
        if arm == BASE_JOB:
            return {"arm": BASE_JOB, "seed": None, **evaluate_base(cfg, guidance)}
        return run_arm(arm, seed, cfg, guidance)
    except Exception as error:  # keep the other arms' results
        import traceback

        return {"arm": arm, "seed": seed, "error": f"{error!r}", "traceback": traceback.format_exc()}


# ------------------------------------------------------------------------------------------------ summary
def summarize(rows: list[dict], base: dict) -> dict:
    """Mean, std and standard error over seeds per arm, and each arm's difference to base and to self-SFT."""
    summary = {"base": base}
    for arm in sorted({r["arm"] for r in rows if "error" not in r}):
        runs = [r for r in rows if r["arm"] == arm and "error" not in r]
        entry = {"seeds": [r["seed"] for r in runs]}
        for key in ["overall", "single", "pair", "spatial", "counting"]:
            values = np.array([r["heldout"].get(key, math.nan) for r in runs], dtype=float)
            entry[key] = _stats(values)
        entry["understanding"] = _stats(np.array([r["understanding"] for r in runs]))
        entry["train_prompts"] = _stats(np.array([r.get("train_prompts", {}).get("overall", math.nan) for r in runs],
                                                 dtype=float))
        entry["guidance_margin_end"] = _stats(np.array([r["heldout"]["guidance_margin"] for r in runs]))
        entry["min_tracked_accuracy"] = float(min(h["heldout_accuracy"] for r in runs for h in r["history"]))
        summary[arm] = entry
    for arm, entry in summary.items():
        if arm == "base":
            continue
        entry["vs_base_in_se"] = _z(entry["overall"], {"mean": base["heldout"]["overall"], "se": 0.0})
        if "sft" in summary and arm != "sft":
            entry["vs_sft_in_se"] = _z(entry["overall"], summary["sft"]["overall"])
        error = 1.0 - base["heldout"]["overall"]
        entry["error_closed"] = (entry["overall"]["mean"] - base["heldout"]["overall"]) / error if error > 0 else None
    return summary


def _stats(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"mean": None, "std": None, "se": None, "n": 0}
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "se": std / math.sqrt(len(values)), "n": int(len(values))}


def _z(a: dict, b: dict) -> float | None:
    se = math.sqrt((a["se"] or 0.0) ** 2 + (b["se"] or 0.0) ** 2)
    return None if se == 0 or a["mean"] is None else (a["mean"] - b["mean"]) / se


def markdown(summary: dict, cfg: EvidenceConfig, guidance: float, command: str) -> str:
    """The evidence table as markdown."""
    base = summary["base"]
    lines = [
        "| arm | held-out overall | single | pair | spatial | counting | understanding | margin (end) "
        "| vs base (SE) | vs SFT (SE) | train prompts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base | {_pct(base['heldout']['overall'])} | {_pct(base['heldout'].get('single'))} | "
        f"{_pct(base['heldout'].get('pair'))} | {_pct(base['heldout'].get('spatial'))} | "
        f"{_pct(base['heldout'].get('counting'))} | {_pct(base['understanding'])} | "
        f"{_margin(base['heldout']['guidance_margin'])} | | | {_pct(base.get('train_prompts', {}).get('overall'))} |",
    ]
    for arm in arm_order(a for a in summary if a != "base"):
        e = summary[arm]
        label = f"{arm} (control)" if parse_arm(arm)[0] in CONTROL_ARMS else arm
        lines.append(
            f"| {label} | {_ms(e['overall'])} | {_ms(e['single'])} | {_ms(e['pair'])} | {_ms(e['spatial'])} | "
            f"{_ms(e['counting'])} | {_ms(e['understanding'])} | {_margin(e['guidance_margin_end']['mean'])} | "
            f"{_num(e.get('vs_base_in_se'))} | {_num(e.get('vs_sft_in_se'))} | {_ms(e['train_prompts'])} |"
        )
    setup = (f"{len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))}); {cfg.steps} steps of batch {cfg.batch_size}; "
             f"LoRA r={cfg.lora_r}; lr {cfg.learning_rate} (GRPO {cfg.grpo_learning_rate}, groups of "
             f"{cfg.num_generations}); CFG {guidance}; {cfg.eval_prompts} held-out prompts; mean ± std over seeds")
    return "\n".join([setup, "", *lines, "", f"Command: `{command}`", ""])


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _ms(s: dict) -> str:
    return "" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _margin(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _num(v) -> str:
    return "" if v is None else f"{v:+.1f}"


# ---------------------------------------------------------------------------------------------------- main
def _base_guidance(base: str) -> float:
    """The base model's best guidance: its `metrics.json`, else its `generation_config.json`, else 3."""
    for name, key in (("metrics.json", "best_guidance"), ("generation_config.json", "guidance_scale")):
        path = os.path.join(base, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get(key)
            if value is not None:
                return float(value)
    return 3.0


def parse_args(argv=None) -> EvidenceConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = EvidenceConfig(base="", out="")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--out", required=True, help="output folder (results.json, evidence.md, adapters)")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--arms", nargs="+", default=defaults.arms, metavar="ARM[@LR]",
                        help=f"arms among {', '.join(ARMS)}; ARM@LR gives that arm its own learning rate")
    for name in ("steps", "batch_size", "lora_r", "eval_prompts", "train_eval_prompts", "track_prompts", "track_every",
                 "understanding_prompts", "parallel"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--grpo_learning_rate", type=float, default=defaults.grpo_learning_rate)
    parser.add_argument("--num_generations", type=int, default=defaults.num_generations)
    parser.add_argument("--constraint_weight", type=float, default=defaults.constraint_weight)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--decode_path", choices=["reference", "fast"], default=defaults.decode_path,
                        help="image-token decoder of the rollouts (fast: CUDA graphs, see docs/speed.md; Janus only)")
    parser.add_argument("--max_seconds", type=float, default=None,
                        help="a safety net for a time-limited machine: every arm stops training this many seconds "
                             "after the start, minus --eval_reserve_s, and records the steps it made")
    parser.add_argument("--eval_reserve_s", type=float, default=120.0)
    parser.add_argument("--backend_kwargs", type=json.loads, default=None, metavar="JSON",
                        help="backend settings on top of the folder's, e.g. '{\"num_timesteps\": 16}'")
    parser.add_argument("--grpo_config", type=json.loads, default=None, metavar="JSON",
                        help="GRPOUMMConfig fields of the GRPO arms, e.g. '{\"noise_level\": 1.0}'")
    parser.add_argument("--loss_guidance", choices=["guided", "conditional"], default=None,
                        help="loss of the SRUM arms (default: conditional on flow bases, the paper's BAGEL loss with "
                             "0.1 prompt dropout; guided on discrete ones)")
    args = parser.parse_args(argv)
    for spec in args.arms:
        try:
            parse_arm(spec)
        except ValueError as error:
            parser.error(f"--arms: {error}")
    values = vars(args)
    max_seconds, reserve = values.pop("max_seconds"), values.pop("eval_reserve_s")
    if max_seconds is not None:
        values["train_until"] = time.time() + max_seconds - reserve
    return EvidenceConfig(**values)


def _keep(row: dict, cfg: EvidenceConfig) -> dict:
    """Print a finished job and append it to `rows.jsonl`, so that a run stopped early keeps what it finished."""
    print("done:", row.get("arm"), row.get("seed"), row.get("heldout", {}).get("overall"), row.get("error", ""),
          flush=True)
    with open(os.path.join(cfg.out, "rows.jsonl"), "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
    return row


def main(argv=None) -> dict:
    """Run every arm x seed (in `parallel` processes), write results.json and evidence.md into `out`."""
    import sys

    cfg = parse_args(argv)
    os.makedirs(cfg.out, exist_ok=True)
    guidance = cfg.guidance if cfg.guidance is not None else _base_guidance(cfg.base)
    jobs = [(BASE_JOB, None, cfg, guidance)] + [(arm, seed, cfg, guidance) for seed in cfg.seeds for arm in cfg.arms]
    if cfg.parallel > 1:  # the base model is evaluated by one of the processes, beside the arms
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(cfg.parallel) as pool:
            rows = [_keep(row, cfg) for row in pool.imap_unordered(_run_job, jobs)]
    else:
        rows = [_keep(_run_job(job), cfg) for job in jobs]
    base = next(r for r in rows if r["arm"] == BASE_JOB)
    rows = [r for r in rows if r["arm"] != BASE_JOB]
    if "error" in base:
        raise RuntimeError(f"the base model's evaluation failed: {base['error']}\n{base.get('traceback', '')}")
    base = {k: v for k, v in base.items() if k not in ("arm", "seed")}
    with open(os.path.join(cfg.out, "base.json"), "w") as f:
        json.dump(base, f, indent=1, default=float)
    summary = summarize(rows, base)
    command = "python -m srum_trl.shapes.evidence " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"config": asdict(cfg), "guidance": guidance, "summary": summary, "runs": rows, "command": command}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(cfg.out, "evidence.md"), "w") as f:
        f.write(markdown(summary, cfg, guidance, command))
    print(markdown(summary, cfg, guidance, command))
    return result


if __name__ == "__main__":
    main()
