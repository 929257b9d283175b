"""Pretrain a tiny Janus (transformers' `JanusForConditionalGeneration`) from scratch on ShapesWorld.

One seeded command:

    python -m srum_trl.shapes.pretrain --out DIR [--seed 0] [--scale full|tiny] [--device cuda|cpu]
                                       [--time-budget-s S] [--workers N]

Stages (each logged with its timing; every random choice is seeded, but the number of optimisation steps is set by
the wall clock, so two runs are equal only up to that):

a. **VQ tokenizer.** The model's own `model.model.vqmodel` is trained as an autoencoder on rendered ShapesWorld
   images (train-split prompts of every category, positives and hard negatives), pixels in [-1, 1]. Quantisation is
   cosine (both the encoder output and the codebook are L2-normalised, straight-through gradients, commitment loss,
   dead codes restarted from batch vectors); at the end the normalised codebook is stored in
   `quantize.embedding.weight`, so transformers' `encode` (raw nearest neighbour) and `decode` (which normalises
   the codebook) agree. Reconstructions must be accepted by the exact scorer on >= 95% of held-out-prompt renders
   (full scale trains longer when they are not).
b. **Language model.** With the VQ frozen, everything else is trained (AdamW, bf16 autocast on CUDA) on a mixture:
   text-to-image (train prompt -> VQ tokens of a render; ~10% of prompts dropped for classifier-free guidance),
   yes/no understanding (global questions on renders, hard negatives and renders of other prompts; local questions
   on crops around objects and of background; balanced yes/no; half the images VQ-reconstructed, some noised), and
   captioning ("describe this image" -> the prompt). Only train-split prompts and rendered images with their known
   labels are used; the scorer never labels anything the model made.
c. **Evaluation** (written to `DIR/metrics.json`): held-out generation accuracy per category for several guidance
   scales, yes/no understanding accuracy on fresh held-out-prompt renders (clean and VQ-reconstructed), agreement of
   the judge's global P(yes) with the scorer on the model's own generations (accuracy and AUC), VQ reconstruction
   accuracy, parameter count, seconds per stage and the configuration. It is run on the saved checkpoint as loaded by
   `srum_trl.models.load_backend`.
d. **Save**: `DIR/model` (bfloat16 safetensors in shards of <= 15 MB, plus the processor).

Targets at `--scale full` (about 14.5M parameters, < 8 minutes on one H100 with the default 430 s budget):
yes/no understanding >= 90% while held-out generation accuracy (best guidance) is between 40% and 75%, and the
judge's agreement with the scorer as high as possible. `--scale tiny` runs the whole pipeline on two CPU cores in
about a minute (used by the tests; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.janus.backend import JanusBackend
from ..models.janus.tiny import TinyJanusSpec, build_tiny_janus
from .evaluation import evaluate_generation, evaluate_understanding
from .questions import CAPTION_QUESTION, NO, VOCABULARY, YES, global_question
from .scenes import (
    KINDS,
    QuestionRows,
    ScenePool,
    Workers,
    concat_arrays,
    jsonable,
    log,
    lr_factor,
    render_scenes,
    run_setup,
    resize_weights,
    scene_jobs,
    score_images,
    seed_everything,
    to_u8,
    to_unit,
)
from .world import IMAGE_SIZE, heldout_prompts, sample_prompts, train_prompts

# ------------------------------------------------------------------------------------------------- configuration
FULL_SPEC = TinyJanusSpec(
    hidden_size=384,
    intermediate_size=1024,
    num_layers=4,
    num_heads=6,
    max_position_embeddings=128,
    image_size=64,
    patch_size=8,
    vision_hidden_size=256,
    vision_layers=4,
    vision_heads=4,
    vq_base_channels=64,
    vq_channel_multiplier=[1, 1, 2, 2],
    vq_embed_dim=16,
    vq_latent_channels=64,
    vq_num_res_blocks=1,
    codebook_size=512,
)

TINY_SPEC = TinyJanusSpec(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=128,
    image_size=64,
    patch_size=8,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
    vq_base_channels=32,
    vq_channel_multiplier=[1, 1, 1, 1],
    vq_embed_dim=8,
    vq_latent_channels=32,
    vq_num_res_blocks=1,
    codebook_size=64,
)


@dataclass
class PretrainConfig:
    """Hyperparameters of one scale. Times are seconds of wall clock from the start of the run."""

    scale: str
    spec: TinyJanusSpec
    time_budget_s: float = 430.0
    vq_fraction: float = 0.24  # the VQ stage ends at this fraction of the budget
    vq_max_extra_s: float = 60.0  # extra VQ time allowed when the reconstruction target is missed
    vq_extend_s: float = 15.0  # VQ time added per retry
    vq_target: float = 0.95  # scorer acceptance of reconstructions required before stage b
    require_vq_target: bool = True
    eval_reserve_s: float = 50.0  # time kept for saving and evaluation
    workers: int = 15  # CPU processes rendering and scoring (0: in-process)
    cpu_threads: int | None = None  # torch threads while running on the CPU (None: leave torch's setting)
    log_every_s: float = 10.0
    min_steps: int = 20  # each training stage runs at least this many steps, whatever the clock says
    # data
    vq_pool: int = 60_000  # rendered images for the VQ stage
    lm_pool: int = 240_000  # rendered scenes for the LM stage
    chunk: int = 2_000  # scenes per rendering job
    positive_fraction: float = 0.5  # scenes that are correct renders of their prompt
    local_slots: int = 2  # local (crop) questions per scene
    # VQ stage
    vq_batch: int = 128
    vq_lr: float = 2e-3
    vq_warmup: int = 100
    vq_beta: float = 0.25  # commitment weight
    vq_foreground_weight: float = 4.0  # extra reconstruction weight on non-black pixels
    vq_edge_weight: float = 2.0  # extra reconstruction weight next to color edges
    vq_restart_every: int = 100  # steps between dead-code restarts
    # LM stage
    gen_batch: int = 192
    und_batch: int = 256
    cap_batch: int = 64
    lm_lr: float = 6e-4
    lm_min_lr_ratio: float = 0.05
    lm_warmup: int = 300
    lm_weight_decay: float = 0.05
    gen_weight: float = 1.0
    und_weight: float = 1.0
    cap_weight: float = 0.5
    uncond_prob: float = 0.1
    recon_prob: float = 0.5  # understanding images shown VQ-reconstructed
    noise_prob: float = 0.5
    noise_sigma_max: float = 16.0  # gaussian pixel noise std (0..255 scale), drawn uniformly up to this
    # evaluation
    eval_gen_prompts: int = 512
    eval_guidances: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    eval_und_scenes: int = 768
    eval_vq_images: int = 512
    eval_batch: int = 256


SCALES: dict[str, PretrainConfig] = {
    "full": PretrainConfig(scale="full", spec=FULL_SPEC),
    "tiny": PretrainConfig(
        scale="tiny",
        spec=TINY_SPEC,
        time_budget_s=40.0,
        vq_fraction=0.3,
        vq_max_extra_s=0.0,
        require_vq_target=False,
        eval_reserve_s=14.0,
        workers=0,
        cpu_threads=1,  # one thread: tolerates busy machines (2 threads on 2 shared cores was 5x slower)
        log_every_s=5.0,
        min_steps=3,
        vq_pool=600,
        lm_pool=400,
        chunk=200,
        vq_batch=16,
        vq_lr=2e-3,
        vq_warmup=5,
        vq_restart_every=10,
        gen_batch=16,
        und_batch=16,
        cap_batch=8,
        lm_lr=2e-3,
        lm_warmup=5,
        eval_gen_prompts=16,
        eval_guidances=(1.0, 3.0),
        eval_und_scenes=24,
        eval_vq_images=32,
        eval_batch=32,
    ),
}

# ---------------------------------------------------------------------------------------------- image helpers
def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """On-device version of the Janus image processor applied to `image.crop(box)`: crop, resize the longer side to
    `size` with PIL's bicubic filter (horizontal pass, then vertical, rounding to 8 bits after each), pad to a square
    with `fill`. Pixel values stay in 0..255.

    `images`: [B, 3, H, W] float; `boxes`: [B, 4] (x0, y0, x1, y1), end-exclusive. A full-image box of `size`
    pixels returns the image unchanged.
    """
    _, _, height, width = images.shape
    x0, y0, x1, y1 = boxes.float().unbind(1)
    w, h = x1 - x0, y1 - y0
    scale = size / torch.maximum(w, h)
    new_w, new_h = torch.round(w * scale).clamp(min=1), torch.round(h * scale).clamp(min=1)
    off_x = torch.div(size - new_w, 2, rounding_mode="floor")
    off_y = torch.div(size - new_h, 2, rounding_mode="floor")
    wx, valid_x = resize_weights(x0, w, new_w, off_x, size, width)
    wy, valid_y = resize_weights(y0, h, new_h, off_y, size, height)
    x = torch.einsum("bcyi,bxi->bcyx", images.float(), wx).clamp(0, 255).round()
    x = torch.einsum("boy,bcyx->bcox", wy, x).clamp(0, 255).round()
    valid = valid_y[:, :, None] & valid_x[:, None, :]
    return torch.where(valid[:, None], x, fill.to(x.dtype)[None, :, None, None])


# ----------------------------------------------------------------------------------------------- text tables
class TextTables(QuestionRows):
    """Pre-tokenized, left-padded rows for every prompt and question the LM stage uses.

    Generation rows: `[bos] prompt [begin_of_image]` per train prompt (what `JanusBackend.tokenize_prompts` builds).
    Question/answer rows: `[bos][boi] <image>x64 [eoi] question answer [eos]` (what the processor builds for
    `JanusBackend.format_question(question)`, followed by the answer); labels are -100 except on answer and eos.
    Row order: global question of prompt p with answer a (0 no, 1 yes) at `2 p + a`; local question q with answer a
    at `2 P + 2 q + a`; the caption of prompt p at `2 P + 2 Q + p`.
    """

    def __init__(self, processor, prompts: list[str], device):
        tok = processor.tokenizer
        self.prompts = prompts
        image_ids = [
            tok.bos_token_id,
            tok.convert_tokens_to_ids(processor.image_start_token),
            *[tok.convert_tokens_to_ids(processor.image_token)] * processor.num_image_tokens,
            tok.convert_tokens_to_ids(processor.image_end_token),
        ]
        self.pad_id, self.yes_id, self.no_id = tok.pad_token_id, self._word(tok, YES), self._word(tok, NO)
        boi = tok.convert_tokens_to_ids(processor.image_start_token)
        gen = [[tok.bos_token_id, *self._words(tok, p), boi] for p in prompts]
        self.gen_ids, self.gen_mask = self._pad(gen, device)
        rows = self.question_rows(prompts, lambda text: self._words(tok, text), self.yes_id, self.no_id)
        seqs = [image_ids + q + a + [tok.eos_token_id] for q, a in rows]
        answer_lengths = [len(a) + 1 for _, a in rows]
        self.qa_ids, self.qa_mask = self._pad(seqs, device)
        length = self.qa_ids.shape[1]
        labels = torch.full_like(self.qa_ids, -100)
        for i, n in enumerate(answer_lengths):
            labels[i, length - n :] = self.qa_ids[i, length - n :]
        self.qa_labels = labels
        # position (in the shifted, next-token frame) of the first answer token of each row
        self.answer_pos = torch.tensor([length - n - 1 for n in answer_lengths], device=device)
        self._image_ids = image_ids

    @staticmethod
    def _words(tok, text: str) -> list[int]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.unk_token_id in ids:
            raise ValueError(f"{text!r} has words outside the tokenizer's vocabulary")
        return ids

    @classmethod
    def _word(cls, tok, word: str) -> int:
        (token,) = cls._words(tok, word)
        return token

    def _pad(self, seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s) :] = torch.tensor(s)
            mask[i, length - len(s) :] = 1
        return ids.to(device), mask.to(device)

    def check_against(self, backend: JanusBackend) -> None:
        """Assert that the rows equal what the backend / processor build (guards against format drift)."""
        processor = backend.processor
        for i in (0, len(self.prompts) - 1):
            ids, mask = backend.tokenize_prompts([self.prompts[i]])
            mine = self.gen_ids[i][self.gen_mask[i].bool()].cpu()
            assert torch.equal(ids[0][mask[0].bool()].cpu(), mine), "generation rows differ from tokenize_prompts"
        blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        for question in (global_question(self.prompts[0]), self.local_questions[0], CAPTION_QUESTION):
            enc = processor(text=[backend.format_question(question)], images=[blank], return_tensors="pt")
            n_q = len(self._words(processor.tokenizer, question))
            expected = self._image_ids + self._words(processor.tokenizer, question)
            assert enc["input_ids"][0].tolist() == expected and n_q > 0, "question rows differ from the processor"



# ------------------------------------------------------------------------------------------------- VQ stage
@torch.no_grad()
def vq_roundtrip(vq, images_u8: torch.Tensor, autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens `[B, h*w]` from transformers' `JanusVQVAE.encode` and the uint8 images that `decode` gives back.

    Encoding runs in float32 (nearest-code search in bf16 would pick near-tied codes at random); decoding may run
    under `autocast`.
    """
    tokens = vq.encode(to_unit(images_u8).to(vq.quantize.embedding.weight.dtype)).image_tokens
    tokens = tokens.view(images_u8.shape[0], -1)
    with autocast():
        pixels = vq.decode(tokens)
    return tokens, to_u8(pixels)


