"""Pretrain the ShapesWorld flow base from scratch: a tiny BAGEL (the native `srum_trl.models.bagel` model: Qwen2
mixture-of-transformers with understanding and generation experts, SigLIP NaViT + connector, a VAE held by
diffusers' `AutoencoderKL`, latent patch tokens, the timestep embedder).

One seeded command:

    python -m srum_trl.shapes.flow_pretrain --out DIR [--seed 0] [--scale full|tiny] [--device cuda|cpu]
                                            [--time-budget-s S] [--workers N]

Stages (each logged with its timing; every random choice is seeded, but the number of optimisation steps is set by
the wall clock, so two runs are equal only up to that):

a. **VAE.** The autoencoder (downsampling by 4: 64 px -> 16x16 latents, 2x2 latent patches -> 8x8 generation
   tokens, both read from the configuration) is trained on renders of training prompts (positives and hard
   negatives; pixels in [-1, 1]; weighted L1 + L2 with more weight on objects and colour edges, a small KL term,
   latents sampled from the posterior). Its latent mean and standard deviation then set `shift_factor` and
   `scaling_factor`, so the model sees latents of unit scale. Reconstructions must be accepted by the exact scorer
   on >= 95% of held-out-prompt renders (full scale trains longer when they are not).
b. **Model.** With the VAE frozen, everything else trains (AdamW, bf16 autocast on CUDA) on a mixture: text-to-image
   flow matching (`x_t = (1 - t) x_0 + t eps`, velocity target `eps - x_0`, `t = sigmoid(n)`, 10% of prompts
   dropped for CFG), yes/no understanding with the judge's own questions (global on whole images, local on crops;
   correct renders, hard negatives, renders of other prompts; half the images VAE-reconstructed, some noised) and
   captioning. Only train-split prompts and rendered images with known labels are used.
c. **Save** `DIR/model` in BAGEL's published layout (`llm_config.json`, `vit_config.json`, `ema.safetensors` and
   `ae.safetensors` in bfloat16, `ae_config.json`, the tokenizer, `config.json`) plus `generation_config.json`, the
   sampler and judge-transform settings it is evaluated with (the guidance scale chosen in d).
d. **Evaluation** (written to `DIR/metrics.json` and `DIR/model/metrics.json`) of the saved checkpoint as
   `srum_trl.models.load_backend` loads it: generation accuracy per category for a grid of guidance scales and
   sampler shifts on training-split prompts (the best setting is chosen there) and on held-out prompts (reported),
   the judge's agreement with the scorer on the model's own images, yes/no understanding on fresh held-out renders
   (clean and VAE-reconstructed), VAE reconstruction accuracy, sizes, seconds per stage and the configuration.

`--scale full` (4.3M parameters, 8.3 MiB in bfloat16) defaults to a 460 s budget, under 8 minutes on one H200 with
start-up; the shipped checkpoint is that default run (see docs/shapes.md). On CUDA the step's losses go through
`torch.compile` (about 80 s to compile, then about 21 steps per second against 8 eager on one H200).
`--scale tiny` runs the whole pipeline on two CPU cores in about a minute (used by the tests; its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.bagel.backend import BagelBackend
from ..models.bagel.config import BagelConfig, BagelLLMConfig, BagelVAEConfig, BagelViTConfig
from ..models.bagel.loading import write_generation_config
from ..models.bagel.modeling import BagelModel
from ..models.bagel.processing import latents_to_tokens
from ..models.bagel.tiny import build_tiny_tokenizer
from ..models.bagel.vae import build_vae, decode_latents, encode_images
from .evaluation import evaluate_generation, evaluate_understanding
from .flow_batches import FlowTextTables, NavitCanvas, batch_losses, draw_batch
from .questions import VOCABULARY
from .scenes import (
    KINDS,
    ScenePool,
    Workers,
    concat_arrays,
    jsonable,
    log,
    lr_factor,
    render_scenes,
    run_setup,
    scene_jobs,
    score_images,
    seed_everything,
    to_u8,
    to_unit,
)
from .world import IMAGE_SIZE, heldout_prompts, sample_prompts, train_prompts


# ------------------------------------------------------------------------------------------------- configuration
@dataclass
class FlowSpec:
    """Sizes of the flow base (a BAGEL configuration at toy scale)."""

    hidden_size: int = 192
    intermediate_size: int = 448
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vit_hidden_size: int = 128
    vit_intermediate_size: int = 256
    vit_layers: int = 3  # layers used; vit_config.json says one more (BAGEL drops the last)
    vit_heads: int = 4
    vit_patch: int = 8
    vae_channels: int = 32
    vae_channel_multipliers: list[int] = field(default_factory=lambda: [1, 1, 2])  # 3 levels: downsample 4
    vae_res_blocks: int = 1
    latent_channels: int = 4
    vae_norm_groups: int = 16


def flow_bagel_config(spec: FlowSpec, vocab_size: int) -> BagelConfig:
    """The `BagelConfig` of a spec for 64 px images: an 8x8 generation grid, ViT patches on an 8x8 grid."""
    llm = BagelLLMConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, max_position_embeddings=128, rope_theta=10000.0)
    vit = BagelViTConfig(hidden_size=spec.vit_hidden_size, intermediate_size=spec.vit_intermediate_size,
                         num_hidden_layers=spec.vit_layers + 1, num_attention_heads=spec.vit_heads,
                         image_size=IMAGE_SIZE, patch_size=spec.vit_patch)
    vae = BagelVAEConfig(ch=spec.vae_channels, ch_mult=list(spec.vae_channel_multipliers),
                         num_res_blocks=spec.vae_res_blocks, z_channels=spec.latent_channels,
                         norm_num_groups=spec.vae_norm_groups, scale_factor=1.0, shift_factor=0.0)
    latent_patch_size = 2
    return BagelConfig(llm=llm, vit=vit, vae=vae, latent_patch_size=latent_patch_size,
                       max_latent_size=IMAGE_SIZE // (vae.downsample * latent_patch_size),
                       vit_max_num_patch_per_side=IMAGE_SIZE // spec.vit_patch)


TINY_SPEC = FlowSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     vit_hidden_size=32, vit_intermediate_size=64, vit_layers=1, vit_heads=2, vae_channels=16,
                     vae_channel_multipliers=[1, 1, 1], vae_norm_groups=8)


@dataclass
class FlowPretrainConfig:
    """Hyperparameters of one scale. Times are seconds of wall clock from the start of the run."""

    scale: str
    spec: FlowSpec
    time_budget_s: float = 460.0
    vae_fraction: float = 0.14  # the VAE stage ends at this fraction of the budget
    vae_max_extra_s: float = 45.0  # extra VAE time allowed when the reconstruction target is missed
    vae_extend_s: float = 15.0
    vae_target: float = 0.95
    require_vae_target: bool = True
    eval_reserve_s: float = 50.0  # time kept for saving and evaluation
    workers: int = 15
    cpu_threads: int | None = None
    log_every_s: float = 10.0
    min_steps: int = 20
    compile: bool = True  # torch.compile the step's losses (falls back to eager code if compiling fails)
    # data
    vae_pool: int = 60_000
    lm_pool: int = 240_000
    chunk: int = 2_000
    positive_fraction: float = 0.5
    local_slots: int = 2
    # VAE stage
    vae_batch: int = 256
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_kl_weight: float = 5e-4  # on the mean KL per latent number
    vae_foreground_weight: float = 4.0
    vae_edge_weight: float = 2.0
    # model stage
    gen_batch: int = 384
    und_batch: int = 384
    cap_batch: int = 96
    lm_lr: float = 7e-4
    lm_min_lr_ratio: float = 0.05
    lm_warmup: int = 300
    lm_weight_decay: float = 0.05
    gen_weight: float = 1.0
    und_weight: float = 1.0
    cap_weight: float = 0.5
    uncond_prob: float = 0.1
    recon_prob: float = 0.5
    noise_prob: float = 0.5
    noise_sigma_max: float = 16.0
    # backend settings saved with the model (the judge's image transform and the sampler)
    vit_size: int = 64
    num_timesteps: int = 16  # 15 Euler steps
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_renorm_type: str = "global"
    # evaluation: every (guidance, shift) pair, on training-split prompts (to choose) and held-out ones (to report)
    eval_guidances: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0)
    eval_shifts: tuple[float, ...] = (1.0, 3.0)
    eval_gen_prompts: int = 512
    eval_und_scenes: int = 768
    eval_vae_images: int = 512
    eval_batch: int = 256


SCALES: dict[str, FlowPretrainConfig] = {
    "full": FlowPretrainConfig(scale="full", spec=FlowSpec()),
    "tiny": FlowPretrainConfig(
        scale="tiny", spec=TINY_SPEC, time_budget_s=40.0, vae_fraction=0.25, vae_max_extra_s=0.0,
        require_vae_target=False, eval_reserve_s=16.0, compile=False, workers=0, cpu_threads=1, log_every_s=5.0,
        min_steps=3,
        vae_pool=300, lm_pool=300, chunk=150, vae_batch=8, vae_warmup=5, gen_batch=8, und_batch=8, cap_batch=4,
        lm_lr=2e-3, lm_warmup=5, num_timesteps=4, eval_guidances=(1.0, 3.0), eval_shifts=(1.0,), eval_gen_prompts=8,
        eval_und_scenes=8, eval_vae_images=16, eval_batch=16,
    ),
}


def backend_settings(cfg: FlowPretrainConfig, guidance: float = 4.0, shift: float = 1.0) -> dict:
    """The backend settings saved in `generation_config.json`: sampler and judge image transform."""
    return {"image_size": IMAGE_SIZE, "num_timesteps": cfg.num_timesteps, "timestep_shift": shift,
            "cfg_interval": list(cfg.cfg_interval), "cfg_renorm_type": cfg.cfg_renorm_type,
            "guidance_scale": guidance, "vit_max_size": cfg.vit_size, "vit_min_size": cfg.vit_size,
            "vit_max_pixels": None, "understanding_batch_size": cfg.eval_batch}


# ------------------------------------------------------------------------------------------------ VAE stage
@torch.no_grad()
def vae_roundtrip(vae, images_u8: torch.Tensor, autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents (the posterior mean, `[B, C, h, w]`, float32) of uint8 images and the uint8 images the
    decoder gives back, rounded as `BagelBackend.decode` rounds them."""
    with autocast():
        latents = encode_images(vae, to_unit(images_u8))
        pixels = decode_latents(vae, latents)
    return latents.float(), to_u8(pixels)


