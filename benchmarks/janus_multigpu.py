#!/usr/bin/env python
"""Multi-process check of SRUMTrainer and GRPOUMMTrainer on a random-weight Janus model, through `accelerate launch`.

Checked, and written to `--out` (JSON):

1. rollouts are sharded: in every round each process samples (with the trainer's own `backend.generate` call) only
   its share of the global batch; the shares are disjoint and, concatenated in process order, are the global batch
   that a single process draws from the same sampler (GRPO: whole groups of `num_generations` copies of a prompt,
   possibly split over processes);
2. rewards and reward maps are gathered for logging: the logged reward statistics (mean, std, judge scores, map
   weights, guidance margin) equal those of the single-process run on the full batch;
3. loss, gradient norm and parameter update after a few optimizer steps equal the single-process run on the same
   global batch (float32 tolerance on the CPU, bf16 tolerance on GPUs); GRPO: also the advantages, computed from
   the gathered rewards.

How: local rank 0 first runs the single-process reference in a subprocess (no process group, one device, per-device
batch = the global batch), which samples its rollouts for real and records them. Then every process trains the same
trainer from the same seed. Its `backend.generate` is the real one (each process samples its own prompts, under
DDP or FSDP), but the tokens it returns are replaced by the reference's tokens for the same global rows, so that
sampling randomness does not enter the comparison; everything else (sampler, judge, rewards, advantages, loss,
backward through the DDP / FSDP wrapper, optimizer) is the trainers' own code. The optimizer is plain SGD without
clipping, so the parameter update is the gradient itself (Adam's first step would hide a gradient scale error).

Two H200 GPUs, DDP then FSDP2 (the second launch reuses the reference of the first):

    accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 benchmarks/janus_multigpu.py \
        --reference janus_ref.pt --out janus_ddp.json
    accelerate launch --config_file examples/accelerate/fsdp_janus.yaml --num_processes 2 \
        benchmarks/janus_multigpu.py --reference janus_ref.pt --out janus_fsdp.json

On the CPU (gloo, float32, the tiny model by default):

    accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 benchmarks/janus_multigpu.py \
        --cpu --out cpu_ddp.json
    accelerate launch --config_file examples/accelerate/fsdp_janus.yaml --num_processes 2 \
        benchmarks/janus_multigpu.py --cpu --out cpu_fsdp.json
    accelerate launch --cpu --num_processes 2 benchmarks/janus_multigpu.py --cpu --out cpu.json

(`accelerate launch --cpu` starts a single process unless given an MPI hostfile; the script then starts its own
`--nprocs` gloo processes with torchrun.)

Model presets (`--model`): "tiny" (~1M parameters, 4x4 image tokens; the default with --cpu) and "100m" (a ~100M
Llama language model, 16x16 image tokens; the default on GPUs).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = "a red green blue circle square triangle and does this image show is there here yes no describe".split()
PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")] + [
    "a red circle and a blue square", "a green triangle and a red circle", "a blue circle and a green square"]

# The experiment, in global numbers (per-device batch = global batch / processes).
SRUM = dict(global_batch=4, steps_per_generation=2, gradient_accumulation_steps=2, steps=2, lr=0.05)
GRPO = dict(global_batch=6, steps_per_generation=2, gradient_accumulation_steps=2, steps=2, lr=0.05,
            num_generations=4)
SRUM_METRICS = ("reward", "reward_std", "rewards/umm_judge/mean", "srum/global_score", "srum/local_score",
                "srum/token_weight", "srum/token_loss", "guidance_margin")
SFT_METRICS = ("reward", "reward_std", "rewards/brightness/mean", "rewards/brightness/std", "sft/token_loss",
               "guidance_margin")
GRPO_METRICS = ("reward", "reward_std", "rewards/brightness/mean", "rewards/brightness/std", "rewards/umm_judge/mean",
                "rewards/umm_judge/std", "frac_reward_zero_std", "clip_ratio/region_mean", "guidance_margin")
# (rtol, atol) of logged values and of GRPO's advantages against the reference; parameter updates: relative L2 error
# of the whole update. bf16: the judge's scores move by a few 1e-3 (bf16 logits; the GRPO run's dense advantages follow
# them); a world-size bug moves the update by 50-100%.
TOLERANCE = {"fp32": {"value": (1e-4, 1e-6), "advantages": (1e-4, 1e-5), "update": 1e-3},
             "bf16": {"value": (2e-2, 1e-2), "advantages": (5e-2, 5e-2), "update": 1e-1}}
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
            "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Result JSON (written by rank 0).")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), float32.")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision (always on GPUs; with --cpu it exercises the bf16 paths, e.g. FSDP2's "
                        "bf16 parameters, and compares with the bf16 tolerance).")
    p.add_argument("--model", choices=("tiny", "100m"), default=None, help="Model preset (tiny with --cpu, else 100m).")
    p.add_argument("--trainers", default="srum,grpo,sft",
                   help="Comma-separated: srum (SRUMTrainer), grpo (GRPOUMMTrainer, dense advantages), sft "
                        "(GRPOUMMTrainer mode='sft', best of each group).")
    p.add_argument("--reference", default=None,
                   help="Single-process reference file (.pt); computed by local rank 0 when missing. "
                        "Default: next to --out.")
    p.add_argument("--nprocs", type=int, default=2, help="--cpu without a multi-process launcher: processes to start.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # internal: compute the reference
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.cpu else "100m")
    args.bf16 = args.bf16 or not args.cpu
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    for t in args.trainers:
        if t not in ("srum", "grpo", "sft"):
            p.error(f"unknown trainer {t!r}")
    args.reference = args.reference or os.path.splitext(args.out)[0] + ".reference.pt"
    return args


# ------------------------------------------------------------------------------------------------------- model
def spec_for(preset: str):
    from srum_trl.models.janus.tiny import TinyJanusSpec

    if preset == "tiny":
        return TinyJanusSpec()
    # ~100M parameters: a 12-layer, 768-wide Llama, 128 px images on a 16x16 token grid, 1024-entry codebook
    return TinyJanusSpec(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                         max_position_embeddings=1024, image_size=128, patch_size=8, vision_hidden_size=256,
                         vision_layers=2, vision_heads=4, vq_base_channels=64, vq_latent_channels=64,
                         codebook_size=1024)


def build_model(args):
    from srum_trl.models.janus import build_tiny_janus

    return build_tiny_janus(WORDS, spec_for(args.model), seed=args.seed)


def brightness(prompts, completions, **kwargs):
    """A deterministic plain reward (mean brightness in [-1, 1]): GRPO's advantages stay well conditioned in bf16."""
    import numpy as np

    return [float(np.asarray(im.convert("L"), dtype=np.float32).mean() / 127.5 - 1.0) for im in completions]