def _quantize(vq, z: torch.Tensor):
    """Cosine quantisation of `z` [B, D, h, w]: (straight-through codes, code indices, codebook loss, commitment,
    normalised encoder vectors [B*h*w, D])."""
    b, d, h, w = z.shape
    flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
    codebook = F.normalize(vq.quantize.embedding.weight.float(), dim=-1)
    index = (flat.detach() @ codebook.t()).argmax(-1)
    q = codebook[index]
    codebook_loss = F.mse_loss(q, flat.detach())
    commitment = F.mse_loss(flat, q.detach())
    q = flat + (q - flat).detach()
    return q.view(b, h, w, d).permute(0, 3, 1, 2), index, codebook_loss, commitment, flat


def train_vq(vq, images: torch.Tensor, cfg: PretrainConfig, until: float, start: float, generator, autocast,
             state: dict | None = None) -> dict:
    """Train the VQ autoencoder on `images` ([N, H, W, 3] uint8 on the device) until the wall-clock time `until`.

    `state` (returned) carries the optimizer and counters so that training can be resumed for a few more seconds.
    """
    device = images.device
    params = [p for n, p in vq.named_parameters()]
    for p in params:
        p.requires_grad_(True)
    vq.train()
    if state is None:
        state = {"opt": torch.optim.Adam(params, lr=cfg.vq_lr, betas=(0.9, 0.99)), "step": 0,
                 "usage": torch.zeros(vq.quantize.num_embeddings, device=device), "stage_start": time.time(),
                 "until": until}
        with torch.no_grad(), autocast():  # initialise the codebook from encoder outputs
            idx = torch.randint(0, len(images), (min(len(images), 256),), device=device, generator=generator)
            z = vq.quant_conv(vq.encoder(to_unit(images[idx]))).float()
            flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
            pick = torch.randint(0, len(flat), (vq.quantize.num_embeddings,), device=device, generator=generator)
            noise = 0.01 * torch.randn(vq.quantize.num_embeddings, flat.shape[1], device=device, generator=generator)
            vq.quantize.embedding.weight.copy_(F.normalize(flat[pick] + noise, dim=-1))
    state["until"] = max(state["until"], until)
    opt = state["opt"]
    total = state["until"] - state["stage_start"]
    last_log, window = time.time(), []
    first_step = state["step"]
    while time.time() < until or state["step"] - first_step < cfg.min_steps:
        step = state["step"]
        factor = lr_factor(step, cfg.vq_warmup, (time.time() - state["stage_start"]) / max(total, 1e-6), 0.1)
        for group in opt.param_groups:
            group["lr"] = cfg.vq_lr * factor
        idx = torch.randint(0, len(images), (cfg.vq_batch,), device=device, generator=generator)
        batch = images[idx]
        flip = torch.rand(len(batch), device=device, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(2), batch)
        x = to_unit(batch)
        with autocast():
            z = vq.quant_conv(vq.encoder(x))
        q, index, codebook_loss, commitment, flat = _quantize(vq, z)
        with autocast():
            rec = vq.decoder(vq.post_quant_conv(q.to(z.dtype)))
        rec = rec.float()
        foreground = (x.amax(1, keepdim=True) > -0.9).float()
        edges = (F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)).amax(1, keepdim=True) > 0.2
        weight = 1.0 + cfg.vq_foreground_weight * foreground + cfg.vq_edge_weight * edges.float()
        err = rec - x
        recon = (weight * (err.abs() + err.pow(2))).mean() / weight.mean()
        loss = recon + codebook_loss + cfg.vq_beta * commitment
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(grad_norm):  # skip the rare non-finite step instead of poisoning the weights
            state["skipped"] = state.get("skipped", 0) + 1
            opt.zero_grad(set_to_none=True)
            continue
        opt.step()
        state["usage"] += torch.bincount(index, minlength=vq.quantize.num_embeddings).float()
        state["step"] += 1
        if state["step"] % cfg.vq_restart_every == 0:
            _restart_dead_codes(vq, opt, state, flat.detach(), generator)
        window.append(torch.stack([recon.detach(), commitment.detach()]))
        if time.time() - last_log > cfg.log_every_s:
            rec_l, com_l = torch.stack(window).mean(0).tolist()
            log(start, f"vq step {state['step']}: recon {rec_l:.4f} commit {com_l:.4f} lr {cfg.vq_lr * factor:.2e} "
                        f"codes used {state.get('last_used', float('nan')):.0f}/{vq.quantize.num_embeddings} "
                        f"skipped {state.get('skipped', 0)}")
            last_log, window = time.time(), []
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight.float(), dim=-1))
    vq.eval()
    return state


