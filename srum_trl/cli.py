"""The `srum-trl` command line: generate, rollout (generate + judge), train, eval, show.

Every command takes `--help`; `train` exposes every `SRUMConfig` field and TRL's model/LoRA flags.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ModelArgs:
    """Which model to load."""

    model: str = field(metadata={"help": "Model folder or Hub id."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder to load on top."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)."})


@dataclass
class GenerateArgs:
    """Sampling settings."""

    prompts: str = field(metadata={"help": "Prompt file: .txt (one per line), .json list or .jsonl records."})
    out: str = field(metadata={"help": "Output folder."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "Classifier-free guidance scale (1: none); default: the model folder's generation config, else 5."})
    temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature; default: the model folder's generation config, else 1."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward batch."})

    def __post_init__(self):
        if self.guidance_scale is not None and not self.guidance_scale > 0:
            raise ValueError(f"--guidance_scale must be > 0 (1 disables guidance), got {self.guidance_scale}.")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (the logits are divided by it; for near-greedy sampling use "
                             f"a small value such as 0.05), got {self.temperature}.")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}.")


@dataclass
class ImageFolderArgs:
    """What `generate` may do to an output folder."""

    overwrite: bool = field(default=False, metadata={
        "help": "Delete images in --out that were made with other prompts or settings (default: refuse)."})


@dataclass
class JudgeArgs:
    """How the model judges images."""

    judge_mode: str = field(default="logits", metadata={"help": "logits or text."})
    region_proposer: str = field(default="grid", metadata={"help": "grid, sam or none."})
    region_grid: int = field(default=2, metadata={"help": "Cells per side of the grid proposer."})
    map_rule: str = field(default="srum", metadata={"help": "srum or signed."})
    shard_size: int = field(default=64, metadata={"help": "Prompts per stored shard (rollout)."})
    num_generations: int = field(default=1, metadata={
        "help": "Images per prompt (rollout), stored as one group: needed for training with reward_baseline=prompt."})
    pictures: int = field(default=0, metadata={"help": "Save this many reward-map pictures next to the output."})


@dataclass
class TrainScriptArgs:
    """Data of `srum-trl train`."""

    prompts: str = field(metadata={"help": "Prompt file, datasets folder, or rollout store (offline training)."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Prompt file for evaluation."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    allow_partial_rollouts: bool = field(default=False, metadata={
        "help": "Train on the complete shards of a rollout store whose run was stopped early (default: refuse)."})


@dataclass
class ShowArgs:
    """Draw stored judged images."""

    rollouts: str = field(metadata={"help": "A rollout store folder (srum-trl rollout --out)."})
    out: str = field(metadata={"help": "Output folder for the PNG pictures."})
    indices: str = field(default="0", metadata={"help": "Comma-separated row indices, or 'all'."})


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(model_args: ModelArgs):
    from .models import load_backend

    backend = load_backend(model_args.model, adapter=model_args.adapter, dtype=model_args.dtype,
                           attn_implementation=model_args.attn_implementation)
    backend.model.to(_device(model_args.device))
    return backend


def _judge(judge_args: JudgeArgs, backend):
    from .rewards import UMMJudgeRewardFunction

    return UMMJudgeRewardFunction(backend, mode=judge_args.judge_mode, region_proposer=judge_args.region_proposer,
                                  region_grid=judge_args.region_grid, map_rule=judge_args.map_rule)


def _generation(gen: GenerateArgs, backend):
    """The sampling settings: the flags given, else the checkpoint's own (`backend.default_generation_config()`)."""
    from dataclasses import replace

    config = backend.default_generation_config()
    guidance = config.guidance if gen.guidance_scale is None else gen.guidance_scale
    temperature = config.temperature if gen.temperature is None else gen.temperature
    return replace(config, guidance=guidance, temperature=temperature, batch_size=gen.batch_size)


