"""ShapesWorld training batches in the form the native BAGEL model reads them, built on the training device.

- Generation (flow matching): `[<|im_start|>] prompt [<|im_end|>]` rows (left padded, as `BagelBackend` builds
  them), a dropped prompt being a row with no valid token (the unconditional context of text CFG), and the clean
  latent tokens of a render.
- Understanding: one row per (image, question): `[<|vision_start|>] ViT tokens [<|vision_end|>]` at rotary position
  0, then `[<|im_start|>] question [<|im_end|>] [<|im_start|>]` and the answer (`yes` / `no` or a caption) with
  `<|im_end|>`, as `BagelBackend` lays out a judge's question. The image is resized the way the backend's NaViT
  transform resizes it (Pillow's bicubic filter, emulated in torch), placed in the top-left corner of a fixed canvas
  of `vit_max_size` pixels, and cut into patches; the patches outside the resized image are masked out, so every row
  has the same length and the model sees what `BagelBackend.yes_probability` would show it. Rows are padded in the
  middle (between the image block and the text) rather than on the left: masked positions do not change what the
  valid ones compute.
- One pretraining step: [`draw_batch`] makes every random choice on the device, [`batch_losses`] computes the
  losses from it with static shapes and no host synchronisation (what `torch.compile` fuses).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..models.bagel.backend import shift_timesteps
from ..models.bagel.processing import add_special_tokens, encode_text, navit_size
from .questions import NO, YES
from .scenes import QuestionRows, resize_weights
from .world import IMAGE_SIZE


class FlowTextTables(QuestionRows):
    """Pre-tokenized rows for every prompt and question of the pretraining mixture.

    Generation rows `gen_ids` / `gen_valid` `[P, Lg]`: `[bos] prompt [eos]` per prompt, left padded. Question rows
    `qa_ids` / `qa_valid` / `qa_labels` `[R, Lq]`: `[bos] question [eos] [bos] answer [eos]`, left padded; labels are
    -100 except on the answer and its eos. Row order (as in the Janus tables): global question of prompt p with
    answer a (0 no, 1 yes) at `2 p + a`; local question q with answer a at `2 P + 2 q + a`; the caption of prompt p
    at `2 P + 2 Q + p`.
    """

    def __init__(self, tokenizer, prompts: list[str], device):
        self.ids = add_special_tokens(tokenizer)
        self.prompts = prompts
        words = lambda text: self._words(tokenizer, text)  # noqa: E731
        self.yes_id, self.no_id = self._one(words(YES)), self._one(words(NO))
        bos, eos = self.ids.bos, self.ids.eos
        self.gen_ids, self.gen_valid, _ = self._pad([[bos, *words(p), eos] for p in prompts], [0] * len(prompts),
                                                    device)
        rows = self.question_rows(prompts, words, self.yes_id, self.no_id)
        seqs = [[bos, *q, eos, bos, *a, eos] for q, a in rows]
        self.qa_ids, self.qa_valid, self.qa_labels = self._pad(seqs, [len(a) + 1 for _, a in rows], device)
        # index (in the row) of the token whose next-token logits give the first answer token: the last question bos
        self.answer_pos = torch.tensor([self.qa_ids.shape[1] - len(a) - 2 for _, a in rows], device=device)

    @staticmethod
    def _words(tokenizer, text: str) -> list[int]:
        ids = encode_text(tokenizer, text)
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(f"{text!r} has words outside the tokenizer's vocabulary")
        return ids

    @staticmethod
    def _one(ids: list[int]) -> int:
        (token,) = ids
        return token

    def _pad(self, seqs, answer_lengths, device):
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.ids.pad, dtype=torch.long)
        valid = torch.zeros((len(seqs), length), dtype=torch.bool)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, answer_lengths)):
            ids[i, length - len(s) :] = torch.tensor(s)
            valid[i, length - len(s) :] = True
            if n:
                labels[i, length - n :] = ids[i, length - n :]
        return ids.to(device), valid.to(device), labels.to(device)


class NavitCanvas:
    """The backend's NaViT image transform for every crop of a `size` x `size` image, batched on the device.

    `sizes[h, w]` is the `(height, width)` that `navit_size` gives an `h x w` crop (computed once with the backend's
    own function). [`patches`] resizes crops into a `vit_max_size` canvas and returns the patches with their
    validity; the position ids of the canvas' patches are `row * side + col`, which is what `grid_position_ids` gives
    the valid ones when the canvas side equals `vit_max_num_patch_per_side`.
    """

    def __init__(self, size: int, vit_max_size: int, vit_min_size: int, patch: int, device, max_pixels=None):
        if vit_max_size % patch:
            raise ValueError(f"vit_max_size {vit_max_size} must be a multiple of the patch size {patch}.")
        self.canvas, self.patch, self.side = vit_max_size, patch, vit_max_size // patch
        table = np.zeros((size + 1, size + 1, 2), dtype=np.int64)
        for h in range(1, size + 1):
            for w in range(1, size + 1):
                new_w, new_h = navit_size(w, h, vit_max_size, vit_min_size, patch, max_pixels)
                if max(new_w, new_h) > vit_max_size:
                    raise ValueError(f"a {w}x{h} crop is resized to {new_w}x{new_h}, larger than the canvas.")
                table[h, w] = (new_h, new_w)
        self.sizes = torch.from_numpy(table).to(device)
        self.position_ids = torch.arange(self.side * self.side, device=device)

    def patches(self, images: torch.Tensor, boxes: torch.Tensor):
        """`images` float `[B, 3, H, W]` in 0..255, `boxes` `[B, 4]` (x0, y0, x1, y1, end-exclusive) ->
        (patches `[B, side*side, p*p*3]` in [-1, 1], valid `[B, side*side]` bool)."""
        _, _, height, width = images.shape
        x0, y0, x1, y1 = boxes.long().unbind(1)
        w, h = x1 - x0, y1 - y0
        new_h, new_w = self.sizes[h, w].unbind(1)
        zero = torch.zeros_like(x0, dtype=torch.float32)
        wx, _ = resize_weights(x0.float(), w.float(), new_w.float(), zero, self.canvas, width)
        wy, _ = resize_weights(y0.float(), h.float(), new_h.float(), zero, self.canvas, height)
        x = torch.einsum("bcyi,bxi->bcyx", images.float(), wx).clamp(0, 255).round()
        x = torch.einsum("boy,bcyx->bcox", wy, x).clamp(0, 255).round()
        x = x / 127.5 - 1.0
        B, p, s = x.shape[0], self.patch, self.side
        patches = x.reshape(B, 3, s, p, s, p).permute(0, 2, 4, 3, 5, 1).reshape(B, s * s, p * p * 3)
        rows = torch.arange(s, device=x.device)
        valid = (rows[None, :, None] < (new_h // p)[:, None, None]) & (rows[None, None, :] < (new_w // p)[:, None, None])
        return patches, valid.reshape(B, s * s)


def understanding_inputs(tables: FlowTextTables, rows: torch.Tensor, patches: torch.Tensor, vit_valid: torch.Tensor,
                         position_ids: torch.Tensor) -> dict:
    """Keyword arguments of `BagelModel.forward(task="understand")` for question rows `rows` about images given as
    canvas patches; also `labels` (aligned with the ids) and `answer_index` (see [`FlowTextTables`])."""
    B, n = vit_valid.shape
    device = vit_valid.device
    ids = tables.ids
    text_ids, text_valid = tables.qa_ids[rows], tables.qa_valid[rows]
    head = torch.tensor([ids.start_of_image] + [ids.pad] * n + [ids.end_of_image], device=device)
    all_ids = torch.cat([head.expand(B, n + 2), text_ids], 1)
    ones = torch.ones(B, 1, dtype=torch.bool, device=device)
    valid = torch.cat([ones, vit_valid, ones, text_valid], 1)
    text_positions = text_valid.long().cumsum(1)  # the image block is at 0, text from 1
    positions = torch.cat([torch.zeros(B, n + 2, dtype=torch.long, device=device), text_positions], 1)
    block_id = torch.cat([torch.zeros(B, n + 2, dtype=torch.long, device=device),
                          torch.full_like(text_ids, -1)], 1)
    slots = torch.cat([~ones, vit_valid, ~ones, torch.zeros_like(text_valid)], 1)
    labels = torch.cat([torch.full((B, n + 2), -100, dtype=torch.long, device=device), tables.qa_labels[rows]], 1)
    return {"ids": all_ids, "valid": valid, "positions": positions, "block_id": block_id, "vit_slots": slots,
            "vit_patches": patches, "vit_position_ids": position_ids.expand(B, n), "vit_valid": vit_valid,
            "labels": labels, "answer_index": n + 2 + tables.answer_pos[rows]}


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the mean next-token cross-entropy over its labelled positions (`logits` `[B, L, V]`)."""
    target = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = (target != -100).float()
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)