def make_trainer(kind: str, model, processor, world: int, args, out_dir: str):
    from datasets import Dataset

    from srum_trl import GRPOUMMConfig, GRPOUMMTrainer, SRUMConfig, SRUMTrainer, UMMJudgeRewardFunction

    exp = SRUM if kind == "srum" else GRPO  # sft: GRPO's batch and groups
    if exp["global_batch"] % world:
        raise ValueError(f"{kind}: global batch {exp['global_batch']} is not divisible by {world} processes")
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=exp["global_batch"] // world,
        gradient_accumulation_steps=exp["gradient_accumulation_steps"],
        steps_per_generation=exp["steps_per_generation"],
        max_steps=exp["steps"], learning_rate=exp["lr"], optim="sgd", max_grad_norm=1e9, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", seed=args.seed,
        bf16=args.bf16, use_cpu=args.cpu, dataloader_num_workers=0, dataloader_pin_memory=False,
        disable_tqdm=True, guidance_scale=3.0,
    )
    if getattr(args, "cpu_fsdp", False):  # keep the state that _fsdp_on_cpu labelled (transformers resets it otherwise)
        _fsdp_on_cpu()
        common["accelerator_config"] = {"use_configured_state": True}
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    if kind == "srum":
        return SRUMTrainer(model, args=SRUMConfig(**common), train_dataset=dataset, processing_class=processor)
    if kind == "sft":  # self-SFT on the best image of each group: processes hold different numbers of rows
        config = GRPOUMMConfig(**common, num_generations=exp["num_generations"], mode="sft", sft_best_of_n=True)
        return GRPOUMMTrainer(model, reward_funcs=[brightness], args=config, train_dataset=dataset,
                              processing_class=processor)
    config = GRPOUMMConfig(**common, num_generations=exp["num_generations"], advantage_mode="dense",
                           reward_weights=[1.0, 0.0])  # the judge makes the dense maps; brightness the reward
    return GRPOUMMTrainer(model, reward_funcs=[brightness, UMMJudgeRewardFunction()], args=config,
                          train_dataset=dataset, processing_class=processor)