@torch.no_grad()
def _restart_dead_codes(vq, opt, state: dict, flat: torch.Tensor, generator) -> None:
    """Codes unused since the last restart take the value of random encoder vectors of the current batch."""
    usage = state["usage"]
    dead = usage == 0
    state["last_used"] = float((~dead).sum())
    n = int(dead.sum())
    if n:
        weight = vq.quantize.embedding.weight
        pick = torch.randint(0, len(flat), (n,), device=flat.device, generator=generator)
        weight[dead] = F.normalize(flat[pick] + 0.01 * torch.randn_like(flat[pick]), dim=-1).to(weight.dtype)
        opt_state = opt.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt_state:
                opt_state[key][dead] = 0
    usage.zero_()


def vq_accuracy(vq, workers: Workers, arrays: dict[str, np.ndarray], prompts: list[str], device, autocast,
                batch: int) -> tuple[float, float]:
    """(scorer acceptance of reconstructions of correct renders, fraction of the codebook they use)."""
    keep = arrays["label"] & (arrays["kind"] == 0)
    images = torch.from_numpy(arrays["images"][keep]).to(device)
    prompt_list = [prompts[i] for i in arrays["prompt"][keep]]
    tokens, recon = [], []
    for chunk in images.split(batch):
        t, r = vq_roundtrip(vq, chunk, autocast)
        tokens.append(t)
        recon.append(r.cpu().numpy())
    results = score_images(workers, list(np.concatenate(recon)), prompt_list)
    used = torch.cat(tokens).unique().numel() / vq.quantize.num_embeddings
    return float(np.mean([r.correct for r in results])), float(used)