def draw_batch(pool, tables: FlowTextTables, canvas: NavitCanvas, strata: dict, cfg, timestep_shift: float,
               generator) -> dict:
    """Every random choice of one pretraining step, made on the pool's device: a flow-matching batch (`gen`: the
    prompt rows, `cfg.uncond_prob` of them dropped, noised latents `x_t` at logit-normal times `t`, the velocity
    `target`) and an understanding batch (`und`: the model's keyword arguments, `labels`, `answer_index`, `n_und`
    yes/no rows then captions, `is_global`). `cfg` gives the batch sizes and augmentations (`FlowPretrainConfig`)."""
    device = pool.images.device
    positives = strata["caption"][0]
    pick = positives[torch.randint(0, len(positives), (cfg.gen_batch,), device=device, generator=generator)]
    ids, valid = tables.gen_ids[pool.prompt[pick]], tables.gen_valid[pool.prompt[pick]]
    drop = torch.rand(len(pick), device=device, generator=generator) < cfg.uncond_prob
    x0 = pool.tokens[pick]
    t = shift_timesteps(torch.sigmoid(torch.randn(len(pick), device=device, generator=generator)), timestep_shift)
    eps = torch.randn(x0.shape, device=device, generator=generator)
    gen = {"ids": ids, "valid": valid & ~drop[:, None], "x_t": (1 - t[:, None, None]) * x0 + t[:, None, None] * eps,
           "t": t, "target": eps - x0}

    scenes, rows, boxes, n_und = pool.draw(strata, cfg.und_batch, cfg.cap_batch, generator)
    images = pool.augmented(scenes, cfg.recon_prob, cfg.noise_prob, cfg.noise_sigma_max, generator)
    patches, vit_valid = canvas.patches(images, boxes)
    und = understanding_inputs(tables, rows, patches, vit_valid, canvas.position_ids)
    labels, answer_index = und.pop("labels"), und.pop("answer_index")
    return {"gen": gen, "und": und, "labels": labels, "answer_index": answer_index, "n_und": n_und,
            "is_global": (rows[:n_und] < 2 * tables.num_prompts).float()}


