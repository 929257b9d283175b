"""One image-token decode step of Janus' Llama language model, in pieces, and the weights those pieces read.

[`FastJanusDecoder`](fast.py) feeds one token per row through the decoder layers at every step. The attention over
the K/V cache, whose length grows with the step, runs in the decoder; everything between two attentions has fixed
shapes and is written here as plain functions of the layers' own submodules, so that `torch.compile` can fuse it
(each function is compiled once per process and reused by every layer). [`_DecodeWeights`] lets those pieces read
PEFT LoRA projections as copies of their weights with the adapters merged in, and q/k/v and gate/up fused into one
matmul each.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def guided_scores(logits: torch.Tensor, guidance: float, temperature: float, top_k: int | None):
    """`(guided_logits, probs, cond, uncond)` of the float32 logits `[rows, V]`, with the reference's operations in
    the reference's order: `u + w (c - u)`, `/ temperature`, top-k cut to `-inf`, softmax. Without guidance `cond`
    and `uncond` are `None` and the logits are used as they are."""
    cond = uncond = None
    if guidance != 1.0:
        cond, uncond = logits.chunk(2)
        logits = uncond + guidance * (cond - uncond)
    scores = logits / temperature
    if top_k is not None:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return logits, torch.softmax(scores, dim=-1), cond, uncond


# --------------------------------------------------------------------------------------- one decode step, in pieces
# A decode step feeds one token per row through the Llama decoder layers of Janus' language model. It is written
# here as plain functions of the layers' own submodules (norms, projections, MLP: PEFT/LoRA layers included) so that
# the pieces between two attentions have fixed shapes: the attention itself, whose key length grows with the step,
# runs between them. `FastJanusDecoder(compile=True)` runs the pieces through `torch.compile` (each is compiled once
# and reused by every layer), which fuses the norms, the rotary embedding, the activations and the residual adds.
def _attention_inputs(layer, hidden, cos, sin):
    """Pre-attention of one token per row: `(q [rows, heads, 1, d], kv [2, rows, kv_heads, 1, d])`."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (hidden.shape[0], 1, -1, attn.head_dim)
    if hasattr(attn, "qkv_proj"):  # fused projections (`_DecodeWeights`)
        q, k, v = attn.qkv_proj(x).split(attn.qkv_sizes, dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, torch.stack([k, v])


def _after_attention(layer, hidden, attn_out):
    """Output projection, residual, MLP and residual of one token per row (`attn_out`: `[rows, heads, 1, d]`)."""
    hidden = hidden + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(hidden.shape[0], 1, -1))
    mlp, x = layer.mlp, layer.post_attention_layernorm(hidden)
    if hasattr(mlp, "gate_up_proj"):  # fused projections (`_DecodeWeights`)
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


def _step_first(embeddings, aligner, rotary, layer, token, positions):
    """Image-token embedding of the fed token, rotary tables, and the first layer's attention inputs."""
    hidden = aligner(embeddings(token))
    cos, sin = rotary(hidden, positions)
    q, kv = _attention_inputs(layer, hidden, cos, sin)
    return hidden, cos, sin, q, kv


def _step_between(layer, next_layer, hidden, attn_out, cos, sin):
    """The rest of `layer` after its attention, then the attention inputs of `next_layer`."""
    hidden = _after_attention(layer, hidden, attn_out)
    q, kv = _attention_inputs(next_layer, hidden, cos, sin)
    return hidden, q, kv


def _step_last(layer, norm, head, hidden, attn_out):
    """The rest of the last layer, the final norm and the generation head: float32 logits `[rows, V]`."""
    hidden = norm(_after_attention(layer, hidden, attn_out))
    return head(hidden[:, -1]).float()


def _draw(logits, noise, guidance: float, temperature: float, top_k: int | None):
    """One token per prompt from the float32 logits by the exponential race `argmax(p / E)` (`noise` holds
    `E ~ Exp(1)`): `(token, log-probability, guidance margin or None)`."""
    guided_logits, probs, cond, uncond = guided_scores(logits, guidance, temperature, top_k)
    token = (probs / noise.clamp_min(1e-30)).argmax(-1)
    return (token, *_token_scores(token, guided_logits, cond, uncond, temperature))


def _token_scores(token, guided_logits, cond, uncond, temperature: float):
    """`(log-probability [B, 1], guidance margin [B, 1] or None)` of the drawn tokens: the log-probability under the
    guided, temperature-scaled distribution before top-k; the margin `log p_cond - log p_uncond`."""
    index = token[:, None]
    logprob = torch.log_softmax(guided_logits / temperature, -1).gather(-1, index)
    margin = None
    if cond is not None:
        margin = torch.log_softmax(cond, -1).gather(-1, index) - torch.log_softmax(uncond, -1).gather(-1, index)
    return logprob, margin


# ---------------------------------------------------------------- the weights a decode step reads: merged LoRA, fused
class _Modules(torch.nn.Module):
    """A decoder layer as the decode step sees it: the same attribute paths (`self_attn.q_proj`, `mlp.up_proj`,
    ...) holding the layer's own norms and activation and, per projection, the module to run; or, fused,
    `self_attn.qkv_proj` (with `qkv_sizes`) and `mlp.gate_up_proj`."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def _weight_source(module):
    """`(base nn.Linear, adapters to merge)` when the decode step can read `module` as a plain weight (a plain
    `nn.Linear`, or a PEFT LoRA layer with vanilla adapters, which merge into it); None when it must run as is
    (DoRA and other LoRA variants, quantized or custom layers)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # no PEFT: no adapter layers
        LoraLinear = ()
    if isinstance(module, LoraLinear):
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or not base.weight.dtype.is_floating_point:
            return None
        if module.disable_adapters or module.merged:
            return base, []
        adapters = [a for a in module.active_adapters if a in module.lora_A.keys()]
        if any(a in module.lora_variant for a in adapters):
            return None
        return base, adapters
    return (module, []) if type(module) is torch.nn.Linear else None