def trainable(model) -> dict:
    """Full float32 CPU copies of the trainable parameters (FSDP2 DTensors gathered: every process must call)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[name] = t.float().cpu().clone()
    return out


def plain_copy(model, processor):
    """An unsharded float32 copy of the starting model: it decodes the pinned images (the VQ does not train)."""
    from srum_trl.models import JanusBackend

    return JanusBackend(copy.deepcopy(model).eval().requires_grad_(False), processor)


def decode_rows(plain, tokens) -> list:
    """Images of `tokens`, one row at a time: the same pixels whatever the batch (cuDNN picks kernels by shape)."""
    return [plain.decode(tokens[i : i + 1])[0] for i in range(len(tokens))]


def logs_by_step(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


# --------------------------------------------------------------------------------------------------- reference
def run_reference(args) -> None:
    """One process, no process group: per-device batch = the global batch; rollouts sampled for real, recorded."""
    import torch

    result = {"settings": settings(args), "trainers": {}}
    for kind in args.trainers:
        model, processor = build_model(args)
        before = trainable(model)
        plain = plain_copy(model, processor)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(kind, model, processor, 1, args, tmp)
            plain.model.to(trainer.accelerator.device)
            rounds, advantages = [], []
            original = trainer.backend.generate

            def generate(prompts, config=None, seed=None, progress=False, _original=original, _rounds=rounds,
                         _plain=plain):
                rollout = _original(prompts, config, seed=seed)
                rollout.images = decode_rows(_plain, rollout.tokens)  # as the multi-process run decodes them
                _rounds.append({"prompts": list(prompts), "tokens": rollout.tokens.clone(),
                                "guidance_margin": rollout.guidance_margin, "logprobs": rollout.logprobs})
                return rollout

            trainer.backend.generate = generate
            if kind == "grpo":
                _record_advantages(trainer, advantages)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        after = trainable(trainer.model)
        result["trainers"][kind] = {
            "rounds": rounds, "logs": logs_by_step(trainer), "update": {k: after[k] - before[k] for k in before},
            "advantages": advantages, "train_s": seconds,
        }
        del trainer, model, plain
    torch.save(result, args.reference + ".tmp")
    os.replace(args.reference + ".tmp", args.reference)  # whole, for the ranks waiting for it


def load_reference(path: str) -> dict:
    """The reference written by `run_reference`, loaded with `torch.load(weights_only=True)`: it holds only plain
    containers, numbers, strings and tensors, and a reference file from elsewhere cannot run code when loaded."""
    import torch

    return torch.load(path, weights_only=True)


def settings(args) -> dict:
    return {"model": args.model, "seed": args.seed, "cpu": args.cpu, "bf16": args.bf16, "srum": SRUM, "grpo": GRPO,
            "prompts": PROMPTS}


def _record_advantages(trainer, sink: list) -> None:
    original = trainer._generate_and_score

    def generate_and_score(batch, mode):
        out = original(batch, mode)
        if "advantages" in out:
            sink.append(out["advantages"].detach().float().cpu().clone())
        return out

    trainer._generate_and_score = generate_and_score


def ensure_reference(args, local_rank: int) -> dict:
    """Local rank 0 computes the reference in a clean single-process subprocess (first visible GPU); the other
    ranks wait for its file."""
    import torch

    failed = args.reference + ".failed"
    if local_rank == 0 and not os.path.exists(args.reference):
        if os.path.exists(failed):
            os.remove(failed)
        env = {k: v for k, v in os.environ.items()
               if k not in DIST_ENV and not k.startswith(("ACCELERATE_", "FSDP_", "TORCHELASTIC_"))}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = "" if args.cpu else (visible.split(",")[0] if visible else "0")
        cmd = [sys.executable, os.path.abspath(__file__), "--single", "--out", args.out, "--reference",
               args.reference, "--model", args.model, "--trainers", ",".join(args.trainers), "--seed", str(args.seed)]
        cmd += ["--cpu"] if args.cpu else []
        cmd += ["--bf16"] if args.bf16 else []
        print(f"[rank 0] single-process reference: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        print(f"[rank 0] reference done in {time.perf_counter() - start:.1f}s (rc={rc})", flush=True)
        if rc != 0 or not os.path.exists(args.reference):
            open(failed, "w").write(f"rc={rc}")
            raise SystemExit(f"the single-process reference failed (rc={rc})")
    deadline = time.time() + 1800
    while not os.path.exists(args.reference):
        if os.path.exists(failed) or time.time() > deadline:
            raise SystemExit("the single-process reference failed or timed out")
        time.sleep(0.5)
    ref = load_reference(args.reference)
    if ref["settings"] != settings(args):
        raise SystemExit(f"{args.reference} was made with other settings: {ref['settings']} (delete it)")
    missing = [t for t in args.trainers if t not in ref["trainers"]]
    if missing:
        raise SystemExit(f"{args.reference} has no reference for {missing} (delete it)")
    return ref


# ------------------------------------------------------------------------------------------------- distributed
def _fsdp_on_cpu() -> None:
    """accelerate turns its FSDP plugin on only for accelerator devices, while FSDP2 itself runs on CPU processes
    (gloo). For `--cpu` under an FSDP config: start the CPU process group, then label the state multi-GPU so that
    the FSDP plugin applies; the device stays the CPU. (A test shim: GPU runs do not use it.)"""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


def pin_generation(trainer, reference_rounds, sink: dict, plain_backend):
    """`backend.generate` samples for real (this process's prompts, as the trainer asked: under DDP / FSDP), then
    returns the reference's tokens for the same global rows, decoded as the reference decodes them."""
    from accelerate.utils import gather_object

    from srum_trl.models import Rollout

    backend = trainer.backend
    original = backend.generate
    rank = trainer.accelerator.process_index

    def generate(prompts, config=None, seed=None, progress=False):
        k = len(sink["local"])
        real = original(prompts, config, seed=seed)
        if k == 0:  # sampling through the prepared (DDP / FSDP) model vs a plain copy
            plain = plain_backend.generate(prompts, config, seed=seed)
            sink["round0_real_tokens_equal_unsharded"] = float((plain.tokens == real.tokens).float().mean())
        shares = gather_object([list(prompts)])
        offset = sum(len(s) for s in shares[:rank])
        sink["local"].append(list(prompts))
        sink["shares"].append(shares)
        ref = reference_rounds[k] if k < len(reference_rounds) else None
        if ref is None or [p for s in shares for p in s] != ref["prompts"]:
            sink["mismatch"] = True
            return real  # reported as a failed sharding check
        rows = slice(offset, offset + len(prompts))
        tokens = ref["tokens"][rows].clone()
        return Rollout(
            prompts=list(prompts), images=decode_rows(plain_backend, tokens), tokens=tokens, grid=real.grid,
            guidance=real.guidance, temperature=real.temperature, seed=seed,
            guidance_margin=ref["guidance_margin"][rows].clone() if ref["guidance_margin"] is not None else None,
            logprobs=ref["logprobs"][rows].clone() if ref["logprobs"] is not None else None,
        )

    backend.generate = generate


def close(a, b, rtol, atol) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * abs(b)


def run_distributed(args, ref) -> dict:
    from accelerate.utils import gather_object

    precision = "bf16" if args.bf16 else "fp32"
    out = {"trainers": {}}
    for kind in args.trainers:
        refk = ref["trainers"][kind]
        model, processor = build_model(args)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        before = trainable(model)
        plain = plain_copy(model, processor)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(kind, model, processor, int(os.environ.get("WORLD_SIZE", "1")), args, tmp)
            acc = trainer.accelerator
            plain.model.to(acc.device)
            sink = {"local": [], "shares": [], "mismatch": False}
            pin_generation(trainer, refk["rounds"], sink, plain)
            advantages = []
            if kind == "grpo":
                _record_advantages(trainer, advantages)
            acc.wait_for_everyone()
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            after = trainable(trainer.model)  # collective under FSDP2
            per_rank = gather_object([{"rank": acc.process_index, "local": sink["local"], "advantages": advantages,
                                       "tokens_equal_unsharded": sink.get("round0_real_tokens_equal_unsharded"),
                                       "mismatch": sink["mismatch"]}])
            info = {
                "distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
                "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
                "fsdp_version": getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", None),
                "mixed_precision": acc.mixed_precision, "device": str(acc.device),
            }
            logs = logs_by_step(trainer)
            params = list(trainer.model.parameters())  # FSDP2: DTensors, each process holding its shard
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
            info["local_parameter_fraction"] = local / sum(p.numel() for p in params)
        if acc.process_index == 0:
            out["trainers"][kind] = compare(kind, refk, per_rank, logs, before, after, seconds, TOLERANCE[precision])
            out["trainers"][kind]["setup"] = info
        del trainer, model, plain
        acc.wait_for_everyone()
    return out


def compare(kind, refk, per_rank, logs, before, after, seconds, tolerance) -> dict:
    import torch

    rtol, atol = tolerance["value"]
    update_tol = tolerance["update"]
    per_rank = sorted(per_rank, key=lambda r: r["rank"])
    world = len(per_rank)
    res: dict = {"train_s": round(seconds, 2), "reference_train_s": round(refk["train_s"], 2), "checks": {}}
    checks = res["checks"]

    # 1. sharding
    rounds = []
    for k, ref_round in enumerate(refk["rounds"]):
        local = [r["local"][k] if k < len(r["local"]) else None for r in per_rank]
        joined = [p for share in local if share for p in share]
        rounds.append({"per_rank": local, "global_reference": ref_round["prompts"]})
        ok = all(share is not None and len(share) == len(ref_round["prompts"]) // world for share in local)
        ok = ok and joined == ref_round["prompts"]
        if kind == "srum":  # unique prompts per round: the shares are disjoint
            ok = ok and all(not (set(a) & set(b)) for i, a in enumerate(local) for b in local[i + 1:])
        rounds[-1]["ok"] = ok
    res["rounds"] = rounds
    checks["rollouts_sharded"] = bool(rounds) and all(r["ok"] for r in rounds) and not any(
        r["mismatch"] for r in per_rank) and all(len(r["local"]) == len(refk["rounds"]) for r in per_rank)
    if kind in ("grpo", "sft"):
        g = GRPO["num_generations"]
        groups_ok, spanning = True, 0
        for r in rounds:
            rows = r["global_reference"]
            blocks = [rows[i:i + g] for i in range(0, len(rows), g)]
            groups_ok &= all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == len(blocks)
            bounds = [0]
            for share in r["per_rank"]:
                bounds.append(bounds[-1] + len(share or []))
            spanning += sum(any(i * g < b < (i + 1) * g for b in bounds) for i in range(len(blocks)))
        checks["groups_whole_in_global_batch"] = bool(groups_ok)
        res["groups_split_over_processes"] = spanning
    if kind == "grpo":
        # advantages: the concatenation over processes of each round's local advantages = the reference's
        ok, worst = len(refk["advantages"]) > 0, 0.0
        for k, ref_adv in enumerate(refk["advantages"]):
            parts = [r["advantages"][k] for r in per_rank if k < len(r["advantages"])]
            if len(parts) != world:
                ok = False
                continue
            got = torch.cat(parts)
            if got.shape != ref_adv.shape:
                ok = False
                continue
            err = float((got - ref_adv).abs().max())
            worst = max(worst, err)
            ok &= bool(torch.allclose(got, ref_adv, *tolerance["advantages"]))
        checks["advantages_equal"] = bool(ok)
        res["advantages_max_abs_diff"] = worst
    tokens_equal = [r["tokens_equal_unsharded"] for r in per_rank]
    res["round0_sampled_tokens_equal_to_unsharded_model"] = tokens_equal

    # 2 + 3. logged values, step by step
    ref_logs = refk["logs"]
    names = ("loss", "grad_norm") + {"srum": SRUM_METRICS, "grpo": GRPO_METRICS, "sft": SFT_METRICS}[kind]
    table, values_ok, loss_ok = {}, len(logs) == len(ref_logs) and len(logs) > 0, True
    for name in names:
        rows = []
        for got, want in zip(logs, ref_logs):
            a, b = got.get(name), want.get(name)
            # a std of rewards on [-1, 1] is as exact as the rewards themselves: the same absolute tolerance, not one
            # relative to the (small) std
            tol = (rtol, max(atol, rtol)) if "std" in name else (rtol, atol)
            ok = a is not None and b is not None and close(a, b, *tol)  # every listed value is logged
            rows.append({"multi": a, "single": b, "ok": ok})
            if name in ("loss", "grad_norm"):
                loss_ok &= ok
            else:
                values_ok &= ok
        table[name] = rows
    res["values"] = table
    checks["rewards_and_maps_gathered"] = bool(values_ok)
    checks["loss_and_grad_norm_equal"] = bool(loss_ok) and len(logs) == len(ref_logs) > 0

    # 3. parameter update
    num, den, max_abs = 0.0, 0.0, 0.0
    for name, ref_update in refk["update"].items():
        update = after[name] - before[name]
        num += float((update - ref_update).pow(2).sum())
        den += float(ref_update.pow(2).sum())
        max_abs = max(max_abs, float((update - ref_update).abs().max()))
    rel = math.sqrt(num) / max(math.sqrt(den), 1e-30)
    res["update"] = {"relative_l2_error": rel, "max_abs_diff": max_abs, "reference_norm": math.sqrt(den),
                     "tolerance": update_tol}
    checks["parameter_update_equal"] = rel <= update_tol and den > 0 and set(after) == set(refk["update"])
    res["passed"] = all(checks.values())
    return res


# --------------------------------------------------------------------------------------------------------- main
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(args) -> int:
    """`--cpu` without a multi-process launcher: start `--nprocs` processes with torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nprocs), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), *sys.argv[1:]]
    print(f"starting {args.nprocs} CPU processes: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cpu:  # the GPU configs ask for bf16: float32 on the CPU unless --bf16
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.bf16 else "no"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import transformers

    transformers.logging.set_verbosity_error()
    if args.single:
        run_reference(args)
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "LOCAL_RANK" not in os.environ:
        if args.cpu:
            return relaunch(args)
        raise SystemExit("launch with `accelerate launch --num_processes 2 ...` (or use --cpu)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    ref = ensure_reference(args, local_rank)
    args.cpu_fsdp = args.cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    import torch

    start = time.perf_counter()
    result = run_distributed(args, ref)
    if int(os.environ.get("RANK", "0")) == 0:
        result.update(
            script="benchmarks/janus_multigpu.py", model=args.model, world_size=world,
            argv=[os.path.basename(a) if os.path.isabs(a) else a for a in sys.argv[1:]],  # no machine paths
            device="cpu" if args.cpu else torch.cuda.get_device_name(0), torch=torch.__version__,
            wall_s=round(time.perf_counter() - start, 1),
            precision="bf16" if args.bf16 else "fp32", tolerance=TOLERANCE["bf16" if args.bf16 else "fp32"],
            reference=os.path.basename(args.reference),
        )
        result["passed"] = all(t["passed"] for t in result["trainers"].values())
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        for kind, t in result["trainers"].items():
            print(f"{kind}: {t['setup']['distributed_type']} x{t['setup']['num_processes']} "
                  f"checks={t['checks']} update_rel_err={t['update']['relative_l2_error']:.2e}", flush=True)
        print(f"{'PASSED' if result['passed'] else 'FAILED'}: {args.out}", flush=True)
        return 0 if result["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
