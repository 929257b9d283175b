#!/usr/bin/env python
"""GPU benchmark of the native BAGEL backend at full BAGEL-7B-MoT dimensions, with random weights (no download).

Needs only torch, accelerate, peft, transformers, diffusers (+ their dependencies: safetensors, tokenizers, Pillow);
`srum_trl` is imported from this checkout, without its trainer dependencies (trl, datasets) when those are missing.

    # one GPU (H200, bf16): LoRA SRUM step (s/step, peak memory) and sampler images/s at 512 and 1024 px
    python benchmarks/bagel_gpu.py --out bagel_gpu.json

    # two GPUs: a reduced-depth full fine-tune step under FSDP2 vs the same global batch on one GPU
    python benchmarks/bagel_gpu.py --fsdp-check --out bagel_fsdp.json
    # the same through accelerate and the shipped FSDP config (bf16 mixed precision)
    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 \
        benchmarks/bagel_gpu.py --fsdp-check --out bagel_fsdp_accelerate.json

    # plumbing check of both on the CPU with a tiny configuration (what CI can run)
    python benchmarks/bagel_gpu.py --smoke --out /tmp/bagel_smoke.json [--fsdp-check]

Sampler numbers: the script times the pieces of one image batch - the prompt prefill, one Euler step with text CFG
(2B rows), one step without (B rows), the VAE decode - over a few repetitions, and extrapolates to the official
schedule (50 grid points = 49 steps, shift 3, CFG only for t in (0.4, 1]): time = prefill + n_cfg * t_cfg +
n_plain * t_plain + decode. A short real sampler run (4 CFG steps) is timed too, to check the per-piece sum.
Without diffusers the VAE decode is left out (and said so); everything else needs no diffusers.
Timings are extrapolated from few steps, as printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import types

# NVLink multicast stays off (shared GPU hosts); keep whatever the environment already sets
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a photo of red green blue yellow black white cat dog car bus tree house person chair table cup bottle "
         "clock two three four left right above below next to on in the small large wooden metal glass painting "
         "of sunset city street mountain river and with near under behind front").split()


def import_bagel():
    """`srum_trl.models.bagel`, importing only what it needs when the full package's dependencies are missing."""
    sys.path.insert(0, ROOT)
    try:
        import srum_trl.models.bagel as bagel

        return bagel
    except ImportError as error:
        print(f"(srum_trl's full import failed: {error}; loading srum_trl.models.bagel on its own)")
        for name in [m for m in sys.modules if m == "srum_trl" or m.startswith("srum_trl.")]:
            del sys.modules[name]
        for name, sub in (("srum_trl", "srum_trl"), ("srum_trl.models", os.path.join("srum_trl", "models"))):
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(ROOT, sub)]
            sys.modules[name] = module
        import importlib

        return importlib.import_module("srum_trl.models.bagel")


