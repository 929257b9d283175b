#!/usr/bin/env python
"""GPU benchmark of flow GRPO on BAGEL: `GRPOUMMTrainer` rounds end to end at BAGEL-7B-MoT dimensions, random bf16
weights created on the GPU (no download), LoRA on the generation expert.

One round = 8 images of one prompt at 512 px sampled with a 2-step SDE window (14 sampler steps, text CFG 4 in
rollouts and loss), judged by the model itself (global question + 2x2 grid regions), trained (the recorded steps
recomputed with gradients: 8 images x 2 steps x 2 CFG rows, in micro-batches of `--train-batch`), one AdamW step.
Each phase is timed and its peak GPU memory recorded through the trainer's own calls (`backend.generate`,
`trainer._score`, `trainer.compute_loss`, the backward, the optimizer step); the first round warms up, the later
ones are reported. Then, in the same process, the sampler alone: the deterministic (ODE) sampler beside the SDE
sampler (window and every step stochastic), same batch, same steps, images/s.

    # one H200: about 2-3 minutes
    python benchmarks/bagel_flow_grpo.py --out bagel_flow_grpo.json

    # plumbing check on the CPU with a tiny configuration (what CI runs)
    python benchmarks/bagel_flow_grpo.py --smoke --out /tmp/bagel_flow_grpo_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bagel_gpu import build, gib, import_bagel, prompts_for, sync, table  # noqa: E402


class PhaseClock:
    """Wraps callables so that each call records its seconds and peak GPU memory under a phase name."""

    def __init__(self, device):
        self.device, self.rows, self.round = device, [], 0

    def wrap(self, name: str, fn):
        import torch

        def timed_call(*args, **kwargs):
            sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
            self.rows.append({"round": self.round, "phase": name, "seconds": time.perf_counter() - start,
                              "peak_memory_gib": gib(peak) if peak is not None else None})
            return out

        return timed_call

    def summary(self, rounds) -> list[dict]:
        """Per phase: seconds summed within a round and averaged over `rounds`, the largest peak memory."""
        out = []
        for name in dict.fromkeys(r["phase"] for r in self.rows):
            rows = [r for r in self.rows if r["phase"] == name and r["round"] in rounds]
            if not rows:
                continue
            seconds = sum(r["seconds"] for r in rows) / len(rounds)
            peaks = [r["peak_memory_gib"] for r in rows if r["peak_memory_gib"] is not None]
            out.append({"phase": name, "seconds_per_round": round(seconds, 3), "calls_per_round": len(rows) // len(rounds),
                        "peak_memory_gib": max(peaks) if peaks else None})
        return out


def make_trainer(backend, args, device, output_dir):
    """A `GRPOUMMTrainer` on one prompt (rounds of `args.images` images), LoRA on the generation expert."""
    from datasets import Dataset
    from peft import LoraConfig

    from srum_trl import GRPOUMMConfig, GRPOUMMTrainer

    accumulation = args.images // args.train_batch
    config = GRPOUMMConfig(
        output_dir=output_dir, num_generations=args.images, per_device_train_batch_size=args.train_batch,
        gradient_accumulation_steps=accumulation, guidance_scale=args.guidance, sde_window_size=args.window,
        learning_rate=1e-5, bf16=device.type == "cuda", use_cpu=device.type != "cuda", report_to=[],
        save_strategy="no", logging_steps=1, seed=0, max_steps=args.rounds, gradient_checkpointing=True,
    )
    prompt = prompts_for(1, length=12, seed=3)[0]
    trainer = GRPOUMMTrainer(backend, args=config, train_dataset=Dataset.from_dict({"prompt": [prompt]}),
                             peft_config=LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank))
    trainer.backend.core.gradient_checkpointing_enable()
    trainer.create_optimizer()
    trainer.model.train()
    return trainer, prompt, accumulation


def run_rounds(trainer, prompt, accumulation, clock, rounds: int) -> list[dict]:
    """`rounds` generation rounds through `trainer.training_step` (which samples and judges on the first micro-step
    of a round), each followed by one optimizer step; returns the trainer's logged metrics per round."""
    import torch

    trainer.backend.generate = clock.wrap("sampling (SDE window) + VAE decode", trainer.backend.generate)
    trainer._score = clock.wrap("judging (self-judge, 1 + 4 questions per image)", trainer._score)
    trainer.compute_loss = clock.wrap("training forward (recorded steps, with gradients)", trainer.compute_loss)
    trainer.accelerator.backward = clock.wrap("training backward", trainer.accelerator.backward)
    optimizer_step = clock.wrap("optimizer step (AdamW on LoRA)", lambda: (trainer.optimizer.step(),
                                                                          trainer.optimizer.zero_grad()))
    rows = [{"prompt": prompt}] * trainer.args.generation_batch_size  # what the dataloader serves per round
    trainer.current_gradient_accumulation_steps = accumulation  # set by Trainer.train's loop otherwise
    logs = []
    for r in range(rounds):
        clock.round = r
        start = time.perf_counter()
        for _ in range(accumulation):
            trainer.training_step(trainer.model, rows)
        torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.requires_grad], 1.0)
        optimizer_step()
        sync(trainer.accelerator.device)
        clock.rows.append({"round": r, "phase": "round total", "seconds": time.perf_counter() - start,
                           "peak_memory_gib": None})
        logs.append({k: sum(v) / len(v) for k, v in trainer._metrics["train"].items() if v})
        trainer._metrics["train"].clear()
    for name in ("compute_loss", "_score"):  # the class's own methods again
        delattr(trainer, name)
    delattr(trainer.backend, "generate")
    delattr(trainer.accelerator, "backward")
    return logs