def train_vae(vae, images: torch.Tensor, cfg: FlowPretrainConfig, until: float, start: float, generator, autocast,
              state: dict | None = None) -> dict:
    """Train the autoencoder on `images` (`[N, H, W, 3]` uint8 on the device) until the wall-clock time `until`;
    `state` (returned) carries the optimizer and counters, so that training can resume for a few more seconds."""
    device = images.device
    params = list(vae.parameters())
    vae.requires_grad_(True).train()
    if state is None:
        state = {"opt": torch.optim.Adam(params, lr=cfg.vae_lr, betas=(0.9, 0.99)), "step": 0,
                 "stage_start": time.time(), "until": until, "skipped": 0}
    state["until"] = max(state["until"], until)
    opt, total = state["opt"], state["until"] - state["stage_start"]
    last_log, window, first_step = time.time(), [], state["step"]
    while time.time() < until or state["step"] - first_step < cfg.min_steps:
        factor = lr_factor(state["step"], cfg.vae_warmup, (time.time() - state["stage_start"]) / max(total, 1e-6), 0.1)
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * factor
        idx = torch.randint(0, len(images), (cfg.vae_batch,), device=device, generator=generator)
        batch = images[idx]
        flip = torch.rand(len(batch), device=device, generator=generator) < 0.5
        x = to_unit(torch.where(flip[:, None, None, None], batch.flip(2), batch))
        with autocast():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, device=device, generator=generator)
            rec = vae.decode(z).sample.float()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        foreground = (x.amax(1, keepdim=True) > -0.9).float()
        edges = (F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)).amax(1, keepdim=True) > 0.2
        weight = 1.0 + cfg.vae_foreground_weight * foreground + cfg.vae_edge_weight * edges.float()
        err = rec - x
        recon = (weight * (err.abs() + err.pow(2))).mean() / weight.mean()
        loss = recon + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(grad_norm):  # skip the rare non-finite step instead of poisoning the weights
            state["skipped"] += 1
            continue
        opt.step()
        state["step"] += 1
        window.append(torch.stack([recon.detach(), kl.detach()]))
        if time.time() - last_log > cfg.log_every_s:
            rec_l, kl_l = torch.stack(window).mean(0).tolist()
            log(start, f"vae step {state['step']}: recon {rec_l:.4f} kl {kl_l:.3f} lr {cfg.vae_lr * factor:.2e} "
                       f"skipped {state['skipped']}")
            last_log, window = time.time(), []
    vae.eval().requires_grad_(False)
    return state