# ------------------------------------------------------------------------------------------------- LM stage
class UnderstandingSampler:
    """Draws balanced understanding + captioning batches and their pixels, all on the device."""

    def __init__(self, pool: ScenePool, tables: TextTables, processor, cfg: PretrainConfig, generator):
        self.pool, self.tables, self.cfg, self.generator = pool, tables, cfg, generator
        self.strata = pool.strata(tables)
        device = pool.images.device
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, device=device)[None, :, None, None]
        self.std = torch.tensor(ip.image_std, device=device)[None, :, None, None]
        self.fill = torch.tensor(ip.background_color, device=device, dtype=torch.float32)
        self.size = ip.size["height"]

    def pixels(self, scenes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised pixel values of the scenes' images (some VQ-reconstructed, some noised), cropped to boxes."""
        cfg = self.cfg
        x = self.pool.augmented(scenes, cfg.recon_prob, cfg.noise_prob, cfg.noise_sigma_max, self.generator)
        x = crop_resize(x, boxes, self.size, self.fill)
        return (x / 255.0 - self.mean) / self.std

    def sample(self):
        """(input ids, attention mask, labels, answer positions, pixels, number of yes/no rows, text rows)."""
        scenes, rows, boxes, n_und = self.pool.draw(self.strata, self.cfg.und_batch, self.cfg.cap_batch,
                                                    self.generator)
        t = self.tables
        pixels = self.pixels(scenes, boxes)
        return t.qa_ids[rows], t.qa_mask[rows], t.qa_labels[rows], t.answer_pos[rows], pixels, n_und, rows


def lm_step_losses(backend: JanusBackend, pool: ScenePool, sampler: UnderstandingSampler, tables: TextTables,
                   cfg: PretrainConfig, generator, autocast) -> dict[str, torch.Tensor]:
    """Losses of one mixed batch: text-to-image CE, yes/no CE, caption CE (and the yes/no accuracy)."""
    device = pool.images.device
    positives = sampler.strata["caption"][0]
    pick = positives[torch.randint(0, len(positives), (cfg.gen_batch,), device=device, generator=generator)]
    ids, mask = tables.gen_ids[pool.prompt[pick]], tables.gen_mask[pool.prompt[pick]]
    drop = torch.rand(len(pick), device=device, generator=generator) < cfg.uncond_prob
    ids = torch.where(drop[:, None], backend.unconditional_ids(ids), ids)
    tokens = pool.tokens[pick]
    with autocast():
        logits = backend.image_logits(ids, mask, tokens)
    gen_loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())

    qa_ids, qa_mask, labels, answer_pos, pixels, n_und, row_index = sampler.sample()
    with autocast():
        out = backend.core(input_ids=qa_ids, attention_mask=qa_mask, pixel_values=pixels)
    logits = out.logits[:, :-1].float()
    target = labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    valid = (target != -100).float()
    row_loss = (token_loss * valid).sum(1) / valid.sum(1).clamp(min=1)
    rows = torch.arange(n_und, device=device)
    answer_logits = logits[rows, answer_pos[:n_und]]
    predicted_yes = answer_logits[:, tables.yes_id] > answer_logits[:, tables.no_id]
    right = (predicted_yes == (target[rows, answer_pos[:n_und]] == tables.yes_id)).float()
    is_global = (row_index[:n_und] < 2 * tables.num_prompts).float()
    cap_loss = row_loss[n_und:].mean() if len(row_loss) > n_und else torch.zeros((), device=device)
    return {
        "gen": gen_loss,
        "und": row_loss[:n_und].mean(),
        "cap": cap_loss,
        "und_acc": right.mean(),
        "global_acc": (right * is_global).sum() / is_global.sum().clamp(min=1),
        "local_acc": (right * (1 - is_global)).sum() / (1 - is_global).sum().clamp(min=1),
    }