def batch_losses(model, batch: dict, markers: torch.Tensor, yes_id: int, no_id: int, autocast: bool):
    """Losses of a [`draw_batch`] batch: flow matching (velocity MSE), yes/no and caption cross-entropy, and the
    yes/no accuracy (all, global, local). Pure tensor code with static shapes, so that `torch.compile` can fuse it;
    `autocast`: bfloat16 autocast on the model's device."""
    gen, und, n_und = batch["gen"], batch["und"], batch["n_und"]
    side = IMAGE_SIZE // model.config.latent_downsample
    device_type = gen["x_t"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        v = model(task="context_velocity", ids=gen["ids"], valid=gen["valid"], x_t=gen["x_t"], t=gen["t"],
                  grid=(side, side), markers=markers)
        logits = model(task="understand", all_logits=True, **und)
    gen_loss = F.mse_loss(v.float(), gen["target"])
    labels, answer_index = batch["labels"], batch["answer_index"]
    row_loss = answer_losses(logits, labels)
    rows = torch.arange(n_und, device=logits.device)
    answer = logits[rows, answer_index[:n_und]].float()
    predicted_yes = answer[:, yes_id] > answer[:, no_id]
    right = (predicted_yes == (labels[rows, answer_index[:n_und] + 1] == yes_id)).float()
    is_global = batch["is_global"]
    return {
        "gen": gen_loss,
        "und": row_loss[:n_und].mean(),
        "cap": row_loss[n_und:].mean() if row_loss.shape[0] > n_und else gen_loss.new_zeros(()),
        "und_acc": right.mean(),
        "global_acc": (right * is_global).sum() / is_global.sum().clamp(min=1),
        "local_acc": (right * (1 - is_global)).sum() / (1 - is_global).sum().clamp(min=1),
    }