def bench_samplers(backend, device, images: int, guidance: float, repeat: int) -> list[dict]:
    from srum_trl.models import GenerationConfig
    from srum_trl.models.flow_sde import SDEConfig

    prompts = prompts_for(images, length=12, seed=4)
    variants = [("deterministic (ODE)", None), ("SDE window of 2", SDEConfig(window_size=2, seed=1)),
                ("SDE on every step", SDEConfig(steps="all", seed=1))]
    rows = []
    for name, sde in variants:
        config = GenerationConfig(guidance=guidance, batch_size=images, sde=sde)
        backend.generate(prompts[:1], config, seed=0)  # warm-up of this path (1 image)
        sync(device)
        start = time.perf_counter()
        for k in range(repeat):
            backend.generate(prompts, config, seed=k)
        sync(device)
        seconds = (time.perf_counter() - start) / repeat
        rows.append({"sampler": name, "images": images, "steps": backend.num_timesteps - 1, "seconds": round(seconds, 3),
                     "images_per_s": round(images / seconds, 3)})
    base = rows[0]["seconds"]
    for row in rows:
        row["vs_deterministic"] = round(row["seconds"] / base, 3)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result file.")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-timesteps", type=int, default=15, help="Grid points (num_timesteps - 1 steps).")
    parser.add_argument("--images", type=int, default=8, help="Images per round (one prompt: one group).")
    parser.add_argument("--train-batch", type=int, default=4, help="Images per training micro-batch.")
    parser.add_argument("--window", type=int, default=2, help="SDE window size.")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="Rounds (the first one warms up).")
    parser.add_argument("--sampler-repeat", type=int, default=1, help="Timed sampler calls per variant.")
    parser.add_argument("--smoke", action="store_true", help="Tiny configuration on the CPU (plumbing check).")
    args = parser.parse_args(argv)
    if args.images % args.train_batch:
        parser.error("--images must be a multiple of --train-batch")

    import tempfile

    import torch

    bagel = import_bagel()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        torch.set_num_threads(1)  # tiny matrices: threads only contend
        args.image_size, args.num_timesteps, args.images, args.train_batch, args.rounds = 64, 5, 4, 2, 2
    start = time.perf_counter()
    backend, _ = build(bagel, args, device, dtype)
    backend._image_size, backend.num_timesteps = args.image_size, args.num_timesteps
    sync(device)
    init_s = time.perf_counter() - start
    result = {"torch": torch.__version__, "smoke": args.smoke, "command": "python benchmarks/bagel_flow_grpo.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "parameters": backend.core.num_parameters_by_part(),
              "settings": {"image_size": args.image_size, "sampler_steps": args.num_timesteps - 1,
                           "images_per_round": args.images, "train_micro_batch": args.train_batch,
                           "sde_window": args.window, "guidance": args.guidance, "lora_rank": args.lora_rank,
                           "lora_targets": "generation expert", "gradient_checkpointing": True},
              "model_init_s": round(init_s, 2)}
    clock = PhaseClock(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, prompt, accumulation = make_trainer(backend, args, device, tmp)
        logs = run_rounds(trainer, prompt, accumulation, clock, args.rounds)
        measured = list(range(1, args.rounds)) or [0]
        result["phases"] = clock.summary(measured)
        result["round_phases_raw"] = clock.rows
        result["trainer_logs"] = logs
        result["sampler"] = bench_samplers(trainer.backend, device, args.images, args.guidance, args.sampler_repeat)
    if device.type == "cuda":
        result["peak_memory_gib_overall"] = gib(torch.cuda.max_memory_allocated(device))
    total = next(r for r in result["phases"] if r["phase"] == "round total")["seconds_per_round"]
    result["round_seconds"] = total
    result["images_per_s_end_to_end"] = round(args.images / total, 3)
    print(f"device: {result['device']} ({result['dtype']}); parameters {result['parameters']['total'] / 1e9:.2f}B; "
          f"model init {result['model_init_s']} s")
    print(f"\nOne flow-GRPO round: {args.images} images of one prompt at {args.image_size} px, "
          f"{args.num_timesteps - 1} sampler steps, SDE window {args.window}, CFG {args.guidance} "
          f"(rounds {measured} of {args.rounds}; round 0 warms up):")
    print(table(result["phases"], ["phase", "seconds_per_round", "calls_per_round", "peak_memory_gib"]))
    last = logs[-1]
    print(f"\nsampling/training log-prob mismatch (|recomputed - recorded|, per token): mean "
          f"{last.get('sampling/sampling_logp_difference/mean', float('nan')):.3g}, max "
          f"{last.get('sampling/sampling_logp_difference/max', float('nan')):.3g}")
    print("\nSampler alone (same batch, same steps, VAE decode included):")
    print(table(result["sampler"], ["sampler", "images", "steps", "seconds", "images_per_s", "vs_deterministic"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=float)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
