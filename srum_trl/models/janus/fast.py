"""A fast image-token decoder for [`JanusBackend`] (`decode_path="fast"`), equivalent to the reference sampler.

The reference sampler (`JanusBackend._sample`) grows a `DynamicCache` by concatenation, rebuilds the attention mask
and the position ids every token, runs the whole `LlamaModel.forward` (mask construction, output-capturing hooks,
...) and moves the probabilities to the CPU to sample. On a GPU its time is dominated by host work, not by the
memory traffic that a decode step really needs. This module decodes the same tokens with:

* one preallocated K/V buffer per layer, `[2, rows, kv_heads, length, head_dim]`, sized once for the cond + uncond
  rows (2B with guidance, B without) and `prompt + image tokens`, written in place with `index_copy_` at a
  cache-position tensor ([`StaticKVCache`]);
* a fixed-size additive attention mask `[rows, 1, 1, length]` that each step unmasks in place (`index_fill_`);
* position ids and cache positions computed on the device from one step counter (no host arithmetic);
* a per-token step made of two functions over fixed shapes: `forward` (image-token embedding -> decoder layers
  -> generation head -> logits in a static buffer) and, with device sampling, `sample` (CFG, temperature, top-k,
  exponential-race (Gumbel-max) sampling with noise drawn from a device generator, bookkeeping). Both only read and
  write static buffers and are idempotent for a given step counter, so on CUDA each is captured once in a
  `torch.cuda.CUDAGraph` and replayed; on the CPU they run eagerly.
* attention over a length bucket: step `i` attends to the first `round_up(prompt + i, bucket)` cache slots (a
  view of the static buffer), so the K/V bytes read grow with the sequence instead of always being the full length;
  one graph per bucket.
* the decoder layers run piece by piece between the attentions (`decode_step.py`): on CUDA the
  pieces go through `torch.compile` (compiled once per process, shared by all layers), PEFT LoRA projections run as
  copies of their weights with the adapters merged in, and q/k/v and gate/up can be fused into one matmul each
  ([`_DecodeWeights`]).

Sampling modes: `"host"` reproduces the reference's random-number use exactly (a CPU `torch.Generator`,
`torch.multinomial(probs.cpu(), 1)` per step), so that with the same seed the tokens equal the reference's (up to
float rounding of the probabilities: the attention reductions run over masked slots in a different order). It
synchronises with the host every token. `"device"` never synchronises: the noise of an exponential race comes from a
device generator seeded from the CPU generator, so runs are reproducible for a seed but draw other tokens than the
reference. `"auto"` (default) is host on the CPU and device on CUDA.

Graphs and buffers live as long as one [`FastJanusSampler`], i.e. one `JanusBackend.generate` call (unless the
backend keeps it): they are rebuilt when the batch shape changes and released afterwards, so they never hold memory
during training and never replay a stale adapter state (a PEFT adapter disabled or enabled between calls changes the
captured kernels; merged weight copies are written again at every call).
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers.models.llama.modeling_llama import repeat_kv

from .decode_step import _STEP_FUNCTIONS, _check_llama_layers, _decode_layers, _step_functions, _token_scores
from .decode_step import guided_scores
from ...warn import SRUMTrlWarning
from .._compat import cache_kwarg

__all__ = ["FastJanusDecoder", "FastJanusSampler", "StaticKVCache", "guided_scores"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class StaticKVCache:
    """Preallocated keys and values of every decoder layer, written in place.

    One buffer per layer, `[2, rows, kv_heads, length, head_dim]` (keys, then values), so that a decode step writes a
    layer's new key and value with one `index_copy_`. The decoder layers of the prefill see it as their
    K/V cache: `update(k, v, layer_idx)` copies the new states into the slots named by `write_index` (a
    device tensor of cache positions) and returns views of the first `kv_len` slots. The buffers are allocated once
    and never replaced, so their addresses stay fixed (CUDA-graph safe).
    """

    is_compileable = True

    def __init__(self, num_layers, rows, kv_heads, length, head_dim, dtype, device):
        shape = (2, rows, kv_heads, length, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keys = [kv[0] for kv in self.kv]
        self.values = [kv[1] for kv in self.kv]
        self.max_length = length
        self.write_index: torch.Tensor | None = None
        self.kv_len = length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_index, key_states)
        values.index_copy_(2, self.write_index, value_states)
        return keys[:, :, : self.kv_len], values[:, :, : self.kv_len]

    def data_ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self.kv]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


class _GraphRunner:
    """Runs an idempotent function over static buffers: eagerly, or on CUDA captured once per key and replayed."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.graphs: dict = {}
        self.captures = 0
        self._pool = None

    def __call__(self, key, fn) -> None:
        if not self.enabled:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(fn)
            if graph is None:  # capture failed: eager from now on (the warm-up already ran fn)
                fn()
                return
            self.graphs[key] = graph
        graph.replay()

    def _capture(self, fn):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the capture (lazy cuBLAS / allocator work); fn is idempotent
            fn()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls of other threads (pin-memory threads of data loaders) do not void the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                fn()
        except Exception as error:  # noqa: BLE001 - fall back rather than fail a rollout
            warnings.warn(f"CUDA graph capture failed ({error!r}); the fast Janus decoder continues eagerly.",
                          SRUMTrlWarning)
            self.enabled = False
            torch.cuda.synchronize(self.device)
            return None
        self.captures += 1
        return graph


