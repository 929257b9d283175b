"""[`BagelBackend`]: BAGEL seen through [`UMMBackend`] - rectified-flow image generation with text CFG, the flow
matching loss per latent token, and the understanding path (SigLIP ViT + understanding expert) as judge.

Conventions (the official ones):

- generation context: `<|im_start|> prompt <|im_end|>` (rotary positions 0..L-1), then the image block
  `<|vision_start|> latent tokens <|vision_end|>` sharing one rotary position L; latent tokens are 2x2 patches of the
  16-channel FLUX latent (64 numbers, one token per 16x16 pixels); unconditional (text CFG): the image block alone at
  position 0;
- rectified flow: `x_t = (1 - t) x_0 + t eps`, velocity target `eps - x_0`, training `t = sigmoid(n)`, n ~ N(0, 1)
  (shifted by the config's `timestep_shift`, 1.0 = none);
- sampler: Euler from t = 1 to 0 over `linspace(1, 0, num_timesteps)` shifted by `s t / (1 + (s - 1) t)`; text
  CFG `v_u + w (v_c - v_u)` only for `t` in `(cfg_interval[0], cfg_interval[1]]`, then renormalised so that its
  norm does not exceed the conditional one's ("global": over the whole image, per image);
- understanding: `<|vision_start|> ViT tokens <|vision_end|>` (one rotary position, full attention inside) then
  `<|im_start|> question <|im_end|>` then `<|im_start|>`, after which the model answers.
"""

from __future__ import annotations

import contextlib
import math

import torch
from PIL import Image

from ..base import GenerationConfig, Rollout, UMMBackend
from ..flow_sde import FlowTrajectory
from .flow import recompute_step_logprobs, sample_latents
from .processing import (
    VLM_THINK_SYSTEM_PROMPT,
    add_special_tokens,
    encode_text,
    image_to_tensor,
    latents_to_tokens,
    navit_size,
    patchify,
    tensor_to_image,
    tokens_to_latents,
)
from .vae import decode_latents

_RENORM = ("global", "channel", "text_channel", "none")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """`s t / (1 + (s - 1) t)`: more time near t = 1 (noise) for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sampling_timesteps(num_timesteps: int, shift: float, device=None) -> torch.Tensor:
    """The sampler's time grid: `linspace(1, 0, num_timesteps)`, shifted."""
    return shift_timesteps(torch.linspace(1, 0, num_timesteps, device=device), shift)


def guide_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, renorm_type: str = "global",
                   renorm_min: float = 0.0) -> torch.Tensor:
    """Text CFG on velocities `[R, n, C]`, with the official renormalisation (per image for "global")."""
    guided = v_uncond + scale * (v_cond - v_uncond)
    if renorm_type == "none":
        return guided
    if renorm_type == "global":
        norm_c = v_cond.flatten(1).norm(dim=-1)[:, None, None]
        norm_g = guided.flatten(1).norm(dim=-1)[:, None, None]
    elif renorm_type in ("channel", "text_channel"):
        norm_c = v_cond.norm(dim=-1, keepdim=True)
        norm_g = guided.norm(dim=-1, keepdim=True)
    else:
        raise ValueError(f"cfg_renorm_type must be one of {_RENORM}, got {renorm_type!r}.")
    return guided * (norm_c / (norm_g + 1e-8)).clamp(min=renorm_min, max=1.0)


