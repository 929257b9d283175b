"""Janus / Janus-Pro through transformers' `JanusForConditionalGeneration`: discrete VQ image tokens, generated
autoregressively with classifier-free guidance (CFG).

transformers' Janus `forward` scores text only. Image-token scores go: image-token ids ->
`prepare_embeddings_for_image_generation` -> the language model -> `generation_head`, which is what
[`JanusBackend.image_logits`] does, both when sampling and when computing losses, so that the loss scores exactly
the distribution that sampled the tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache

from .._compat import cache_kwarg
from ..base import GenerationConfig, PixelViews, Rollout, UMMBackend
from .understanding import JanusInputBuilder, to_device


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `JanusForConditionalGeneration` under PEFT / compile wrappers (LoRA layers stay injected in it)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


class JanusBackend(UMMBackend):
    """[`UMMBackend`] for Janus-family checkpoints.

    Args:
        model: a `JanusForConditionalGeneration` (optionally wrapped by PEFT).
        processor: its `JanusProcessor`.
        question_format: how a question about an image is written for the understanding side; `{image}` is replaced by
            the processor's image placeholder and `{question}` by the question. `None` uses the processor's chat
            template when it has one, else `"{image}{question}"`.
        generation_format: how a prompt is written for image generation (`{prompt}`); `None` uses the chat
            template when there is one, else the bare prompt. The processor appends the begin-of-image token.
        understanding_batch_size: images per forward pass of [`yes_probability`] and [`answer`].
        decode_path: how [`generate`] decodes image tokens: "reference" (default, `_sample`: DynamicCache, CPU
            sampling) or "fast" (`fast.FastJanusSampler`: static K/V buffers; on CUDA, compiled step pieces, CUDA
            graphs and on-device sampling; on the CPU the same tokens as "reference" for a seed). See docs/speed.md.
        keep_fast_decoder: with `decode_path="fast"`, keep the decoder (its K/V buffers and CUDA graphs) between
            [`generate`] calls instead of building it at every call: a training round then skips the graph capture
            (several seconds at 1B), at the price of holding the K/V buffers between calls (about 16 GB at
            Janus-Pro-1B dimensions, 64 prompts with CFG). The decoder is rebuilt whenever the parameters move
            (new storage, dtype or device), PEFT adapters are switched on or off, or autocast changes.

    Attributes:
        fast_understanding_inputs: build the inputs of [`yes_probability`] and [`answer`] with the batched path of
            [`JanusInputBuilder`] (default True; it is checked against the processor on first use and falls back to
            it where it differs). False always uses the processor. Settable on the class or on one backend.
        rollout_pixels: [`generate`] also returns the decoded images as `Rollout.pixels`, a uint8 `[B, H, W, 3]`
            tensor on the model's device (default True; 0.44 MB per 384 px image), which the judge reads instead of
            the PIL images (no host work per image). False leaves `Rollout.pixels` None.
        compile_understanding: run the forward of [`yes_probability`] through `torch.compile` (False by default):
            True for `torch.compile(model, dynamic=True)`, or a dict of `torch.compile` keyword arguments. The
            first calls pay the compilation (tens of seconds on a GPU); a new chunk shape or a switch of LoRA
            adapters on/off may compile again. Only the judge's calls are compiled; generation and training run the
            model as it is. Settable on the class or on one backend.
        compile_decode: with `decode_path="fast"`, run the fixed-shape pieces of a decode step (norms, projections,
            rotary embedding, MLP, generation head, sampling: everything but the attention) through `torch.compile`:
            "auto" (default: when the model is on CUDA), True, False, or a dict of `torch.compile` keyword arguments.
            About 1.3x to 1.6x faster rollouts on a GPU (docs/speed.md); the first `generate` call of the process
            pays the compilation (5 to 10 s). Settable on the class or on one backend.
        merge_adapters_for_decode: with `decode_path="fast"`, the decode steps run each PEFT LoRA projection as one
            linear layer with the active adapters merged into a copy of its base weight, merged again at every
            [`generate`] call (default True): rollouts during LoRA training then cost what they cost without an
            adapter, for the memory of the adapted weights while the decoder lives. False runs PEFT's layers.
            Settable on the class or on one backend.
        fuse_projections_for_decode: with `decode_path="fast"` and merged adapters, run each layer's q/k/v and
            gate/up projections as one linear layer each over copies of their weights: "auto" (default) when every
            projection of the group carries a LoRA adapter (the copies exist anyway), True always (a copy of about
            75% of the decoder weights without adapters), False never. Settable on the class or on one backend.
        accepts_pixel_views: [`yes_probability`] and [`answer`] take a [`PixelViews`] (rows as views, whole or
            cropped, of images on the device) in place of a list of PIL images (True for this backend).
    """

    token_kind = "discrete"
    fast_understanding_inputs = True
    rollout_pixels = True
    accepts_pixel_views = True
    compile_understanding: bool | dict = False
    compile_decode: bool | dict | str = "auto"
    merge_adapters_for_decode = True
    fuse_projections_for_decode: bool | str = "auto"

    def __init__(
        self,
        model,
        processor,
        question_format: str | None = None,
        generation_format: str | None = None,
        understanding_batch_size: int = 32,
        decode_path: str = "reference",
        keep_fast_decoder: bool = False,
    ):
        super().__init__(model, processor)
        self.keep_fast_decoder = keep_fast_decoder
        self._fast_sampler, self._fast_sampler_key = None, None
        if decode_path not in ("reference", "fast"):
            raise ValueError(f"decode_path must be 'reference' or 'fast', got {decode_path!r}.")
        self.decode_path = decode_path
        self.question_format = question_format
        self.generation_format = generation_format
        self.understanding_batch_size = understanding_batch_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # prompts end right before the image / the answer: pad on the left
        if tokenizer.pad_token_id is None:
            raise ValueError("The Janus tokenizer has no pad token; set `tokenizer.pad_token` before training.")
        self._yes_ids = self._answer_token_ids(("yes", "Yes", " yes", " Yes"))
        self._no_ids = self._answer_token_ids(("no", "No", " no", " No"))

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def core(self):
        return _unwrap(self.model)

    @property
    def config(self):
        return self.core.config

    @property
    def image_size(self) -> int:
        grid = self.token_grid[0]
        downsample = 2 ** (len(self.config.vq_config.channel_multiplier) - 1)
        return grid * downsample

    @property
    def token_grid(self) -> tuple[int, int]:
        n = self.config.vq_config.num_patches
        return (n, n)

    def default_generation_config(self) -> GenerationConfig:
        """The guidance scale and temperature of the checkpoint's `generation_config.json` (transformers'
        `guidance_scale`, `temperature`), else the library's defaults (CFG 5)."""
        stored = getattr(self.core, "generation_config", None)
        defaults = GenerationConfig()
        guidance = getattr(stored, "guidance_scale", None)
        temperature = getattr(stored, "temperature", None)
        return GenerationConfig(guidance=float(guidance) if guidance else defaults.guidance,
                                temperature=float(temperature) if temperature else defaults.temperature)

    @property
    def num_image_tokens(self) -> int:
        h, w = self.token_grid
        return h * w

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.text_config.max_position_embeddings - self.num_image_tokens

    def _answer_token_ids(self, words) -> list[int]:
        tokenizer = self.processor.tokenizer
        ids = set()
        for word in words:
            enc = tokenizer.encode(word, add_special_tokens=False)
            if len(enc) == 1 and enc[0] != tokenizer.unk_token_id:
                ids.add(enc[0])
        return sorted(ids)

    def _has_chat_template(self) -> bool:
        return getattr(self.processor, "chat_template", None) is not None

    def format_generation_prompt(self, prompt: str) -> str:
        """The text that precedes the begin-of-image token when generating an image for `prompt`."""
        if self.generation_format is not None:
            return self.generation_format.format(prompt=prompt)
        if self._has_chat_template():
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return prompt

    def format_question(self, question: str) -> str:
        """The text (with one image placeholder) after which the next token answers `question`."""
        image_token = self.processor.image_token
        if self.question_format is not None:
            return self.question_format.format(image=image_token, question=question)
        if self._has_chat_template():
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            ]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{image_token}{question}"

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask of the generation prompts (ending with begin-of-image)."""
        texts = [self.format_generation_prompt(p) for p in prompts]
        enc = self.processor(text=texts, generation_mode="image", return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        texts = [self.format_generation_prompt(p) for p in prompts]
        enc = self.processor(text=texts, generation_mode="image", padding=False, return_tensors=None)
        return [len(ids) for ids in enc["input_ids"]]

    def question_lengths(self, questions: list[str]) -> list[int]:
        texts = [self.format_question(q) for q in questions]
        fast = self.input_builder.fast_text(texts)
        if fast is not None:
            return fast[1].sum(dim=1).tolist()
        blank = Image.new("RGB", (self.image_size, self.image_size))
        enc = self.processor(text=texts, images=[blank] * len(texts), padding=False, return_tensors=None)
        return [len(ids) for ids in enc["input_ids"]]

    @property
    def max_context_tokens(self) -> int:
        return self.config.text_config.max_position_embeddings

    def unconditional_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt with its text dropped, as Janus builds it: every token except BOS and begin-of-image -> pad."""
        tokenizer = self.processor.tokenizer
        boi = tokenizer.convert_tokens_to_ids(self.processor.image_start_token)
        keep = input_ids == boi
        if tokenizer.bos_token_id is not None:
            keep |= input_ids == tokenizer.bos_token_id
        return torch.where(keep, input_ids, torch.full_like(input_ids, tokenizer.pad_token_id))

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    # --------------------------------------------------------------------------------------------- generation
    def image_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced next-image-token logits `[B, T, V]` for every position of `image_tokens` `[B, T]`.

        Inside [`using`] with a DDP / FSDP wrapper, the computation runs as the wrapper's forward (the wrapped
        Janus model's `forward` is swapped for it during the call) so that gradients are synchronised.
        """
        runner = getattr(self, "_runner", None)
        if runner is None or runner is self.model:
            return self._image_logits(input_ids, attention_mask, image_tokens)
        core = self.core
        own = vars(core).get("forward")  # an instance-level forward (accelerate's mixed-precision wrapper) stays
        core.forward = lambda *args, **kwargs: self._image_logits(**kwargs)
        try:
            return runner(input_ids=input_ids, attention_mask=attention_mask, image_tokens=image_tokens)
        finally:
            if own is not None:
                core.forward = own
            else:
                del core.forward  # back to the class's forward

    def _image_logits(self, input_ids, attention_mask, image_tokens):
        core = self.core
        text_embeds = core.get_input_embeddings()(input_ids)
        image_embeds = core.prepare_embeddings_for_image_generation(image_tokens[:, :-1])
        embeds = torch.cat([text_embeds, image_embeds.to(text_embeds.dtype)], dim=1)
        ones = attention_mask.new_ones(image_tokens.shape[0], image_tokens.shape[1] - 1)
        mask = torch.cat([attention_mask, ones], dim=1)
        hidden = core.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(mask), use_cache=False
        ).last_hidden_state
        hidden = hidden[:, input_ids.shape[1] - 1 :]
        return core.model.generation_head(hidden)

    @torch.no_grad()
    def generate(
        self, prompts: list[str], config: GenerationConfig | None = None, seed: int | None = None, progress=False
    ) -> Rollout:
        config = config or GenerationConfig()
        self.check_prompts(prompts)
        sample = self._sample
        if self.decode_path == "fast":  # static-cache decoder (srum_trl/models/janus/fast.py)
            sample = self._fast_sampler_for_call()
        batches = self._sample_batches(prompts, config.batch_size, seed, lambda batch, g: sample(batch, config, g),
                                       progress)
        tokens, margins, logprobs = zip(*batches)
        tokens = torch.cat(tokens)
        pixels = self.decode_pixels(tokens)
        return Rollout(
            prompts=list(prompts),
            images=self.pixels_to_images(pixels),
            pixels=pixels if self.rollout_pixels else None,
            tokens=tokens.cpu(),
            grid=self.token_grid,
            guidance=config.guidance,
            temperature=config.temperature,
            seed=seed,
            guidance_margin=torch.cat(margins).cpu(),
            logprobs=torch.cat(logprobs).cpu(),
        )

    def _fast_sampler_for_call(self):
        """A fresh `FastJanusSampler`, or (with `keep_fast_decoder`) the kept one while nothing it captured changed."""
        if not self.keep_fast_decoder:
            self._fast_sampler, self._fast_sampler_key = None, None
            return self._new_fast_sampler()
        key = self._fast_decoder_key()
        if self._fast_sampler is None or key != self._fast_sampler_key:
            self._fast_sampler = None  # free the old buffers and graphs first
            self._fast_sampler = self._new_fast_sampler()
            self._fast_sampler_key = key
        self._fast_sampler.new_call()
        return self._fast_sampler

    def _new_fast_sampler(self):
        from .fast import FastJanusSampler

        return FastJanusSampler(self, compile=self.compile_decode, merge_adapters=self.merge_adapters_for_decode,
                                fuse_projections=self.fuse_projections_for_decode)

    def _fast_decoder_key(self) -> tuple:
        """What a captured decode step depends on besides its buffers: the parameters' storage, the PEFT adapters'
        on/off state, the autocast state and the `*_decode` attributes."""
        params = tuple((p.data_ptr(), p.dtype, p.device) for p in self.model.parameters())
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:  # no PEFT: no adapter layers
            BaseTunerLayer = ()
        adapters = tuple(
            (bool(m.disable_adapters), tuple(m.active_adapters))
            for m in self.model.modules()
            if isinstance(m, BaseTunerLayer)
        )
        try:
            autocast = torch.is_autocast_enabled(self.device.type), torch.get_autocast_dtype(self.device.type)
        except (AttributeError, RuntimeError, TypeError):  # older torch: no per-device query
            autocast = torch.is_autocast_enabled(), None
        return (params, adapters, autocast, repr(self.compile_decode), self.merge_adapters_for_decode,
                self.fuse_projections_for_decode)

    def _sample(self, prompts, config: GenerationConfig, generator: torch.Generator):
        core = self.core
        lm = core.model.language_model
        ids, mask = self.tokenize_prompts(prompts)
        batch = ids.shape[0]
        guided = config.guidance != 1.0
        if guided:
            ids = torch.cat([ids, self.unconditional_ids(ids)])
            mask = torch.cat([mask, mask])
        cache = {cache_kwarg(lm): DynamicCache(config=core.config.text_config)}
        embeds = core.get_input_embeddings()(ids)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(mask), use_cache=True,
                 **cache)
        position = self._positions(mask)[:, -1:]
        tokens = torch.empty(batch, self.num_image_tokens, dtype=torch.long, device=ids.device)
        margin = torch.zeros(batch, device=ids.device)
        logprobs = torch.empty(batch, self.num_image_tokens, device=ids.device)
        for i in range(self.num_image_tokens):
            logits = core.model.generation_head(out.last_hidden_state[:, -1]).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + config.guidance * (cond - uncond)
            scores = logits / config.temperature
            if config.top_k is not None:
                kth = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(ids.device)
            tokens[:, i] = token
            logprobs[:, i] = torch.log_softmax(logits / config.temperature, -1).gather(-1, token[:, None]).squeeze(-1)
            if guided:
                lp_c = torch.log_softmax(cond, -1).gather(-1, token[:, None]).squeeze(-1)
                lp_u = torch.log_softmax(uncond, -1).gather(-1, token[:, None]).squeeze(-1)
                margin += lp_c - lp_u
            if i == self.num_image_tokens - 1:
                break
            step = token.repeat(2) if guided else token
            embeds = core.prepare_embeddings_for_image_generation(step[:, None])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position, use_cache=True, **cache)
        margin = margin / self.num_image_tokens if guided else torch.full_like(margin, math.nan)
        return tokens, margin, logprobs

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        return self.pixels_to_images(self.decode_pixels(tokens))

    @torch.no_grad()
    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """The VQ decode of image tokens `[B, h*w]` as uint8 RGB pixels `[B, H, W, 3]` on the model's device (what
        [`decode`] turns into PIL images), decoded 64 images at a time."""
        size = self.image_size
        out = None
        for start, chunk in zip(range(0, tokens.shape[0], 64), tokens.split(64)):
            pixels = self.core.decode_image_tokens(chunk.to(self.device)).float()
            if out is None:  # one uint8 buffer for all images, filled chunk by chunk
                out = torch.empty((tokens.shape[0], *pixels.shape[1:]), dtype=torch.uint8, device=pixels.device)
            out[start : start + chunk.shape[0]] = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if out is None:
            out = torch.empty((0, size, size, 3), dtype=torch.uint8, device=self.device)
        return out

    @staticmethod
    def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
        """uint8 `[B, H, W, 3]` (any device) -> PIL RGB images, with one copy to the host."""
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels.cpu().numpy()]

    # ------------------------------------------------------------------------------------------ understanding
    @property
    def input_builder(self) -> JanusInputBuilder:
        """Builds the inputs of [`yes_probability`] and [`answer`] (see `understanding.py`); one per backend object,
        so that a copy of the backend gets its own first-use checks."""
        builder = self.__dict__.get("_input_builder")
        if builder is None or builder.backend is not self:
            builder = self.__dict__["_input_builder"] = JanusInputBuilder(self)
        return builder

    def _understanding_inputs(self, images, questions):
        """`input_ids`, `attention_mask` and `pixel_values` on the device for one batch of (image, question) rows,
        equal to the processor's output: [`JanusInputBuilder.build`] on the formatted questions (each distinct
        question formatted once). `images`: PIL images or a [`PixelViews`]."""
        formatted = {q: self.format_question(q) for q in dict.fromkeys(questions)}
        texts = [formatted[q] for q in questions]
        return self.input_builder.build(images, texts, fast=self.fast_understanding_inputs)

    def _views_on_device(self, images):
        """A [`PixelViews`] moved to the model's device once per call (not once per chunk); PIL lists unchanged."""
        return images.to(self.device) if isinstance(images, PixelViews) else images

    @torch.no_grad()
    def yes_probability(self, images: list[Image.Image] | PixelViews, questions: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) of the next answer token per (image, question) row, `[N]` on the CPU.
        `images`: PIL images, or a [`PixelViews`] of images already on the device (e.g. `Rollout.pixels` with crop
        boxes): the same values, without host work per image."""
        if len(images) != len(questions):
            raise ValueError(f"yes_probability got {len(images)} images but {len(questions)} questions.")
        if not self._yes_ids or not self._no_ids:
            raise ValueError("The tokenizer has no single-token 'yes'/'no'; the logits judge cannot be used.")
        images = self._views_on_device(images)
        forward = self._understanding_forward()
        out = []
        # on the device once: indexing with a Python list would copy it there (and wait) at every chunk
        yes_ids, no_ids = (to_device(torch.tensor(ids), self.device) for ids in (self._yes_ids, self._no_ids))
        for start in range(0, len(images), self.understanding_batch_size):
            sl = slice(start, start + self.understanding_batch_size)
            enc = self._understanding_inputs(images[sl], questions[sl])
            logits = forward(**enc, logits_to_keep=1, use_cache=False).logits[:, -1].float()
            yes = torch.logsumexp(logits.index_select(-1, yes_ids), dim=-1)
            no = torch.logsumexp(logits.index_select(-1, no_ids), dim=-1)
            out.append(torch.sigmoid(yes - no))  # stays on the device: one copy to the host at the end
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def _understanding_forward(self):
        """The model's forward for [`yes_probability`]: the model itself, or its `torch.compile` wrapper (kept per
        model object) when `compile_understanding` is set."""
        if not self.compile_understanding:
            return self.core
        kwargs = self.compile_understanding if isinstance(self.compile_understanding, dict) else {"dynamic": True}
        key = (id(self.core), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        cached = self.__dict__.get("_compiled_forward")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_compiled_forward"] = (key, torch.compile(self.core, **kwargs))
        return cached[1]

    @torch.no_grad()
    def answer(self, images, questions, max_new_tokens: int = 128, temperature: float = 0.0) -> list[str]:
        """Free-text answers per (image, question) row; `images` as in [`yes_probability`]."""
        if len(images) != len(questions):
            raise ValueError(f"answer got {len(images)} images but {len(questions)} questions.")
        images = self._views_on_device(images)
        tokenizer = self.processor.tokenizer
        answers = []
        for start in range(0, len(images), self.understanding_batch_size):
            sl = slice(start, start + self.understanding_batch_size)
            enc = self._understanding_inputs(images[sl], questions[sl])
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = self.core.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
            new = out[:, enc["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        return answers

    # ---------------------------------------------------------------------------------------------- training
    def _policy_logits(self, prompts, rollout: Rollout, loss_guidance: str, text_dropout: float, generator=None):
        ids, mask = self.tokenize_prompts(prompts)
        tokens = rollout.tokens.to(ids.device)
        if loss_guidance == "guided" and rollout.guidance != 1.0:
            both = torch.cat([ids, self.unconditional_ids(ids)])
            logits = self.image_logits(both, torch.cat([mask, mask]), torch.cat([tokens, tokens])).float()
            cond, uncond = logits.chunk(2)
            logits = uncond + rollout.guidance * (cond - uncond)
        elif loss_guidance in ("guided", "conditional"):
            if text_dropout > 0:
                if generator is None:
                    drop = torch.rand(ids.shape[0], device=ids.device) < text_dropout
                else:
                    drop = (torch.rand(ids.shape[0], generator=generator) < text_dropout).to(ids.device)
                ids = torch.where(drop[:, None], self.unconditional_ids(ids), ids)
            logits = self.image_logits(ids, mask, tokens).float()
        else:
            raise ValueError(f"loss_guidance must be 'guided' or 'conditional', got {loss_guidance!r}.")
        return logits / rollout.temperature, tokens

    def token_losses(self, prompts, rollout, loss_guidance="guided", text_dropout=0.0, *, generator=None):
        logits, tokens = self._policy_logits(prompts, rollout, loss_guidance, text_dropout, generator)
        return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")

    def token_logprobs(self, prompts, rollout):
        logits, tokens = self._policy_logits(prompts, rollout, "guided", 0.0)
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)

    @torch.no_grad()
    def guidance_margin(self, prompts: list[str], rollout: Rollout) -> torch.Tensor:
        """Per image, the mean of log p_cond - log p_uncond over its tokens, recomputed under the current model."""
        ids, mask = self.tokenize_prompts(prompts)
        tokens = rollout.tokens.to(ids.device)
        both = torch.cat([ids, self.unconditional_ids(ids)])
        logp = torch.log_softmax(self.image_logits(both, torch.cat([mask, mask]), torch.cat([tokens, tokens])).float(), -1)
        logp = logp.gather(-1, torch.cat([tokens, tokens])[..., None]).squeeze(-1)
        cond, uncond = logp.chunk(2)
        return (cond - uncond).mean(-1).cpu()

    # --------------------------------------------------------------------------------------------- adapters
    def default_lora_targets(self) -> str:
        """A PEFT `target_modules` regex selecting the language model's attention and MLP projections."""
        return r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