class FastJanusDecoder:
    """Static-shape decoder of one batch shape: `batch` prompts (left-padded to `prompt_len` tokens), with or
    without their unconditional rows. Reusable for any batch of the same shape (call [`run`] again).

    Args:
        backend: the [`JanusBackend`].
        batch: prompts per batch (B).
        prompt_len: prompt tokens per row after left padding (the cache slots before the image).
        guided: whether rows are cond + uncond (2B rows) or cond only (B rows).
        bucket: attention-length granularity of the decode steps (one CUDA graph per bucket).
        cuda_graphs: capture the step functions in CUDA graphs when the model is on CUDA.
        compile: run the fixed-shape pieces of a decode step (everything but the attention) and the device sampling
            through `torch.compile`: "auto" (default: on CUDA only), True, False, or a dict of `torch.compile`
            keyword arguments. Compiled once per process and reused by every layer and by later decoders; the first
            call pays the compilation (5 to 10 s on a GPU). If compiling fails, the decoder warns and runs them
            uncompiled.
        merge_adapters: run each PEFT LoRA projection of the decode step as one linear layer with its active
            adapters merged into a copy of the base weight (merged again at every [`run`], so a kept decoder follows
            the adapters' training), instead of the base matmul plus the adapter's two (default True). Costs the
            memory of the adapted base weights while the decoder lives. Adapters that are off, or already merged,
            run as the base layer; DoRA and other LoRA variants keep PEFT's forward. The prefill always runs
            PEFT's layers.
        fuse_projections: with `merge_adapters`, run each layer's q/k/v projections as one linear layer, and its
            gate/up projections as one, over copies of their weights (adapters merged): fewer, larger matmuls.
            "auto" (default) fuses a group only when every projection in it has adapters to merge (its copy is
            made anyway, so fusing costs no memory); True fuses plain projections too (a copy of their weights,
            e.g. about 75% of the decoder weights without adapters); False never fuses.
    """

    def __init__(self, backend, batch: int, prompt_len: int, guided: bool, bucket: int = 64, cuda_graphs: bool = True,
                 compile: bool | dict | str = "auto", merge_adapters: bool = True, fuse_projections: bool | str = "auto"):
        core = backend.core
        lm = core.model.language_model
        config = lm.config
        attn = getattr(config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            raise ValueError(
                f"The fast Janus decoder needs the language model's attention to be 'sdpa' or 'eager' (it passes an "
                f"additive 4D mask); got {attn!r}. Load the model with attn_implementation='sdpa' or use "
                f"decode_path='reference'."
            )
        self.core, self.lm = core, lm
        self.layers = list(lm.layers[: config.num_hidden_layers])
        _check_llama_layers(self.layers)
        if fuse_projections not in (True, False, "auto"):
            raise ValueError(f"fuse_projections must be 'auto', True or False; got {fuse_projections!r}.")
        self.step_layers, self.weights = _decode_layers(self.layers, merge_adapters, fuse_projections)
        param = next(lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        if compile == "auto":
            compile = self.device.type == "cuda"
        elif not isinstance(compile, (bool, dict)):
            raise ValueError(f"compile must be 'auto', True, False or a dict of torch.compile options; got {compile!r}.")
        self.compile = compile
        self.fns = _step_functions(compile)
        self.kv_groups = self.layers[0].self_attn.num_key_value_groups
        self.scaling = self.layers[0].self_attn.scaling
        self.batch, self.prompt_len, self.guided = batch, prompt_len, guided
        self.rows = 2 * batch if guided else batch
        self.num_tokens = backend.num_image_tokens
        self.bucket = bucket
        # slots: the prompt, then every image token but the last (it is sampled, never fed back)
        self.length = _round_up(prompt_len + self.num_tokens - 1, bucket)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache = StaticKVCache(len(self.layers), self.rows, kv_heads, self.length, head_dim, self.dtype,
                                   self.device)
        dev = self.device
        self.min_value = torch.finfo(self.dtype).min
        self.mask = torch.full((self.rows, 1, 1, self.length), self.min_value, dtype=self.dtype, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index of the image token being sampled
        self.slot0 = torch.full((1,), prompt_len - 1, dtype=torch.long, device=dev)  # slot of step 1's input - 1
        self.last_pos = torch.zeros(self.rows, dtype=torch.long, device=dev)  # position of each row's last prompt token
        self.token_in = torch.zeros(self.rows, dtype=torch.long, device=dev)  # the token fed at the next forward
        vocab = core.model.generation_head.vision_head.out_features
        self.logits = torch.zeros(self.rows, vocab, dtype=torch.float32, device=dev)
        self.noise = torch.ones(batch, vocab, dtype=torch.float32, device=dev)
        self.tokens = torch.zeros(batch, self.num_tokens, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(batch, self.num_tokens, dtype=torch.float32, device=dev)
        self.margins = torch.zeros(batch, self.num_tokens, dtype=torch.float32, device=dev)
        self.graphs = _GraphRunner(dev, cuda_graphs)

    @property
    def key(self) -> tuple:
        return (self.batch, self.prompt_len, self.guided)

    def kv_len(self, step: int) -> int:
        """Slots attended by the forward of step `step` (>= 1): the prompt and image tokens 0..step-1, rounded up."""
        return min(self.length, _round_up(self.prompt_len + step, self.bucket))

    # ---------------------------------------------------------------------------------------------------- pieces
    def _layers(self, hidden, mask, positions):
        position_embeddings = self.lm.rotary_emb(hidden, positions)
        cache = {cache_kwarg(self.layers[0]): self.cache}
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                           position_embeddings=position_embeddings, **cache)
        return self.lm.norm(hidden)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the prompts (`[rows, prompt_len]`, left-padded, uncond rows included) into the cache, put the first
        image token's logits in `self.logits` and reset the decode mask. Eager, variable shapes (once per batch)."""
        rows, length = ids.shape
        if (rows, length) != (self.rows, self.prompt_len):
            raise ValueError(f"prefill got ids {tuple(ids.shape)}; the decoder holds {(self.rows, self.prompt_len)}.")
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        keep = mask.bool()
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & keep[:, None, :]
        mask4d = torch.zeros(rows, 1, length, length, dtype=self.dtype, device=self.device)
        mask4d.masked_fill_(~allowed[:, None], self.min_value)
        self.cache.write_index = torch.arange(length, device=self.device)
        self.cache.kv_len = length
        hidden = self._layers(self.core.get_input_embeddings()(ids), mask4d, positions)
        self.logits.copy_(self.core.model.generation_head(hidden[:, -1]).float())
        self.last_pos.copy_(positions[:, -1])
        self.mask.fill_(self.min_value)
        self.mask[:, 0, 0, :length].masked_fill_(keep, 0.0)

    def _attend(self, index: int, q, kv, slot, mask, kv_len: int):
        """Write layer `index`'s new key and value at `slot`; attend to the first `kv_len` slots."""
        cache = self.cache.kv[index]
        cache.index_copy_(3, slot, kv)
        keys, values = cache[0, :, :, :kv_len], cache[1, :, :, :kv_len]
        if self.kv_groups > 1:
            keys, values = repeat_kv(keys, self.kv_groups), repeat_kv(values, self.kv_groups)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)

    def forward(self, kv_len: int) -> None:
        """Decode step `self.step` (>= 1): feed `token_in` at its slot and position, logits to `self.logits`.
        Fixed shapes for a given `kv_len`; idempotent (re-running it writes the same values)."""
        fns, layers, model = self.fns, self.step_layers, self.core.model
        slot = self.slot0 + self.step
        self.mask.index_fill_(-1, slot, 0.0)
        mask = self.mask[..., :kv_len]
        positions = (self.last_pos + self.step)[:, None]
        hidden, cos, sin, q, kv = fns["first"](model.generation_embeddings, model.generation_aligner,
                                              self.lm.rotary_emb, layers[0], self.token_in[:, None], positions)
        for i, layer in enumerate(layers[:-1]):
            attn_out = self._attend(i, q, kv, slot, mask, kv_len)
            hidden, q, kv = fns["between"](layer, layers[i + 1], hidden, attn_out, cos, sin)
        attn_out = self._attend(len(layers) - 1, q, kv, slot, mask, kv_len)
        self.logits.copy_(fns["last"](layers[-1], self.lm.norm, model.generation_head, hidden, attn_out))

    def _record(self, token, logprob, margin) -> None:
        """Store token `self.step`, its log-probability `[B, 1]` and guidance margin `[B, 1]` (or None); feed the
        token to the next forward."""
        column = self.step
        self.tokens.index_copy_(1, column, token[:, None])
        self.logprobs.index_copy_(1, column, logprob)
        if margin is not None:
            self.margins.index_copy_(1, column, margin)
        self.token_in.copy_(token.repeat(2) if self.guided else token)

    def sample_on_device(self, guidance: float, temperature: float, top_k: int | None) -> None:
        """Sample token `self.step` from `self.logits` with the exponential race `argmax(p / E)`, `E ~ Exp(1)` in
        `self.noise` (equivalent to sampling from `p`; Gumbel-max). No host synchronisation; idempotent."""
        self._record(*self.fns["draw"](self.logits, self.noise, guidance, temperature, top_k))

    def sample_on_host(self, guidance, temperature, top_k, generator: torch.Generator) -> None:
        """Sample token `self.step` exactly as the reference does (CPU generator, multinomial on CPU probs)."""
        logits, probs, cond, uncond = guided_scores(self.logits, guidance, temperature, top_k)
        token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(self.device)
        self._record(token, *_token_scores(token, logits, cond, uncond, temperature))

    # ------------------------------------------------------------------------------------------------------ loop
    def _run_step(self, key, fn) -> None:
        """`fn` through the graph runner; if compiling the step pieces fails, warn once and go on uncompiled."""
        try:
            self.graphs(key, fn)
        except Exception as error:  # noqa: BLE001 - torch.compile failures vary (no Triton, no compiler, ...)
            if self.fns is _STEP_FUNCTIONS:
                raise
            warnings.warn(f"torch.compile of the fast Janus decode step failed ({error!r}); the decoder continues "
                          f"without compiling it (set compile=False to skip the attempt).", SRUMTrlWarning)
            self.fns = _STEP_FUNCTIONS
            self.graphs(key, fn)

    def run(self, ids, mask, config, generator: torch.Generator, device_generator: torch.Generator | None = None,
            step_callback=None):
        """Decode one batch: `(tokens [B, N], guidance margin [B], logprobs [B, N])`, on the model's device.

        With `device_generator` the tokens are sampled on the device ("device" mode), else with `generator` on the
        host ("host" mode). `step_callback(decoder, i)`, if given, runs after every step (tests)."""
        if (config.guidance != 1.0) != self.guided:
            raise ValueError("the decoder's guided flag does not match config.guidance")
        guidance, temperature, top_k = float(config.guidance), float(config.temperature), config.top_k
        if self.weights is not None:
            self.weights.refresh()
        self.prefill(ids, mask)
        sample_key = ("sample", guidance, temperature, top_k)
        for i in range(self.num_tokens):
            self.step.fill_(i)
            if i > 0:
                kv_len = self.kv_len(i)
                self._run_step(("forward", kv_len), lambda kv_len=kv_len: self.forward(kv_len))
            if device_generator is not None:
                self.noise.exponential_(generator=device_generator)
                self._run_step(sample_key, lambda: self.sample_on_device(guidance, temperature, top_k))
            else:
                self.sample_on_host(guidance, temperature, top_k, generator)
            if step_callback is not None:
                step_callback(self, i)
        tokens, logprobs = self.tokens.clone(), self.logprobs.clone()
        if self.guided:
            margin = self.margins.sum(-1) / self.num_tokens
        else:
            margin = torch.full((self.batch,), math.nan, device=self.device)
        return tokens, margin, logprobs


class FastJanusSampler:
    """Drop-in for `JanusBackend._sample`: `sampler(prompts, config, generator) -> (tokens, margin, logprobs)`.

    Keeps one [`FastJanusDecoder`] and reuses it (buffers and CUDA graphs) for every batch of the same shape; a batch
    of another shape replaces it. Prompts are left-padded to a multiple of `pad_multiple` tokens so that batches
    of slightly different prompt lengths share a shape (extra left padding is masked: it changes no result).

    Args:
        backend: the [`JanusBackend`].
        sampling: "auto" (host on CPU, device on CUDA), "host" (the reference's CPU random numbers: same tokens as
            the reference for a seed; one host synchronisation per token) or "device" (no synchronisation).
        cuda_graphs: capture the step functions in CUDA graphs on CUDA (eager otherwise).
        bucket: attention-length granularity of decode steps.
        pad_multiple: prompt lengths are rounded up to a multiple of this.
        compile: run the fixed-shape pieces of a decode step and the device sampling through `torch.compile`
            ("auto": on CUDA only; True; False; or a dict of `torch.compile` keyword arguments); see
            [`FastJanusDecoder`].
        merge_adapters: decode with PEFT LoRA adapters merged into copies of the adapted weights (default True);
            see [`FastJanusDecoder`].
        fuse_projections: fuse the q/k/v and gate/up projections of the decode step ("auto", True, False); see
            [`FastJanusDecoder`].
    """

    def __init__(self, backend, sampling: str = "auto", cuda_graphs: bool = True, bucket: int = 64,
                 pad_multiple: int = 32, compile: bool | dict | str = "auto", merge_adapters: bool = True,
                 fuse_projections: bool | str = "auto"):
        if sampling not in ("auto", "host", "device"):
            raise ValueError(f"sampling must be 'auto', 'host' or 'device', got {sampling!r}.")
        self.backend = backend
        self.sampling = sampling
        self.cuda_graphs = cuda_graphs
        self.bucket = bucket
        self.pad_multiple = pad_multiple
        self.compile = compile
        self.merge_adapters = merge_adapters
        self.fuse_projections = fuse_projections
        self.decoder: FastJanusDecoder | None = None
        self.decoders_built = 0
        self._device_generator = None

    def new_call(self) -> None:
        """Start a new `generate` call: the device generator is seeded again from that call's generator, so a kept
        sampler draws, for a seed, the tokens that a fresh one would."""
        self._device_generator = None

    def _mode(self, device: torch.device) -> str:
        if self.sampling == "auto":
            return "host" if device.type == "cpu" else "device"
        return self.sampling

    def _decoder_for(self, batch: int, prompt_len: int, guided: bool) -> FastJanusDecoder:
        if self.decoder is None or self.decoder.key != (batch, prompt_len, guided):
            self.decoder = None  # release the old buffers and graphs before allocating new ones
            self.decoder = FastJanusDecoder(self.backend, batch, prompt_len, guided, bucket=self.bucket,
                                            cuda_graphs=self.cuda_graphs, compile=self.compile,
                                            merge_adapters=self.merge_adapters,
                                            fuse_projections=self.fuse_projections)
            self.decoders_built += 1
        return self.decoder

    @torch.no_grad()
    def __call__(self, prompts, config, generator: torch.Generator, step_callback=None):
        backend = self.backend
        ids, mask = backend.tokenize_prompts(prompts)
        batch, length = ids.shape
        padded = _round_up(length, self.pad_multiple)
        if padded > length:
            pad_id = backend.processor.tokenizer.pad_token_id
            ids = torch.cat([ids.new_full((batch, padded - length), pad_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros(batch, padded - length), mask], dim=1)
        guided = config.guidance != 1.0
        if guided:
            ids = torch.cat([ids, backend.unconditional_ids(ids)])
            mask = torch.cat([mask, mask])
        decoder = self._decoder_for(batch, padded, guided)
        device_generator = None
        if self._mode(decoder.device) == "device":
            if self._device_generator is None:  # seeded once per sampler from the CPU generator: reproducible
                seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
                self._device_generator = torch.Generator(device=decoder.device)
                self._device_generator.manual_seed(seed)
            device_generator = self._device_generator
        return decoder.run(ids, mask, config, generator, device_generator, step_callback=step_callback)