def prompts_for(n: int, length: int = 30, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 3, warmup: int = 1) -> float:
    """Mean seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def build(bagel, args, device, dtype, layers: int | None = None, vit_layers: int | None = None, seed: int = 0):
    """A random BAGEL backend at full (or reduced-depth) BAGEL-7B-MoT width, created directly on `device`."""
    import torch

    tokenizer = bagel.build_tiny_tokenizer(WORDS)
    if args.smoke:
        config = bagel.tiny_bagel_config(vocab_size=len(tokenizer), layers=layers or 2)
        settings = dict(bagel.tiny.TINY_BACKEND_SETTINGS)
    else:
        config = bagel.bagel_7b_mot_config()
        if layers is not None:
            config.llm["num_hidden_layers"] = layers
        if vit_layers is not None:
            config.vit["num_hidden_layers"] = vit_layers + 1
        settings = {}
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = bagel.BagelModel(config)
            torch.nn.init.normal_(model.llm2vae.weight, std=0.02)  # non-zero velocity head
    finally:
        torch.set_default_dtype(previous)
    try:
        vae = bagel.vae.build_vae(config.vae_config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    except ImportError as error:  # the VAE only decodes images; everything else runs without diffusers
        print(f"(no diffusers: {error}; the VAE decode is not timed)")
        vae = None
    return bagel.BagelBackend(model, tokenizer, vae, **settings), config


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


# ------------------------------------------------------------------------------------------------------ sampler


def bench_sampler(bagel, backend, device, size: int, batch: int, repeat: int) -> dict:
    import torch

    from srum_trl.models.base import GenerationConfig

    backend._image_size = size
    backend.model.eval()
    prompts = prompts_for(batch)
    cfg_scale = 4.0
    grid = backend.token_grid
    n = grid[0] * grid[1]
    with torch.no_grad():
        ids, valid = backend._left_pad([backend._prompt_ids(p) for p in prompts])
        t_ctx = timed(lambda: backend._call("context", ids=ids, valid=valid), device, repeat)
        cache = backend._call("context", ids=ids, valid=valid)
        text_len = valid.long().sum(-1)
        cache2 = [(torch.cat([k, k]), torch.cat([v, v])) for k, v in cache]
        valid2 = torch.cat([valid, torch.zeros_like(valid)])
        pos2 = torch.cat([text_len, torch.zeros_like(text_len)])
        x = torch.randn(batch, n, backend.config.patch_latent_dim, device=device)
        t = torch.full((batch,), 0.7, device=device)
        markers = backend._markers()

        def cfg_step():
            v = backend._call("velocity", x_t=torch.cat([x, x]), t=torch.cat([t, t]), grid=grid, markers=markers,
                              image_positions=pos2, cache=cache2, cache_valid=valid2).float()
            return bagel.guide_velocity(v[:batch], v[batch:], cfg_scale)

        def plain_step():
            return backend._call("velocity", x_t=x, t=t, grid=grid, markers=markers, image_positions=text_len,
                                 cache=cache, cache_valid=valid)

        t_cfg = timed(cfg_step, device, repeat)
        t_plain = timed(plain_step, device, repeat)
        latents = bagel.processing.tokens_to_latents(x, grid, backend.config.latent_channels)
        t_decode = timed(lambda: backend.decode(latents), device, max(1, repeat - 1)) if backend.vae else 0.0
    ts = bagel.sampling_timesteps(50, 3.0)
    n_cfg = sum(1 for i in range(49) if 0.4 < float(ts[i]) <= 1.0)
    n_plain = 49 - n_cfg
    total = t_ctx + n_cfg * t_cfg + n_plain * t_plain + t_decode
    # a real short run of the sampler (4 Euler steps, CFG on every step, no decode) against the piecewise estimate
    backend.num_timesteps, backend.cfg_interval = 5, (0.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        backend._sample(prompts, cfg_scale, generator)
        sync(device)
    real4 = time.perf_counter() - start
    backend.num_timesteps, backend.cfg_interval = 50, (0.4, 1.0)
    if backend.vae is not None:  # and the public entry point once, images included
        backend.generate(prompts[:1], GenerationConfig(guidance=cfg_scale, batch_size=1), seed=0)
    return {
        "image_size": size, "batch": batch, "tokens_per_image": n,
        "prefill_s": round(t_ctx, 4), "cfg_step_s": round(t_cfg, 4), "plain_step_s": round(t_plain, 4),
        "decode_s": round(t_decode, 4) if backend.vae else None, "steps_with_cfg": n_cfg, "steps_without_cfg": n_plain,
        "estimated_batch_s_50_steps": round(total, 3), "images_per_s": round(batch / total, 4),
        "sample_4_cfg_steps_measured_s": round(real4, 3),
        "sample_4_cfg_steps_estimated_s": round(t_ctx + 4 * t_cfg, 3),
        "note": "extrapolated from per-step timings (50-point grid, 49 Euler steps)"
                + ("" if backend.vae else "; VAE decode not included (no diffusers)"),
    }


# ------------------------------------------------------------------------------------------------ LoRA SRUM step


def bench_lora_step(bagel, backend, device, size: int, batch: int, repeat: int, rank: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from srum_trl.models.base import Rollout

    backend._image_size = size
    if not hasattr(backend.model, "peft_config"):
        backend.model = get_peft_model(backend.model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                 target_modules=bagel.lora_targets("gen")))
        backend.core.gradient_checkpointing_enable()
    model = backend.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0)
    c, h, w = backend.latent_shape
    prompts = prompts_for(batch, seed=1)
    rollout = Rollout(prompts=prompts, images=[None] * batch, tokens=torch.randn(batch, c, h, w),
                      grid=backend.token_grid, guidance=4.0)
    weights = torch.rand(batch, backend.token_grid[0] * backend.token_grid[1], device=device) * 2 - 1

    def step():
        loss = ((weights + 0.5) * backend.token_losses(prompts, rollout, "conditional", 0.1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, repeat, warmup=1)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    model.eval()
    return {
        "image_size": size, "batch": batch, "lora_rank": rank, "lora_targets": "gen",
        "trainable_params": sum(p.numel() for p in trainable), "gradient_checkpointing": True,
        "seconds_per_step": round(seconds, 3), "images_per_s": round(batch / seconds, 3),
        "peak_memory_gib": gib(peak) if peak == peak else None,
    }


# ---------------------------------------------------------------------------------------------------- FSDP check


def _fsdp_batch(bagel, backend, size: int, global_batch: int, device):
    import torch

    backend._image_size = size
    grid = backend.token_grid
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(1234)
    x0 = torch.randn(global_batch, n, backend.config.patch_latent_dim, generator=g)
    eps = torch.randn(global_batch, n, backend.config.patch_latent_dim, generator=g)
    t = torch.sigmoid(torch.randn(global_batch, generator=g))
    reward = torch.rand(global_batch, n, generator=g) * 2 - 1
    prompts = prompts_for(global_batch, seed=2)
    return dict(x0=x0.to(device), eps=eps.to(device), t=t.to(device), reward=reward.to(device), prompts=prompts,
                grid=grid)


def _srum_loss(backend, module, batch, rows: slice):
    """Mean over the rows' latent tokens of (R + 0.5) * per-token flow MSE (the SRUM loss, fixed t and noise)."""
    x0, eps, t = batch["x0"][rows], batch["eps"][rows], batch["t"][rows]
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    ids, valid = backend._left_pad([backend._prompt_ids(p) for p in batch["prompts"][rows]])
    v = module(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=batch["grid"],
               markers=backend._markers()).float()
    per_token = (v - (eps - x0)).pow(2).mean(-1)
    return ((batch["reward"][rows] + 0.5) * per_token).mean()