def _linear(in_features: int, weight: torch.Tensor, bias=None) -> torch.nn.Linear:
    linear = torch.nn.Linear(in_features, weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    linear.bias = bias
    return linear


class _DecodeWeights:
    """Weights that the decode step reads instead of the model's projections, written by `refresh()`:

    * a PEFT LoRA projection becomes one linear layer whose weight is a copy of the base weight with the active
      (vanilla) adapters merged in: one matmul instead of three plus the adds;
    * with fusion, the q/k/v projections of a layer become one `[q + k + v, hidden]` linear layer, and gate/up one
      `[2 x intermediate, hidden]` layer (each slice the projection's weight, adapters merged): fewer, larger
      matmuls, which read the weights closer to the memory bandwidth at decoding batch sizes.

    `refresh()` writes every copy again in place (same storage, so captured CUDA graphs read the new values); the
    decoder calls it at every run, so the copies follow the training updates of the adapters. `parts` lists
    `(destination, module, base, adapters)`."""

    def __init__(self, fuse: bool | str):
        self.fuse = fuse
        self.parts: list = []

    def projection(self, module):
        """What the decode step runs for `module`: the module itself, its base layer (no adapter to apply), or a
        merged copy."""
        source = _weight_source(module)
        if source is None:
            return module
        base, adapters = source
        if not adapters:
            return base
        merged = _linear(base.in_features, torch.empty_like(base.weight), base.bias)
        self.parts.append((merged.weight, module, base, adapters))
        return merged

    def fused(self, modules):
        """`(one linear layer for modules, their output sizes)` (same input), or None when they are not fused:
        fusion off, a module that must run as is, a bias, or (with fusion "auto") a plain projection that a fused
        copy would duplicate."""
        sources = [_weight_source(m) for m in modules]
        if not self.fuse or any(s is None or s[0].bias is not None for s in sources):
            return None
        if self.fuse == "auto" and not all(adapters for _, adapters in sources):
            return None
        bases = [base for base, _ in sources]
        weight = torch.empty(sum(b.out_features for b in bases), bases[0].in_features, dtype=bases[0].weight.dtype,
                             device=bases[0].weight.device)
        start = 0
        for module, (base, adapters) in zip(modules, sources):
            self.parts.append((weight[start : start + base.out_features], module, base, adapters))
            start += base.out_features
        return _linear(bases[0].in_features, weight), tuple(b.out_features for b in bases)

    @torch.no_grad()
    def refresh(self) -> None:
        for destination, module, base, adapters in self.parts:
            if not adapters:
                destination.copy_(base.weight)
                continue
            weight = base.weight.float()
            for adapter in adapters:
                weight = weight + module.get_delta_weight(adapter).float()
            destination.copy_(weight)

    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d, _, _, _ in self.parts)


def _decode_layers(layers, merge: bool, fuse: bool | str):
    """The decoder layers as the decode step runs them and their [`_DecodeWeights`] (None without `merge`: the
    layers run as they are); the copies are written by its `refresh()`."""
    if not merge:
        return list(layers), None
    weights = _DecodeWeights(fuse)
    views = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = weights.fused([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            projections = dict(qkv_proj=qkv[0], qkv_sizes=qkv[1])
        else:
            projections = {n: weights.projection(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")}
        gate_up = weights.fused([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp_projections = dict(gate_up_proj=gate_up[0])
        else:
            mlp_projections = {n: weights.projection(getattr(mlp, n)) for n in ("gate_proj", "up_proj")}
        views.append(_Modules(
            input_layernorm=layer.input_layernorm, post_attention_layernorm=layer.post_attention_layernorm,
            self_attn=_Modules(head_dim=attn.head_dim, scaling=attn.scaling,
                               num_key_value_groups=attn.num_key_value_groups, o_proj=weights.projection(attn.o_proj),
                               **projections),
            mlp=_Modules(act_fn=mlp.act_fn, down_proj=weights.projection(mlp.down_proj), **mlp_projections),
        ))
    return views, weights


_STEP_FUNCTIONS = {"first": _step_first, "between": _step_between, "last": _step_last, "draw": _draw}
_COMPILED: dict = {}


def _step_functions(compile: bool | dict) -> dict:
    """The step pieces, eager or compiled. Compiled wrappers are kept per set of options for the process, so that a
    new decoder (every `generate` call by default) reuses the code compiled by the previous ones."""
    if not compile:
        return _STEP_FUNCTIONS
    options = compile if isinstance(compile, dict) else {}
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = {name: torch.compile(fn, **options) for name, fn in _STEP_FUNCTIONS.items()}
    return _COMPILED[key]


def _check_llama_layers(layers) -> None:
    """The decode step runs Llama decoder layers piece by piece: refuse other layer types early and clearly."""
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    attention = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "num_key_value_groups")
    mlp = ("gate_proj", "up_proj", "down_proj", "act_fn")
    layer = layers[0]  # the layers of one model share their class
    missing = [n for n in needed if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in attention if hasattr(layer, "self_attn") and not hasattr(layer.self_attn, n)]
    missing += [f"mlp.{n}" for n in mlp if hasattr(layer, "mlp") and not hasattr(layer.mlp, n)]
    if missing:
        raise ValueError(
            f"The fast Janus decoder runs Llama decoder layers; {type(layer).__name__} lacks {missing}. "
            f"Use decode_path='reference'."
        )