@torch.no_grad()
def set_latent_scale(vae, images: torch.Tensor, batch: int, autocast) -> tuple[float, float]:
    """Set the VAE's `shift_factor` / `scaling_factor` to the mean and 1 / std of its posterior means on `images`,
    so that scaled latents have zero mean and unit variance."""
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    latents = torch.cat([vae_roundtrip(vae, chunk, autocast)[0] for chunk in images.split(batch)])
    shift, std = float(latents.mean()), float(latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return shift, 1.0 / std


def _token_roundtrip(vae, images_u8: torch.Tensor, patch: int, autocast):
    latents, recon = vae_roundtrip(vae, images_u8, autocast)
    return latents_to_tokens(latents, patch), recon


def vae_accuracy(vae, workers: Workers, arrays: dict[str, np.ndarray], prompts: list[str], device, autocast,
                 batch: int) -> float:
    """Scorer acceptance of the reconstructions of correct renders."""
    keep = arrays["label"] & (arrays["kind"] == 0)
    images = torch.from_numpy(arrays["images"][keep]).to(device)
    recon = [vae_roundtrip(vae, chunk, autocast)[1].cpu().numpy() for chunk in images.split(batch)]
    results = score_images(workers, list(np.concatenate(recon)), [prompts[i] for i in arrays["prompt"][keep]])
    return float(np.mean([r.correct for r in results]))


# ---------------------------------------------------------------------------------------------- model stage
def train_model(model: BagelModel, pool: ScenePool, tables: FlowTextTables, canvas: NavitCanvas,
                cfg: FlowPretrainConfig, until: float, start: float, generator, autocast) -> int:
    """Train the whole model on the mixed objective until the wall-clock time `until`; returns the steps.

    On CUDA the step has no host synchronisation of its own (the losses are logged from a window read every
    `log_every_s`; a non-finite gradient skips its update inside the fused AdamW kernel, as with a GradScaler), and
    with `cfg.compile` the losses go through `torch.compile` (the eager code is used if compiling fails)."""
    device = pool.images.device
    params = [p for n, p in model.named_parameters() if not n.endswith("pos_embed.pos_embed")]
    for p in params:
        p.requires_grad_(True)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.lm_weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lm_lr, betas=(0.9, 0.98), fused=fused,
    )
    strata = pool.strata(tables)
    markers = torch.tensor([tables.ids.start_of_image, tables.ids.end_of_image], device=device)
    use_autocast = autocast is not nullcontext
    losses_fn = torch.compile(batch_losses, dynamic=False) if cfg.compile else batch_losses
    model.train()
    stage_start, step, skipped = time.time(), 0, torch.zeros((), device=device)
    total = max(until - stage_start, 1e-6)
    last_log, window = time.time(), []
    keys = ("gen", "und", "cap", "und_acc", "global_acc", "local_acc")
    while time.time() < until or step < cfg.min_steps:
        factor = lr_factor(step, cfg.lm_warmup, (time.time() - stage_start) / total, cfg.lm_min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.lm_lr * factor
        batch = draw_batch(pool, tables, canvas, strata, cfg, model.config.timestep_shift, generator)
        opt.zero_grad(set_to_none=True)
        try:
            losses = losses_fn(model, batch, markers, tables.yes_id, tables.no_id, use_autocast)
            loss = cfg.gen_weight * losses["gen"] + cfg.und_weight * losses["und"] + cfg.cap_weight * losses["cap"]
            loss.backward()
        except Exception as error:  # noqa: BLE001 - a compiler failure must not cost the run
            if losses_fn is batch_losses:
                raise
            log(start, f"torch.compile failed ({type(error).__name__}: {str(error)[:300]}); training eagerly")
            losses_fn = batch_losses
            continue
        if step == 0 and losses_fn is not batch_losses:
            log(start, f"lm: first compiled step done ({time.time() - stage_start:.1f}s)")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        bad = ~torch.isfinite(grad_norm)
        if fused:  # the fused kernel skips the update when found_inf is set: no host synchronisation
            opt.found_inf = bad.float()
            opt.step()
            skipped += bad
        elif bool(bad):
            skipped += 1
        else:
            opt.step()
        step += 1
        window.append(torch.stack([losses[k].detach().float() for k in keys] + [grad_norm.detach().float()]))
        if time.time() - last_log > cfg.log_every_s:
            gen_l, und_l, cap_l, acc, g_acc, l_acc, norm = torch.stack(window).mean(0).tolist()
            n_skipped = int(skipped)
            log(start, f"lm step {step}: gen {gen_l:.4f} und {und_l:.3f} (acc {acc:.3f}: global {g_acc:.3f} "
                       f"local {l_acc:.3f}) cap {cap_l:.3f} grad {norm:.2f} lr {cfg.lm_lr * factor:.2e} "
                       f"skipped {n_skipped} ({step / (time.time() - stage_start):.1f} steps/s)")
            if n_skipped > 50 and n_skipped > step // 10:
                raise FloatingPointError(f"{n_skipped} non-finite steps out of {step}; lower lm_lr")
            last_log, window = time.time(), []
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return step


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(backend: BagelBackend, cfg: FlowPretrainConfig, workers: Workers, und_arrays, vae_arrays, seed: int,
             autocast, start: float) -> dict:
    """VAE, generation (training-split prompts to choose the sampler setting, held-out prompts to report),
    judge-agreement and understanding metrics of a loaded checkpoint."""
    metrics: dict = {}
    backend.understanding_batch_size = cfg.eval_batch
    heldout = heldout_prompts()
    device = backend.device
    t = time.time()
    metrics["vae_recon_accuracy"] = vae_accuracy(backend.vae, workers, vae_arrays, heldout, device, autocast,
                                                 cfg.eval_batch)
    log(start, f"eval: VAE reconstruction accuracy {metrics['vae_recon_accuracy']:.3f} ({time.time() - t:.1f}s)")
    settings = {f"cfg {g:g}, shift {s:g}": {"guidance": g, "timestep_shift": s}
                for s in cfg.eval_shifts for g in cfg.eval_guidances}
    train = evaluate_generation(backend, workers, sample_prompts(cfg.eval_gen_prompts, "train", seed=seed + 3),
                                settings, seed + 4, cfg.eval_batch, autocast, start)
    held = evaluate_generation(backend, workers, sample_prompts(cfg.eval_gen_prompts, "heldout", seed=seed + 1),
                               settings, seed + 2, cfg.eval_batch, autocast, start)
    best = max(settings, key=lambda k: train["generation"][k]["overall"])
    metrics.update(
        generation_train_prompts=train["generation"], generation=held["generation"], best_setting=best,
        best_guidance=settings[best]["guidance"], best_timestep_shift=settings[best]["timestep_shift"],
        generation_accuracy=held["generation"][best]["overall"],
        generation_accuracy_train_prompts=train["generation"][best]["overall"],
        judge_agreement_accuracy=held["judge_agreement"]["pooled"]["accuracy"],
        judge_agreement_auc=held["judge_agreement"]["pooled"]["auc"],
        judge_agreement_at_best=held["judge_agreement"]["per_setting"][best],
        judge_agreement=held["judge_agreement"],
    )
    t = time.time()
    images = torch.from_numpy(und_arrays["images"]).to(device)
    recon = np.concatenate([vae_roundtrip(backend.vae, chunk, autocast)[1].cpu().numpy()
                            for chunk in images.split(cfg.eval_batch)])
    und = evaluate_understanding(backend, und_arrays, recon, heldout, "vae", autocast)
    metrics["understanding_accuracy"] = und.pop("accuracy")
    metrics["understanding"] = und
    log(start, f"eval: understanding {metrics['understanding_accuracy']:.3f} {und} ({time.time() - t:.1f}s)")
    return metrics


# ---------------------------------------------------------------------------------------------------- saving
def save_flow_model(model: BagelModel, vae, tokenizer, path: Path, settings: dict) -> None:
    """Write BAGEL's published layout in bfloat16 (with `ae_config.json`: the VAE's latent scale and shift), plus
    `generation_config.json` (the backend settings)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.vae = {**model.config.vae, "scale_factor": float(vae.config.scaling_factor),
                        "shift_factor": float(vae.config.shift_factor)}
    dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16)
    vae_dtype = vae.dtype
    vae.to(torch.bfloat16)
    try:
        BagelBackend(model, tokenizer, vae, **settings).save_pretrained(str(path))
    finally:
        model.to(dtype)
        vae.to(vae_dtype)


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments of `python -m srum_trl.shapes.flow_pretrain`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (model/ and metrics.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default: 460 at full scale, 40 at tiny)")
    parser.add_argument("--workers", type=int, default=None, help="rendering/scoring processes (0: in-process)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training step (default: on at full scale, off at tiny)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the whole pipeline (see the module docs); returns the metrics written to `metrics.json`."""
    args = parse_args(argv)
    start = time.time()
    cfg, device, autocast = run_setup(args, SCALES, compile=args.compile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    seed_everything(seed)
    deadline = start + cfg.time_budget_s
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    seconds: dict[str, float] = {}
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    workers = Workers(cfg.workers)  # forked before CUDA is touched
    try:
        t = time.time()
        slots = cfg.local_slots
        vae_jobs = scene_jobs(seed, 0, cfg.vae_pool, cfg.chunk, "train", 0.7, 0)
        lm_jobs = scene_jobs(seed, 1, cfg.lm_pool, cfg.chunk, "train", cfg.positive_fraction, slots)
        vae_eval_jobs = scene_jobs(seed, 2, cfg.eval_vae_images, cfg.chunk, "heldout", 1.0, 0)
        und_eval_jobs = scene_jobs(seed, 3, cfg.eval_und_scenes, cfg.chunk, "heldout", 0.5, slots)
        vae_arrays = concat_arrays(workers.map(render_scenes, vae_jobs))
        pending_eval = workers.map_async(render_scenes, vae_eval_jobs + und_eval_jobs)
        pending_lm = workers.map_async(render_scenes, lm_jobs)
        tokenizer = build_tiny_tokenizer(VOCABULARY)
        config = flow_bagel_config(cfg.spec, len(tokenizer))
        torch.manual_seed(seed)
        model = BagelModel(config).to(device)
        vae = build_vae(config.vae_config).to(device)
        sizes = {"model": sum(p.numel() for p in model.parameters()), "vae": sum(p.numel() for p in vae.parameters())}
        sizes.update(model.num_parameters_by_part())
        seconds["setup"] = time.time() - t
        log(start, f"scale {cfg.scale} on {device} with {cfg.workers} workers; parameters {sizes}; "
                   f"{len(vae_arrays['images'])} VAE images rendered ({seconds['setup']:.1f}s)")

        # a. VAE
        t = time.time()
        vae_images = torch.from_numpy(vae_arrays["images"]).to(device)
        eval_chunks = pending_eval.get()
        vae_eval_arrays = concat_arrays(eval_chunks[: len(vae_eval_jobs)])
        und_eval_arrays = concat_arrays(eval_chunks[len(vae_eval_jobs) :])
        vae_check = {k: v[: max(1, len(v) // 2)] for k, v in vae_eval_arrays.items()}  # half kept for the final eval
        state = train_vae(vae, vae_images, cfg, start + cfg.vae_fraction * cfg.time_budget_s, start, generator,
                          autocast)
        set_latent_scale(vae, vae_images[:4096], cfg.eval_batch, autocast)
        vae_acc = vae_accuracy(vae, workers, vae_check, heldout_prompts(), device, autocast, cfg.eval_batch)
        log(start, f"vae: {state['step']} steps, reconstruction accuracy {vae_acc:.3f}")
        extra = 0.0
        while cfg.require_vae_target and vae_acc < cfg.vae_target and extra < cfg.vae_max_extra_s:
            extra += cfg.vae_extend_s
            state = train_vae(vae, vae_images, cfg, time.time() + cfg.vae_extend_s, start, generator, autocast, state)
            set_latent_scale(vae, vae_images[:4096], cfg.eval_batch, autocast)
            vae_acc = vae_accuracy(vae, workers, vae_check, heldout_prompts(), device, autocast, cfg.eval_batch)
            log(start, f"vae (extended): {state['step']} steps, reconstruction accuracy {vae_acc:.3f}")
        if cfg.require_vae_target and vae_acc < cfg.vae_target:
            log(start, f"WARNING: VAE reconstruction accuracy {vae_acc:.3f} is below the target {cfg.vae_target}")
        vae_steps = state["step"]
        del vae_images, state
        seconds["vae"] = time.time() - t

        # b. the model
        t = time.time()
        pool = ScenePool(concat_arrays(pending_lm.get()), device)

        pool.encode(lambda chunk: _token_roundtrip(vae, chunk, config.latent_patch_size, autocast),
                    1024 if device.type == "cuda" else 64)
        tables = FlowTextTables(tokenizer, train_prompts(), device)
        canvas = NavitCanvas(IMAGE_SIZE, cfg.vit_size, cfg.vit_size, cfg.spec.vit_patch, device)
        if canvas.side != config.vit_max_num_patch_per_side:
            raise ValueError("the ViT canvas must span vit_max_num_patch_per_side patches")
        log(start, f"lm: {len(pool)} scenes encoded ({time.time() - t:.1f}s); latent std "
                   f"{float(pool.tokens.std()):.3f}; kinds "
                   f"{np.bincount(pool.kind.cpu().numpy(), minlength=len(KINDS)).tolist()}")
        lm_steps = train_model(model, pool, tables, canvas, cfg, deadline - cfg.eval_reserve_s, start, generator,
                               autocast)
        del pool
        seconds["lm"] = time.time() - t
        log(start, f"lm: {lm_steps} steps ({seconds['lm']:.1f}s)")

        # c. save (with provisional sampler settings), d. evaluate the checkpoint as it loads, then record the best
        t = time.time()
        model_dir = out / "model"
        save_flow_model(model, vae, tokenizer, model_dir, backend_settings(cfg))
        del model
        from ..models import load_backend

        loaded = load_backend(str(model_dir), dtype="float32")
        loaded.model.to(device)
        loaded.vae.to(device)
        seconds["save"] = time.time() - t
        t = time.time()
        eval_vae = {k: v[max(1, len(v) // 2) :] if len(v) > 1 else v for k, v in vae_eval_arrays.items()}
        metrics = evaluate(loaded, cfg, workers, und_eval_arrays, eval_vae, seed, autocast, start)
        loaded.guidance_scale, loaded.timestep_shift = metrics["best_guidance"], metrics["best_timestep_shift"]
        settings = write_generation_config(str(model_dir), loaded)
        seconds["eval"] = time.time() - t
    finally:
        workers.close()
        torch.set_num_threads(threads)
    seconds["total"] = time.time() - start
    files = {f.name: f.stat().st_size for f in sorted(model_dir.iterdir())}
    metrics.update(
        scale=cfg.scale, seed=seed, device=str(device), num_parameters=sizes, vae_recon_accuracy_after_stage=vae_acc,
        vae_scale={"scaling_factor": loaded.vae.config.scaling_factor, "shift_factor": loaded.vae.config.shift_factor},
        token_grid=list(loaded.token_grid), files=files, folder_bytes=sum(files.values()),
        backend_settings=settings, steps={"vae": vae_steps, "lm": lm_steps}, seconds=seconds,
        config=jsonable(asdict(cfg)),
    )
    text = json.dumps(metrics, indent=2)
    (out / "metrics.json").write_text(text)
    (model_dir / "metrics.json").write_text(text)
    log(start, f"done: generation {metrics['generation_accuracy']:.3f} held-out at {metrics['best_setting']} "
               f"(train prompts {metrics['generation_accuracy_train_prompts']:.3f}), understanding "
               f"{metrics['understanding_accuracy']:.3f}, judge agreement {metrics['judge_agreement_accuracy']:.3f} / "
               f"AUC {metrics['judge_agreement_auc']}, VAE {metrics['vae_recon_accuracy']:.3f}; "
               f"seconds {json.dumps({k: round(v, 1) for k, v in seconds.items()})}")
    return metrics


if __name__ == "__main__":
    main()