def _fsdp_setup(bagel, args, device):
    """The reduced-depth float32 model of the FSDP check (full fine-tune of the language model) and its batch."""
    import torch

    backend, _ = build(bagel, args, device, torch.float32, layers=args.fsdp_layers, vit_layers=2, seed=0)
    model = backend.core
    bagel.set_trainable(model, "llm")
    model.gradient_checkpointing_enable()
    model.train()
    size = 64 if args.smoke else args.fsdp_image_size
    return backend, model, size, _fsdp_batch(bagel, backend, size, args.fsdp_global_batch, device)


def _reference_losses(backend, model, batch, lr: float) -> dict:
    """The 1-device run on the whole global batch: loss, one AdamW step on a copy, loss again."""
    import torch

    reference = copy.deepcopy(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    every = slice(0, len(batch["prompts"]))
    loss0 = _srum_loss(backend, reference, batch, every)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = _srum_loss(backend, reference, batch, every)
    return {"single_gpu_loss_before": loss0.item(), "single_gpu_loss_after": loss1.item()}


def _fsdp_worker(rank: int, world: int, args, port: int, result_file: str):
    import torch
    import torch.distributed as dist

    bagel = import_bagel()
    use_cuda = not args.smoke and torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    backend, model, size, batch = _fsdp_setup(bagel, args, device)
    global_batch = args.fsdp_global_batch
    lr = 1e-4
    out = {"world_size": world, "layers": args.fsdp_layers, "global_batch": global_batch, "image_size": size,
           "dtype": "float32", "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if rank == 0:
        out.update(_reference_losses(backend, model, batch, lr))
        if use_cuda:
            torch.cuda.empty_cache()
    dist.barrier()
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    for layer in model.vit_model.vision_model.encoder.layers:
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    per_rank = global_batch // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    start = time.perf_counter()
    loss0 = _srum_loss(backend, model, batch, mine)
    loss0.backward()  # FSDP2 averages the gradients over ranks: the gradient of the global-batch mean
    opt.step()
    opt.zero_grad()
    sync(device)
    out["fsdp_step_s"] = round(time.perf_counter() - start, 3)
    with torch.no_grad():
        loss1 = _srum_loss(backend, model, batch, mine)
    losses = torch.stack([loss0.detach(), loss1]).to(device)
    dist.all_reduce(losses)
    losses = (losses / world).tolist()
    if use_cuda:
        out[f"peak_memory_gib_rank{rank}"] = gib(torch.cuda.max_memory_allocated(device))
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        result = {}
        for part in gathered:
            result.update(part)
        result.update(fsdp_loss_before=losses[0], fsdp_loss_after=losses[1])
        ref0, ref1 = result["single_gpu_loss_before"], result["single_gpu_loss_after"]
        rel0 = abs(result["fsdp_loss_before"] - ref0) / abs(ref0)
        rel1 = abs(result["fsdp_loss_after"] - ref1) / abs(ref1)
        result.update(rel_diff_before=rel0, rel_diff_after=rel1, match=bool(rel0 < 1e-4 and rel1 < 1e-3),
                      step_changed_loss=bool(result["single_gpu_loss_after"] != result["single_gpu_loss_before"]))
        with open(result_file, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def fsdp_check_accelerate(args) -> dict:
    """The same comparison, with the model and optimizer prepared by `accelerate` (run under `accelerate launch` with
    examples/accelerate/fsdp.yaml: FSDP2, auto-wrap by decoder / ViT layer class, bf16 mixed precision), so the
    shipped config is what is tested. Rank 0 computes the 1-device reference first (float32, no mixed precision)."""
    import torch
    from accelerate import Accelerator

    bagel = import_bagel()
    accelerator = Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    backend, model, size, batch = _fsdp_setup(bagel, args, device)
    global_batch = args.fsdp_global_batch
    if global_batch % world:
        raise ValueError(f"--fsdp-global-batch {global_batch} must be a multiple of the {world} processes.")
    lr = 1e-4
    out = {"world_size": world, "layers": args.fsdp_layers, "global_batch": global_batch, "image_size": size,
           "launcher": "accelerate", "distributed_type": str(accelerator.distributed_type),
           "mixed_precision": accelerator.mixed_precision,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if accelerator.is_main_process:
        out.update(_reference_losses(backend, model, batch, lr))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    per_rank = global_batch // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    start = time.perf_counter()
    loss0 = _srum_loss(backend, model, batch, mine)
    accelerator.backward(loss0)
    optimizer.step()
    optimizer.zero_grad()
    sync(device)
    out["fsdp_step_s"] = round(time.perf_counter() - start, 3)
    with torch.no_grad():
        loss1 = _srum_loss(backend, model, batch, mine)
    losses = accelerator.reduce(torch.stack([loss0.detach().float(), loss1.float()]), reduction="mean").tolist()
    if device.type == "cuda":
        out[f"peak_memory_gib_rank{rank}"] = gib(torch.cuda.max_memory_allocated(device))
    from accelerate.utils import gather_object

    gathered = gather_object([out])
    result = {}
    for part in gathered:
        result.update(part)
    result.update(fsdp_loss_before=losses[0], fsdp_loss_after=losses[1])
    ref0, ref1 = result["single_gpu_loss_before"], result["single_gpu_loss_after"]
    result.update(rel_diff_before=abs(losses[0] - ref0) / abs(ref0), rel_diff_after=abs(losses[1] - ref1) / abs(ref1))
    tol = 2e-2 if accelerator.mixed_precision == "bf16" else 1e-3  # bf16 compute against a float32 reference
    from accelerate.utils import DistributedType

    result["fsdp_active"] = accelerator.distributed_type == DistributedType.FSDP
    if not result["fsdp_active"]:
        print(f"warning: accelerate runs {accelerator.distributed_type}, not FSDP: this compares no sharded run")
    result.update(tolerance=tol, match=bool(result["rel_diff_before"] < tol and result["rel_diff_after"] < tol
                                            and (result["fsdp_active"] or args.smoke)),
                  step_changed_loss=bool(ref1 != ref0))
    return result


def fsdp_check(args) -> dict:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    world = 2
    if not args.smoke and torch.cuda.device_count() < world:
        return {"skipped": f"needs {world} GPUs, found {torch.cuda.device_count()}"}
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "fsdp.json")
        port = 29500 + os.getpid() % 1000
        mp.spawn(_fsdp_worker, args=(world, args, port, result_file), nprocs=world, join=True)
        with open(result_file) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------------- main


def guarded(fn, *args, image_size: int) -> dict:
    """`fn(*args)`, or its error as a row (an out-of-memory at 1024 px keeps the 512 px numbers)."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{fn.__name__} at {image_size} px failed: {error!r}")
        return {"image_size": image_size, "error": repr(error)[:500]}


def table(rows: list[dict], keys: list[str]) -> str:
    widths = [max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys]
    line = "  ".join(k.ljust(w) for k, w in zip(keys, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result file.")
    parser.add_argument("--sizes", default="512,1024", help="Image sizes (px) of the sampler and LoRA benchmarks.")
    parser.add_argument("--gen-batch", type=int, default=4, help="Images per sampler batch.")
    parser.add_argument("--train-batch", type=int, default=1, help="Images per LoRA step.")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="Timed repetitions (after one warm-up).")
    parser.add_argument("--fsdp-check", action="store_true", help="Only the 2-GPU FSDP vs 1-GPU loss comparison.")
    parser.add_argument("--fsdp-layers", type=int, default=4, help="Decoder layers of the reduced-depth model.")
    parser.add_argument("--fsdp-global-batch", type=int, default=4)
    parser.add_argument("--fsdp-image-size", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="Tiny configuration on the CPU (plumbing check).")
    args = parser.parse_args(argv)

    import torch

    bagel = import_bagel()
    result = {"torch": torch.__version__, "smoke": args.smoke}
    if args.fsdp_check:
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under `accelerate launch` / torchrun
        result["fsdp_check"] = check = fsdp_check_accelerate(args) if launched else fsdp_check(args)
        if launched and int(os.environ.get("RANK", "0")) != 0:
            return result
        if "skipped" in check:
            print(f"FSDP check skipped: {check['skipped']}")
        else:
            precision = {None: "float32", "no": "float32"}.get(check.get("mixed_precision"), check.get("mixed_precision"))
            print(f"FSDP2 ({check['world_size']} ranks, {check.get('launcher', 'torch')}) vs 1 device, reduced depth "
                  f"({check['layers']} decoder layers), {precision}, global batch {check['global_batch']} at {check['image_size']} px:")
            rows = [{"": "loss before the step", "1 device": check["single_gpu_loss_before"],
                     "FSDP": check["fsdp_loss_before"], "rel. diff": f"{check['rel_diff_before']:.2e}"},
                    {"": "loss after one AdamW step", "1 device": check["single_gpu_loss_after"],
                     "FSDP": check["fsdp_loss_after"], "rel. diff": f"{check['rel_diff_after']:.2e}"}]
            print(table(rows, ["", "1 device", "FSDP", "rel. diff"]))
            print(f"match: {check['match']}  (FSDP step {check['fsdp_step_s']} s)")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        backend, config = build(bagel, args, device, dtype)
        parts = backend.core.num_parameters_by_part()
        result["parameters"] = parts
        sizes = [64] if args.smoke else [int(s) for s in args.sizes.split(",")]
        result["sampler"] = [guarded(bench_sampler, bagel, backend, device, s, args.gen_batch, args.repeat,
                                     image_size=s) for s in sizes]
        result["lora_step"] = [guarded(bench_lora_step, bagel, backend, device, s, args.train_batch, args.repeat,
                                       args.lora_rank, image_size=s) for s in sizes]
        print(f"device: {result['device']}  parameters: {parts['total'] / 1e9:.2f}B "
              f"(generation expert {parts['llm_generation'] / 1e9:.2f}B)")
        print("\nSampler (extrapolated to 49 Euler steps from per-step timings):")
        print(table(result["sampler"], ["image_size", "batch", "prefill_s", "cfg_step_s", "plain_step_s", "decode_s",
                                        "estimated_batch_s_50_steps", "images_per_s"]))
        print("\nLoRA SRUM step (generation expert, gradient checkpointing, AdamW):")
        print(table(result["lora_step"], ["image_size", "batch", "seconds_per_step", "images_per_s",
                                          "peak_memory_gib", "trainable_params"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