class BagelBackend(UMMBackend):
    """[`UMMBackend`] for BAGEL (`BagelModel` + FLUX VAE + Qwen2 tokenizer).

    Args:
        model: a [`BagelModel`] (optionally PEFT-wrapped).
        tokenizer: its tokenizer (the backend's `processor`).
        vae: a diffusers `AutoencoderKL` holding the FLUX VAE (not trained, not part of `model`).
        image_size: side of generated images in pixels, a multiple of 16, at most 16 * `max_latent_size` (1024).
        num_timesteps: points of the sampler's time grid (num_timesteps - 1 Euler steps; official: 50).
        timestep_shift: shift s of the sampler's grid (official: 3.0).
        cfg_interval: `(low, high]` range of t in which text CFG is applied (official: (0.4, 1.0)).
        cfg_renorm_type, cfg_renorm_min: CFG renormalisation ("global", "channel" or "none"; official: global, 0).
        vit_max_size, vit_min_size, vit_max_pixels: the understanding image transform (official: 980, 224,
            14*14*9*1024).
        understanding_batch_size: (image, question) pairs per understanding forward.
        think: answer in the official "think" mode (a system prompt asks for `<think>...</think>` first).
        generation_format / question_format: `{prompt}` / `{question}` templates of the text blocks.
        guidance_scale: the text CFG scale `generate` uses when given no config (official: 4.0).
    """

    token_kind = "continuous"

    def __init__(
        self,
        model,
        tokenizer,
        vae,
        image_size: int = 1024,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        vit_max_size: int = 980,
        vit_min_size: int = 224,
        vit_max_pixels: int | None = 14 * 14 * 9 * 1024,
        understanding_batch_size: int = 8,
        think: bool = False,
        generation_format: str = "{prompt}",
        question_format: str = "{question}",
        vae_dtype: torch.dtype | None = None,
        guidance_scale: float = 4.0,
    ):
        super().__init__(model, tokenizer)
        self.vae = vae
        cfg = self.config
        if image_size % cfg.latent_downsample or image_size // cfg.latent_downsample > cfg.max_latent_size:
            raise ValueError(
                f"image_size must be a multiple of {cfg.latent_downsample} and at most "
                f"{cfg.latent_downsample * cfg.max_latent_size}, got {image_size}."
            )
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2 (one Euler step), got {num_timesteps}.")
        if cfg_renorm_type not in _RENORM:
            raise ValueError(f"cfg_renorm_type must be one of {_RENORM}, got {cfg_renorm_type!r}.")
        self._image_size = image_size
        self.num_timesteps = num_timesteps
        self.timestep_shift = timestep_shift
        self.cfg_interval = tuple(cfg_interval)
        self.cfg_renorm_type = cfg_renorm_type
        self.cfg_renorm_min = cfg_renorm_min
        self.vit_max_size, self.vit_min_size, self.vit_max_pixels = vit_max_size, vit_min_size, vit_max_pixels
        self.understanding_batch_size = understanding_batch_size
        self.think = think
        self.generation_format = generation_format
        self.question_format = question_format
        self.vae_dtype = vae_dtype
        self.guidance_scale = float(guidance_scale)
        self.ids = add_special_tokens(tokenizer)
        self._yes_ids = self._single_token_ids(("yes", "Yes", " yes", " Yes", "YES"))
        self._no_ids = self._single_token_ids(("no", "No", " no", " No", "NO"))
        self._runner = None

    # ------------------------------------------------------------------------------------------- plumbing
    @property
    def core(self):
        """The `BagelModel` under PEFT / compile wrappers."""
        return _unwrap(self.model)

    @property
    def config(self):
        return self.core.config

    @property
    def tokenizer(self):
        return self.processor

    @contextlib.contextmanager
    def using(self, module: torch.nn.Module):
        """Run the model's forwards through `module` (a DDP / FSDP wrapper of `model`) inside the block, so that the
        wrapper's gradient synchronisation sees them."""
        previous, self._runner = self._runner, module
        try:
            yield self
        finally:
            self._runner = previous

    def _call(self, task: str, **inputs):
        runner = self._runner if self._runner is not None else self.model
        return runner(task=task, **inputs)

    def _markers(self) -> torch.Tensor:
        return torch.tensor([self.ids.start_of_image, self.ids.end_of_image], device=self.device)

    def _single_token_ids(self, words) -> list[int]:
        ids = set()
        for word in words:
            enc = encode_text(self.tokenizer, word)
            if len(enc) == 1 and enc[0] != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(enc[0])
        return sorted(ids)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def token_grid(self) -> tuple[int, int]:
        n = self._image_size // self.config.latent_downsample
        return (n, n)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """`(C, H/8, W/8)` of the clean latents stored in `Rollout.tokens`."""
        h, w = self.token_grid
        p = self.config.latent_patch_size
        return (self.config.latent_channels, h * p, w * p)

    @property
    def max_prompt_tokens(self) -> int:
        # every position but the one the image block occupies
        return self.config.llm_config.max_position_embeddings - 1

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        return [len(self._prompt_ids(p)) for p in prompts]

    def _prompt_ids(self, prompt: str) -> list[int]:
        text = self.generation_format.format(prompt=prompt)
        return [self.ids.bos] + encode_text(self.tokenizer, text) + [self.ids.eos]

    def _left_pad(self, rows: list[list[int]]):
        length = max(1, max((len(r) for r in rows), default=0))
        ids = torch.full((len(rows), length), self.ids.pad, dtype=torch.long)
        valid = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            if row:
                ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
                valid[i, length - len(row):] = True
        return ids.to(self.device), valid.to(self.device)

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts, config: GenerationConfig | None = None, seed: int | None = None, progress=False):
        """Sample one image per prompt. `config.guidance` is the text CFG scale (official: 4.0); temperature and
        top_k do not apply to flow sampling. The same seed gives the same images (noise is drawn on the CPU). With
        `config.sde` the sampler takes SDE steps where the config says and records them in `Rollout.trajectory`
        (`flow.sample_latents`)."""
        config = config or self.default_generation_config()
        self.check_prompts(prompts)
        parts = self._sample_batches(prompts, config.batch_size, seed,
                                     lambda batch, g: sample_latents(self, batch, config.guidance, g, config.sde),
                                     progress)
        latents = tokens_to_latents(torch.cat([p[0] for p in parts]), self.token_grid, self.config.latent_channels,
                                    self.config.latent_patch_size)
        return Rollout(
            prompts=list(prompts),
            images=self.decode(latents),
            tokens=latents.cpu(),
            grid=self.token_grid,
            guidance=config.guidance,
            temperature=config.temperature,
            seed=seed,
            guidance_margin=torch.full((len(prompts),), math.nan),
            trajectory=FlowTrajectory.cat([p[1] for p in parts]) if config.sde is not None else None,
        )

    def _sample(self, prompts: list[str], guidance: float, generator: torch.Generator) -> torch.Tensor:
        """Clean latents `[B, C, H/8, W/8]` (float32) for the prompts (the deterministic sampler)."""
        tokens, _ = sample_latents(self, prompts, guidance, generator)
        return tokens_to_latents(tokens, self.token_grid, self.config.latent_channels, self.config.latent_patch_size)

    def _vae(self):
        device = self.device
        dtype = self.vae_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if self.vae.device != device or self.vae.dtype != dtype:
            self.vae.to(device=device, dtype=dtype)
        return self.vae

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Clean latents `[B, C, H/8, W/8]` (or latent tokens `[B, h*w, 64]`) -> images."""
        if tokens.dim() == 3:
            tokens = tokens_to_latents(tokens, self.token_grid, self.config.latent_channels,
                                       self.config.latent_patch_size)
        vae = self._vae()
        images = []
        for chunk in tokens.split(8):
            pixels = decode_latents(vae, chunk.to(self.device))
            images.extend(tensor_to_image(p) for p in pixels)
        return images

    # ------------------------------------------------------------------------------------------- training
    def token_losses(self, prompts, rollout, loss_guidance="guided", text_dropout=0.0, *, generator=None):
        """Flow-matching MSE per latent token `[B, h*w]` (mean over the 64 numbers of each 2x2 patch token), with a
        fresh `t = sigmoid(n)` per image and fresh noise, drawn from `generator` (on the CPU) or, when None, from
        torch's global RNG.

        "conditional": the conditional velocity (prompts dropped to the empty context with probability
        `text_dropout`: the paper's loss). "guided": the CFG velocity that the sampler would use at that t
        (conditional outside `cfg_interval`), with the rollout's guidance scale.
        """
        if loss_guidance not in ("guided", "conditional"):
            raise ValueError(f"loss_guidance must be 'guided' or 'conditional', got {loss_guidance!r}.")
        device = self.device
        cfg = self.config
        x0 = latents_to_tokens(rollout.tokens.to(device=device, dtype=torch.float32), cfg.latent_patch_size)
        B = x0.shape[0]
        if generator is None:
            n, eps = torch.randn(B, device=device), torch.randn_like(x0)
        else:
            n = torch.randn(B, generator=generator).to(device)
            eps = torch.randn(x0.shape, generator=generator).to(device)
        t = shift_timesteps(torch.sigmoid(n), cfg.timestep_shift)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        target = eps - x0
        rows = [self._prompt_ids(p) for p in prompts]
        markers = self._markers()
        grid = tuple(rollout.grid)
        guided = loss_guidance == "guided" and rollout.guidance != 1.0
        if guided:
            ids, valid = self._left_pad(rows + [[] for _ in rows])
            v = self._call("context_velocity", ids=ids, valid=valid, x_t=torch.cat([x_t, x_t]),
                           t=torch.cat([t, t]), grid=grid, markers=markers).float()
            v_c, v_u = v[:B], v[B:]
            v_g = guide_velocity(v_c, v_u, rollout.guidance, self.cfg_renorm_type, self.cfg_renorm_min)
            lo, hi = self.cfg_interval
            inside = ((t > lo) & (t <= hi))[:, None, None]
            v = torch.where(inside, v_g, v_c)
        else:
            if text_dropout > 0:
                drop = (torch.rand(B, generator=generator) < text_dropout).tolist()
                rows = [[] if d else r for r, d in zip(rows, drop)]
            ids, valid = self._left_pad(rows)
            v = self._call("context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=grid,
                           markers=markers).float()
        return (v - target).pow(2).mean(-1)

    def step_logprobs(self, prompts, rollout):
        """The rollout's recorded SDE steps under the model as it is now, with gradients
        (`flow.recompute_step_logprobs`)."""
        return recompute_step_logprobs(self, prompts, rollout)

    @torch.no_grad()
    def guidance_margin(self, prompts: list[str], rollout: Rollout, times=(0.3, 0.5, 0.7, 0.9),
                        seed: int = 0) -> torch.Tensor:
        """Per image, how far the conditional velocity is from the unconditional one on its own latents: the mean
        over `times` and tokens of `|v_c - v_u|^2` (per latent number), with noise drawn from `seed` (the flow
        counterpart of the discrete backends' guidance margin; drift shows guidance compounding)."""
        device = self.device
        cfg = self.config
        x0 = latents_to_tokens(rollout.tokens.to(device=device, dtype=torch.float32), cfg.latent_patch_size)
        B = x0.shape[0]
        generator = torch.Generator().manual_seed(seed)
        ids, valid = self._left_pad([self._prompt_ids(p) for p in prompts] + [[] for _ in prompts])
        gaps = []
        for point in times:
            t = torch.full((B,), float(point), device=device)
            eps = torch.randn(x0.shape, generator=generator).to(device)
            x_t = (1 - point) * x0 + point * eps
            v = self._call("context_velocity", ids=ids, valid=valid, x_t=torch.cat([x_t, x_t]), t=torch.cat([t, t]),
                           grid=tuple(rollout.grid), markers=self._markers()).float()
            gaps.append((v[:B] - v[B:]).pow(2).mean(dim=(1, 2)))
        return torch.stack(gaps).mean(0).cpu()

    def default_generation_config(self) -> GenerationConfig:
        """Text CFG at `guidance_scale` (the folder's `generation_config.json`, else BAGEL's 4.0)."""
        return GenerationConfig(guidance=self.guidance_scale)

    # ------------------------------------------------------------------------------------ understanding
    def _vit_inputs(self, image: Image.Image):
        vit = self.config.vit_config
        w, h = navit_size(*image.size, self.vit_max_size, self.vit_min_size, vit.patch_size, self.vit_max_pixels)
        pixels = image_to_tensor(image, (w, h))
        patches = patchify(pixels, vit.patch_size)
        from .modeling import grid_position_ids

        pos = grid_position_ids(h // vit.patch_size, w // vit.patch_size, self.config.vit_max_num_patch_per_side)
        return patches, pos

    def _understanding_batch(self, images, questions):
        """Left-padded multimodal rows `[system?] [image] [question] <|im_start|>` and the ViT inputs."""
        rows, vit = [], []
        for image, question in zip(images, questions):
            patches, pos = self._vit_inputs(image)
            vit.append((patches, pos))
            tokens, positions, blocks, slots = [], [], [], []
            p = 0
            if self.think:
                sys_ids = [self.ids.bos] + encode_text(self.tokenizer, VLM_THINK_SYSTEM_PROMPT) + [self.ids.eos]
                tokens += sys_ids
                positions += list(range(p, p + len(sys_ids)))
                blocks += [-1] * len(sys_ids)
                slots += [False] * len(sys_ids)
                p += len(sys_ids)
            n = patches.shape[0]
            tokens += [self.ids.start_of_image] + [-1] * n + [self.ids.end_of_image]
            positions += [p] * (n + 2)
            blocks += [0] * (n + 2)
            slots += [False] + [True] * n + [False]
            p += 1
            text = [self.ids.bos] + encode_text(self.tokenizer, self.question_format.format(question=question))
            text += [self.ids.eos, self.ids.bos]
            tokens += text
            positions += list(range(p, p + len(text)))
            blocks += [-1] * len(text)
            slots += [False] * len(text)
            rows.append((tokens, positions, blocks, slots))
        L = max(len(r[0]) for r in rows)
        B = len(rows)
        ids = torch.full((B, L), self.ids.pad, dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        positions = torch.zeros((B, L), dtype=torch.long)
        blocks = torch.full((B, L), -1, dtype=torch.long)
        slots = torch.zeros((B, L), dtype=torch.bool)
        for i, (tok, pos, blk, slt) in enumerate(rows):
            s = L - len(tok)
            ids[i, s:] = torch.tensor(tok)
            valid[i, s:] = True
            positions[i, s:] = torch.tensor(pos)
            blocks[i, s:] = torch.tensor(blk)
            slots[i, s:] = torch.tensor(slt)
        P = max(v[0].shape[0] for v in vit)
        dim = vit[0][0].shape[1]
        patches = torch.zeros((B, P, dim))
        vit_pos = torch.zeros((B, P), dtype=torch.long)
        vit_valid = torch.zeros((B, P), dtype=torch.bool)
        for i, (pt, ps) in enumerate(vit):
            patches[i, : pt.shape[0]] = pt
            vit_pos[i, : ps.shape[0]] = ps
            vit_valid[i, : pt.shape[0]] = True
        d = self.device
        return dict(ids=ids.to(d), valid=valid.to(d), positions=positions.to(d), block_id=blocks.to(d),
                    vit_slots=slots.to(d), vit_patches=patches.to(d), vit_position_ids=vit_pos.to(d),
                    vit_valid=vit_valid.to(d))

    @torch.no_grad()
    def understanding_logits(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        """Next-token logits `[N, V]` after each (image, question) pair (float32, CPU)."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions.")
        out = []
        for start in range(0, len(images), self.understanding_batch_size):
            sl = slice(start, start + self.understanding_batch_size)
            batch = self._understanding_batch(images[sl], questions[sl])
            out.append(self._call("understand", **batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.config.llm_config.vocab_size)

    @torch.no_grad()
    def yes_probability(self, images, questions) -> torch.Tensor:
        if len(images) != len(questions):
            raise ValueError(f"yes_probability got {len(images)} images but {len(questions)} questions.")
        if not self._yes_ids or not self._no_ids:
            raise ValueError("The tokenizer has no single-token 'yes'/'no'; the logits judge cannot be used.")
        logits = self.understanding_logits(images, questions)
        if len(logits) == 0:
            return torch.zeros(0)
        yes = torch.logsumexp(logits[:, self._yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self._no_ids], dim=-1)
        return torch.sigmoid(yes - no)

    @torch.no_grad()
    def answer(self, images, questions, max_new_tokens: int = 128, temperature: float = 0.0) -> list[str]:
        """Free-text answers (greedy at temperature 0), decoded with a KV cache until `<|im_end|>`."""
        if len(images) != len(questions):
            raise ValueError(f"answer got {len(images)} images but {len(questions)} questions.")
        answers = []
        for start in range(0, len(images), self.understanding_batch_size):
            sl = slice(start, start + self.understanding_batch_size)
            answers.extend(self._answer_batch(images[sl], questions[sl], max_new_tokens, temperature))
        return answers

    def _answer_batch(self, images, questions, max_new_tokens, temperature):
        batch = self._understanding_batch(images, questions)
        logits, cache = self._call("understand", use_cache=True, **batch)
        cache_valid = batch["valid"]
        next_pos = batch["positions"][:, -1] + 1
        B = cache_valid.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        out = []
        for step in range(max_new_tokens):
            logits = logits.float()
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, self.ids.eos), token)
            out.append(token)
            done = done | (token == self.ids.eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, cache = self._call("lm_step", ids=token[:, None], positions=next_pos[:, None], cache=cache,
                                       cache_valid=cache_valid)
            cache_valid = torch.cat([cache_valid, torch.ones(B, 1, dtype=torch.bool, device=self.device)], 1)
            next_pos = next_pos + 1
        tokens = torch.stack(out, 1).cpu().tolist() if out else [[] for _ in range(B)]
        texts = []
        for row in tokens:
            if self.ids.eos in row:
                row = row[: row.index(self.ids.eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    # --------------------------------------------------------------------------------------------- adapters
    def default_lora_targets(self) -> str:
        """The generation expert (`lora_targets("gen")`): SRUM trains generation; the judge's path is untouched."""
        from .training import lora_targets

        return lora_targets("gen")

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, path: str) -> None:
        """An official BAGEL folder (configs, `ema.safetensors`, `ae.safetensors`, tokenizer) for a plain model,
        with this backend's settings in `generation_config.json`; the adapter (+ tokenizer) for a PEFT model (load it
        with `load_backend(base, adapter=path)`)."""
        import os

        from .loading import write_generation_config
        from .vae import save_vae

        os.makedirs(path, exist_ok=True)
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(path)
        else:
            self.core.save_pretrained(path)
            if not os.path.isfile(os.path.join(path, "ae.safetensors")):
                save_vae(self.vae, os.path.join(path, "ae.safetensors"), self.config.vae_config)
            write_generation_config(path, self)
        self.tokenizer.save_pretrained(path)