def train_lm(backend: JanusBackend, pool: ScenePool, tables: TextTables, cfg: PretrainConfig, until: float,
             start: float, generator, autocast) -> int:
    """Train everything but the VQ on the mixed objective until the wall-clock time `until`; returns the steps."""
    model = backend.core
    model.model.vqmodel.requires_grad_(False)
    model.model.vqmodel.eval()
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vqmodel.")]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.lm_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lm_lr, betas=(0.9, 0.98),
    )
    sampler = UnderstandingSampler(pool, tables, backend.processor, cfg, generator)
    model.train()
    model.model.vqmodel.eval()
    stage_start, step, skipped = time.time(), 0, 0
    total = max(until - stage_start, 1e-6)
    last_log, window = time.time(), []
    while time.time() < until or step < cfg.min_steps:
        factor = lr_factor(step, cfg.lm_warmup, (time.time() - stage_start) / total, cfg.lm_min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.lm_lr * factor
        losses = lm_step_losses(backend, pool, sampler, tables, cfg, generator, autocast)
        loss = cfg.gen_weight * losses["gen"] + cfg.und_weight * losses["und"] + cfg.cap_weight * losses["cap"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(grad_norm):  # skip the rare non-finite step instead of poisoning the weights
            skipped += 1
            opt.zero_grad(set_to_none=True)
            if skipped > 50 and skipped > step // 10:
                raise FloatingPointError(f"{skipped} non-finite LM steps out of {step + skipped}; lower lm_lr")
            continue
        opt.step()
        step += 1
        keys = ("gen", "und", "cap", "und_acc", "global_acc", "local_acc")
        window.append(torch.stack([losses[k].detach() for k in keys] + [grad_norm.detach()]))
        if time.time() - last_log > cfg.log_every_s:
            gen_l, und_l, cap_l, acc, g_acc, l_acc, norm = torch.stack(window).mean(0).tolist()
            rate = step / (time.time() - stage_start)
            log(start, f"lm step {step}: gen {gen_l:.3f} und {und_l:.3f} (acc {acc:.3f}: global {g_acc:.3f} "
                        f"local {l_acc:.3f}) cap {cap_l:.3f} grad {norm:.2f} lr {cfg.lm_lr * factor:.2e} "
                        f"skipped {skipped} ({rate:.1f} steps/s)")
            last_log, window = time.time(), []
    model.eval()
    return step


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(backend: JanusBackend, cfg: PretrainConfig, workers: Workers, und_arrays, vq_arrays, seed: int,
             autocast, start: float) -> dict:
    """Generation, understanding, judge-agreement and VQ metrics of a backend (see the module docs)."""
    metrics: dict = {}
    backend.understanding_batch_size = cfg.eval_batch
    heldout = heldout_prompts()
    device = backend.device
    vq = backend.core.model.vqmodel
    t = time.time()
    metrics["vq_recon_accuracy"], metrics["vq_codebook_usage"] = vq_accuracy(
        vq, workers, vq_arrays, heldout, device, autocast, cfg.eval_batch)
    log(start, f"eval: VQ reconstruction accuracy {metrics['vq_recon_accuracy']:.3f} ({time.time() - t:.1f}s)")

    # generation on held-out prompts, scored exactly; the judge's global P(yes) on the same images
    prompts = sample_prompts(cfg.eval_gen_prompts, "heldout", seed=seed + 1)
    settings = {str(g): {"guidance": g} for g in cfg.eval_guidances}
    result = evaluate_generation(backend, workers, prompts, settings, seed + 2, cfg.eval_batch, autocast, start)
    generation = result["generation"]
    best = max(generation, key=lambda g: generation[g]["overall"])
    metrics["generation"] = generation
    metrics["best_guidance"] = float(best)
    metrics["generation_accuracy"] = generation[best]["overall"]
    pooled = result["judge_agreement"]["pooled"]
    metrics["judge_agreement_accuracy"] = pooled["accuracy"]
    metrics["judge_agreement_auc"] = pooled["auc"]
    metrics["judge_agreement"] = {"pooled": pooled, "per_guidance": result["judge_agreement"]["per_setting"]}

    # yes/no understanding on fresh renders of held-out prompts, clean and VQ-reconstructed
    t = time.time()
    recon = np.concatenate([
        vq_roundtrip(vq, chunk, autocast)[1].cpu().numpy()
        for chunk in torch.from_numpy(und_arrays["images"]).to(device).split(cfg.eval_batch)
    ])
    und = evaluate_understanding(backend, und_arrays, recon, heldout, "vq", autocast)
    metrics["understanding_accuracy"] = und.pop("accuracy")
    metrics["understanding"] = und
    log(start, f"eval: understanding {metrics['understanding_accuracy']:.3f} {und} ({time.time() - t:.1f}s)")
    return metrics


# ---------------------------------------------------------------------------------------------------- saving
def save_model(model, processor, path: Path) -> None:
    """Save the model in bfloat16 (safetensors shards of <= 15 MB) and its processor into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16)
    try:
        model.save_pretrained(str(path), max_shard_size="15MB")
    finally:
        model.to(dtype)
    processor.save_pretrained(str(path))


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments of `python -m srum_trl.shapes.pretrain`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (model/ and metrics.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default: 430 at full scale, 40 at tiny)")
    parser.add_argument("--workers", type=int, default=None, help="rendering/scoring processes (0: in-process)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the whole pipeline (see the module docs); returns the metrics that are written to `metrics.json`."""
    args = parse_args(argv)
    start = time.time()
    cfg, device, autocast = run_setup(args, SCALES)
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
        vq_jobs = scene_jobs(seed, 0, cfg.vq_pool, cfg.chunk, "train", 0.7, 0)
        lm_jobs = scene_jobs(seed, 1, cfg.lm_pool, cfg.chunk, "train", cfg.positive_fraction, slots)
        vq_eval_jobs = scene_jobs(seed, 2, cfg.eval_vq_images, cfg.chunk, "heldout", 1.0, 0)
        und_eval_jobs = scene_jobs(seed, 3, cfg.eval_und_scenes, cfg.chunk, "heldout", 0.5, slots)
        vq_arrays = concat_arrays(workers.map(render_scenes, vq_jobs))
        pending_eval = workers.map_async(render_scenes, vq_eval_jobs + und_eval_jobs)
        pending_lm = workers.map_async(render_scenes, lm_jobs)
        model, processor = build_tiny_janus(VOCABULARY, cfg.spec, seed=seed)
        model.to(device)
        backend = JanusBackend(model, processor, understanding_batch_size=cfg.eval_batch)
        n_params = sum(p.numel() for p in model.parameters())
        seconds["setup"] = time.time() - t
        log(start, f"scale {cfg.scale} on {device} with {cfg.workers} workers; {n_params / 1e6:.2f}M parameters; "
                    f"{len(vq_arrays['images'])} VQ images rendered ({seconds['setup']:.1f}s)")

        # a. VQ
        t = time.time()
        vq = model.model.vqmodel
        vq_images = torch.from_numpy(vq_arrays["images"]).to(device)
        eval_chunks = pending_eval.get()
        vq_eval_arrays = concat_arrays(eval_chunks[: len(vq_eval_jobs)])
        und_eval_arrays = concat_arrays(eval_chunks[len(vq_eval_jobs) :])
        vq_check = {k: v[: max(1, len(v) // 2)] for k, v in vq_eval_arrays.items()}  # half held back for the final eval
        state = train_vq(vq, vq_images, cfg, start + cfg.vq_fraction * cfg.time_budget_s, start, generator, autocast)
        vq_acc, used = vq_accuracy(vq, workers, vq_check, heldout_prompts(), device, autocast, cfg.eval_batch)
        log(start, f"vq: {state['step']} steps, reconstruction accuracy {vq_acc:.3f}, codebook usage {used:.2f}")
        extra = 0.0
        while cfg.require_vq_target and vq_acc < cfg.vq_target and extra < cfg.vq_max_extra_s:
            extra += cfg.vq_extend_s
            state = train_vq(vq, vq_images, cfg, time.time() + cfg.vq_extend_s, start, generator, autocast, state)
            vq_acc, used = vq_accuracy(vq, workers, vq_check, heldout_prompts(), device, autocast, cfg.eval_batch)
            log(start, f"vq (extended): {state['step']} steps, reconstruction accuracy {vq_acc:.3f}")
        if cfg.require_vq_target and vq_acc < cfg.vq_target:
            log(start, f"WARNING: VQ reconstruction accuracy {vq_acc:.3f} is below the target {cfg.vq_target}")
        vq_steps = state["step"]
        del vq_images, state
        seconds["vq"] = time.time() - t

        # b. language model
        t = time.time()
        pool = ScenePool(concat_arrays(pending_lm.get()), device)
        pool.encode(lambda chunk: vq_roundtrip(vq, chunk, autocast), 1024 if device.type == "cuda" else 64)
        tables = TextTables(processor, train_prompts(), device)
        tables.check_against(backend)
        log(start, f"lm: {len(pool)} scenes encoded ({time.time() - t:.1f}s); "
                    f"kinds {np.bincount(pool.kind.cpu().numpy(), minlength=len(KINDS)).tolist()}")
        lm_steps = train_lm(backend, pool, tables, cfg, deadline - cfg.eval_reserve_s, start, generator, autocast)
        del pool
        seconds["lm"] = time.time() - t
        log(start, f"lm: {lm_steps} steps ({seconds['lm']:.1f}s)")

        # d. save, then c. evaluate the checkpoint as it loads
        t = time.time()
        model_dir = out / "model"
        save_model(model, processor, model_dir)
        del model, backend
        from ..models import load_backend

        loaded = load_backend(str(model_dir), dtype=torch.float32)
        loaded.model.to(device)
        seconds["save"] = time.time() - t
        t = time.time()
        eval_vq = {k: v[max(1, len(v) // 2) :] if len(v) > 1 else v for k, v in vq_eval_arrays.items()}
        metrics = evaluate(loaded, cfg, workers, und_eval_arrays, eval_vq, seed, autocast, start)
        seconds["eval"] = time.time() - t
    finally:
        workers.close()
        torch.set_num_threads(threads)
    seconds["total"] = time.time() - start
    codebook = loaded.core.model.vqmodel.quantize.embedding.weight.float()
    metrics.update(
        scale=cfg.scale,
        seed=seed,
        device=str(device),
        num_parameters=int(n_params),
        vq_recon_accuracy_after_stage=vq_acc,
        codebook_norm_max_error=float((codebook.detach().norm(dim=-1) - 1).abs().max()),
        steps={"vq": vq_steps, "lm": lm_steps},
        seconds=seconds,
        config=jsonable(asdict(cfg)),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(start, f"done: generation {metrics['generation_accuracy']:.3f} (guidance {metrics['best_guidance']}), "
                f"understanding {metrics['understanding_accuracy']:.3f}, judge agreement "
                f"{metrics['judge_agreement_accuracy']:.3f} / AUC {metrics['judge_agreement_auc']}, "
                f"VQ {metrics['vq_recon_accuracy']:.3f}; seconds {json.dumps({k: round(v, 1) for k, v in seconds.items()})}")
    return metrics


if __name__ == "__main__":
    main()