def cmd_generate(argv):
    """Write one PNG per prompt line, `{line:05d}.png`; already written files are kept (resume)."""
    # Batches are fixed by line number (lines k*B .. k*B+B-1 with seed + k), so a resumed or repeated run with the
    # same --seed and --batch_size writes the same images as an uninterrupted one. images.json beside them records
    # the prompts, settings and model that made them: a run with other ones is refused (or, with --overwrite,
    # replaces them), so a folder never mixes images of two prompt files or two models.
    from transformers import HfArgumentParser

    from .data.manifest import check_image_folder, model_signature, prompts_fingerprint
    from .data.prompts import load_prompts

    model_args, gen, folder = HfArgumentParser((ModelArgs, GenerateArgs, ImageFolderArgs)).parse_args_into_dataclasses(
        argv)
    prompts = load_prompts(gen.prompts)
    manifest = {"num_prompts": len(prompts), "prompts_sha256": prompts_fingerprint(prompts), "seed": gen.seed,
                "guidance": gen.guidance_scale, "temperature": gen.temperature, "batch_size": gen.batch_size}
    check_image_folder(gen.out, manifest, folder.overwrite, write=False)  # before the model is loaded
    backend = _load(model_args)
    manifest.update(model=model_signature(backend), source={"prompts": gen.prompts, "model": model_args.model,
                                                            "adapter": model_args.adapter, "dtype": model_args.dtype})
    check_image_folder(gen.out, manifest, folder.overwrite)
    from tqdm.auto import tqdm

    def done(i):
        return os.path.exists(os.path.join(gen.out, f"{i:05d}.png"))

    config = _generation(gen, backend)
    batches = [range(s, min(s + gen.batch_size, len(prompts))) for s in range(0, len(prompts), gen.batch_size)]
    todo = [(k, rows) for k, rows in enumerate(batches) if not all(done(i) for i in rows)]
    existing = sum(done(i) for i in range(len(prompts)))
    for k, rows in tqdm(todo, desc="generate", unit="batch"):
        rollout = backend.generate([prompts[i] for i in rows], config, seed=gen.seed + k)
        for i, image in zip(rows, rollout.images):
            if done(i):
                continue
            tmp = os.path.join(gen.out, f".{i:05d}.png.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, os.path.join(gen.out, f"{i:05d}.png"))
    print(f"{len(prompts)} images in {gen.out} ({existing} were already there)")


def cmd_rollout(argv):
    """Generate + judge prompts into a resumable rollout store (a datasets folder of shards)."""
    from transformers import HfArgumentParser

    from .data import build_rollouts
    from .data.prompts import load_prompts

    model_args, gen, judge_args = HfArgumentParser((ModelArgs, GenerateArgs, JudgeArgs)).parse_args_into_dataclasses(argv)
    backend = _load(model_args)
    source = {"model": model_args.model, "adapter": model_args.adapter, "dtype": model_args.dtype}
    dataset = build_rollouts(backend, load_prompts(gen.prompts), _judge(judge_args, backend), gen.out,
                             _generation(gen, backend), seed=gen.seed, shard_size=judge_args.shard_size,
                             num_generations=judge_args.num_generations, source=source)
    _save_pictures(dataset, range(min(judge_args.pictures, len(dataset))), os.path.join(gen.out, "pictures"))
    rewards = dataset["reward"]
    print(f"{len(dataset)} judged rollouts in {gen.out}; mean reward {sum(rewards) / len(rewards):+.4f}")


@dataclass
class EvalArgs:
    """What `srum-trl eval` measures (docs/eval.md)."""

    protocol: str = field(default="judge", metadata={
        "help": "shapes, geneval, compbench, ocr, clip or judge (the model's own judge)."})
    compare_base: bool = field(default=False, metadata={
        "help": "With --adapter: also evaluate the model without it, side by side on the same prompts and seeds."})
    samples_per_prompt: int = field(default=1, metadata={"help": "Images per prompt."})
    reward_model: str | None = field(default=None, metadata={
        "help": "Checkpoint of the protocol's scorer: a zero-shot detector (geneval), a multimodal model "
                "(compbench) or a CLIP model (clip). Defaults in docs/eval.md."})
    reward_processor: str | None = field(default=None, metadata={"help": "Its processor, if not in its folder."})
    color_model: str | None = field(default=None, metadata={"help": "geneval: a CLIP checkpoint for colours."})
    clip_scale: str = field(default="cosine", metadata={"help": "clip: cosine, clipscore or pickscore."})
    threshold: float | None = field(default=None, metadata={"help": "geneval: detection score threshold."})
    counting_threshold: float | None = field(default=None, metadata={"help": "geneval: threshold of counting prompts."})
    max_new_tokens: int = field(default=128, metadata={"help": "compbench: answer length."})
    save_images: bool = field(default=True, metadata={"help": "Keep the generated images under --out/<model>/images."})


def cmd_eval(argv):
    """Generate for a prompt file and score the images with a protocol; per-category JSON and a markdown table."""
    from transformers import HfArgumentParser

    from .eval import EvalSettings, evaluate_models

    model_args, gen, judge_args, eval_args = HfArgumentParser(
        (ModelArgs, GenerateArgs, JudgeArgs, EvalArgs)).parse_args_into_dataclasses(argv)
    if eval_args.compare_base and model_args.adapter is None:
        raise SystemExit("--compare_base compares the model with and without --adapter: pass --adapter too.")
    adapters = ([None] if eval_args.compare_base else []) + [model_args.adapter]
    settings = EvalSettings(protocol=eval_args.protocol, prompts=gen.prompts, out=gen.out, seed=gen.seed,
                            samples_per_prompt=eval_args.samples_per_prompt, guidance_scale=gen.guidance_scale,
                            temperature=gen.temperature, batch_size=gen.batch_size, device=model_args.device,
                            dtype=model_args.dtype, attn_implementation=model_args.attn_implementation)
    options = {"reward_model": eval_args.reward_model, "reward_processor": eval_args.reward_processor,
               "color_model": eval_args.color_model, "clip_scale": eval_args.clip_scale,
               "threshold": eval_args.threshold, "counting_threshold": eval_args.counting_threshold,
               "max_new_tokens": eval_args.max_new_tokens, "judge_mode": judge_args.judge_mode,
               "region_proposer": judge_args.region_proposer, "region_grid": judge_args.region_grid,
               "map_rule": judge_args.map_rule}
    try:
        report = evaluate_models(model_args.model, adapters, settings, options, save_images=eval_args.save_images)
    except ValueError as err:
        raise SystemExit(f"srum-trl eval: {err}") from None
    if eval_args.protocol == "judge":  # the summary this command always wrote, for the last model evaluated
        name = list(report["models"])[-1]
        scores = json.load(open(os.path.join(gen.out, name, "scores.json")))["per_image"]
        with open(os.path.join(gen.out, "eval.json"), "w") as f:
            json.dump({"model": model_args.model, "adapter": model_args.adapter, "num_prompts": report["num_prompts"],
                       "mean_reward": report["models"][name]["overall"],
                       "mean_token_weight": sum(s["token_weight"] for s in scores) / len(scores),
                       "guidance_scale": report["guidance_scale"], "seed": gen.seed}, f, indent=2)
    print(report["table"])
    print(f"written to {gen.out} (results.json, results.md, one folder per model)")


def run_training(trainer_cls, config_cls, argv, prog: str):
    """Parse `TrainScriptArgs` + `config_cls` + TRL's `ModelConfig` from `argv`, train, save (and push)."""
    from trl import ModelConfig, TrlParser, get_peft_config

    from .data.prompts import load_prompt_dataset

    parser = TrlParser((TrainScriptArgs, config_cls, ModelConfig), prog=prog)
    script, config, model_config = parser.parse_args_and_config(argv)
    if model_config.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    init = dict(config.model_init_kwargs or {})
    init.setdefault("attn_implementation", model_config.attn_implementation or "sdpa")
    if model_config.dtype not in (None, "auto"):
        init.setdefault("dtype", model_config.dtype)
    config.model_init_kwargs = init
    train = load_prompt_dataset(script.prompts, allow_partial_rollouts=script.allow_partial_rollouts)
    if script.max_prompts:
        train = train.select(range(min(script.max_prompts, len(train))))
    eval_dataset = load_prompt_dataset(script.eval_prompts) if script.eval_prompts else None
    peft_config = get_peft_config(model_config)  # target_modules None: the backend's default LoRA targets
    trainer = trainer_cls(model_config.model_name_or_path, args=config, train_dataset=train,
                          eval_dataset=eval_dataset, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)  # a path, or "true": the last checkpoint
    trainer.save_model(config.output_dir)
    if config.push_to_hub:
        trainer.push_to_hub()
    return trainer


def cmd_train(argv):
    """SRUM training; every SRUMConfig field and TRL's ModelConfig (LoRA) flags are accepted."""
    from .trainers import SRUMConfig, SRUMTrainer

    run_training(SRUMTrainer, SRUMConfig, argv, "srum-trl train")


def cmd_grpo(argv):
    """GRPO (or self-SFT with --mode sft) on image tokens; every GRPOUMMConfig field and LoRA flag is accepted."""
    from .trainers import GRPOUMMConfig, GRPOUMMTrainer

    run_training(GRPOUMMTrainer, GRPOUMMConfig, argv, "srum-trl grpo")


def _save_pictures(dataset, indices, folder):
    from .data import reward_map_from_row
    from .rewards import render_reward_map

    indices = list(indices)
    if not indices:
        return
    os.makedirs(folder, exist_ok=True)
    for i in indices:
        row = dataset[i]
        render_reward_map(row["image"], reward_map_from_row(row), row["prompt"]).save(
            os.path.join(folder, f"{i:05d}.png"))
    print(f"{len(indices)} reward-map pictures in {folder}")


def cmd_show(argv):
    """Draw stored judged images beside their reward maps (boxes and scores)."""
    from transformers import HfArgumentParser

    from .data import load_rollouts

    (args,) = HfArgumentParser((ShowArgs,)).parse_args_into_dataclasses(argv)
    indices = None
    if args.indices != "all":
        try:
            indices = [int(i) for i in args.indices.split(",")]
        except ValueError:
            raise SystemExit(f"--indices {args.indices!r}: give comma-separated row numbers such as 0,1,2, or "
                             "'all'.") from None
    dataset = load_rollouts(args.rollouts, allow_partial=True)  # a store being made can be looked at
    if indices is None:
        indices = range(len(dataset))
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise SystemExit(f"--indices {bad} out of range: the store holds {len(dataset)} rows.")
    _save_pictures(dataset, indices, args.out)


COMMANDS = {
    "generate": cmd_generate,
    "rollout": cmd_rollout,
    "train": cmd_train,
    "grpo": cmd_grpo,
    "eval": cmd_eval,
    "show": cmd_show,
}


def _extra_commands():
    try:
        from .shapes.cli import COMMANDS as shapes_commands
    except ImportError:
        return {}
    return {"shapes": shapes_commands}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = dict(COMMANDS)
    groups = _extra_commands()
    usage = "usage: srum-trl {" + ",".join(list(commands) + list(groups)) + "} ... [--help]\n\n" + "\n".join(
        f"  {name:10s}{(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in commands.items()
    ) + "".join(f"\n  {name:10s}ShapesWorld tools: {', '.join(sub)}" for name, sub in groups.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    name, rest = argv[0], argv[1:]
    if name in groups:
        sub = groups[name]
        if not rest or rest[0] in ("-h", "--help") or rest[0] not in sub:
            print(f"usage: srum-trl {name} {{{','.join(sub)}}} ... [--help]")
            raise SystemExit(0 if not rest or rest[0] in ("-h", "--help") else 2)
        return sub[rest[0]](rest[1:])
    if name not in commands:
        print(usage, file=sys.stderr)
        raise SystemExit(f"srum-trl: unknown command {name!r}")
    commands[name](rest)


if __name__ == "__main__":
    main()
