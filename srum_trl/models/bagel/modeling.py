"""BAGEL written natively: a Qwen2 mixture-of-transformers (MoT) language model, a SigLIP NaViT encoder, and the
glue between them and the FLUX VAE latents.

Parameter names follow the official implementation, so that `ema.safetensors` of BAGEL-7B-MoT loads with
`load_state_dict(strict=True)`:

    language_model.model.embed_tokens / .norm / .norm_moe_gen, language_model.lm_head
    language_model.model.layers.N.{input_layernorm, post_attention_layernorm}[_moe_gen]
    language_model.model.layers.N.self_attn.{q,k,v,o}_proj[_moe_gen], .{q,k}_norm[_moe_gen]
    language_model.model.layers.N.mlp[_moe_gen].{gate,up,down}_proj
    vit_model.vision_model.embeddings.{patch_embedding (a Linear over 14x14x3 patches), position_embedding}
    vit_model.vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}
    vit_model.vision_model.post_layernorm, connector.{fc1,fc2}, vit_pos_embed.pos_embed
    time_embedder.mlp.{0,2}, vae2llm, llm2vae, latent_pos_embed.pos_embed

Sequences are batched row by row with left padding; every row holds the same layout, so the generation tokens of a
batch form one contiguous span `[s, e)` of the sequence dimension. Mixture-of-transformers routing is then a slice:
tokens inside the span go through the `_moe_gen` weights, every other token (text, image markers, ViT tokens)
through the understanding weights; attention is shared over the whole row. Attention is PyTorch SDPA with an
explicit boolean mask `[B, 1, Lq, Lk]` built from three per-token facts: validity (padding), block id (tokens of one
image attend to each other in full; other tokens are causal) and a cache validity mask for keys already computed.

Every computation runs through `BagelModel.forward(task=..., ...)`, so that DDP / FSDP2 wrappers (whose hooks sit
on the root module's forward) see it.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .config import BagelConfig

# ------------------------------------------------------------------------------------------------------ helpers


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in float32, scale by `weight` in the input dtype."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def route(x: torch.Tensor, und, gen, span: tuple[int, int] | None) -> torch.Tensor:
    """Apply `gen` to `x[:, s:e]` and `und` to the rest (dimension 1); `span=None`: `und` everywhere."""
    if span is None:
        return und(x)
    s, e = span
    parts = []
    if s > 0:
        parts.append(und(x[:, :s]))
    parts.append(gen(x[:, s:e]))
    if e < x.shape[1]:
        parts.append(und(x[:, e:]))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Qwen2's default rotary embedding for integer positions `[B, L]`: cos, sin `[B, L, head_dim]`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x`: `[B, L, H, d]`; cos / sin: `[B, L, d]`."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin


def build_attention_mask(
    valid: torch.Tensor,
    block_id: torch.Tensor,
    past_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask `[B, 1, Lq, Lp + Lq]` (True: attend).

    Query i may attend to key j of the same call when j is valid and (j <= i, or both lie in the same full-attention
    block, `block_id >= 0`), and always to itself (so padding rows never see an empty row). Cached keys (`past_valid`
    `[B, Lp]`) are visible to every query where valid.
    """
    B, L = valid.shape
    idx = torch.arange(L, device=valid.device)
    causal = idx[:, None] >= idx[None, :]
    same_block = (block_id[:, :, None] == block_id[:, None, :]) & (block_id[:, :, None] >= 0)
    mask = (causal[None] | same_block) & valid[:, None, :]
    mask = mask | torch.eye(L, dtype=torch.bool, device=valid.device)[None]
    if past_valid is not None and past_valid.shape[1] > 0:
        mask = torch.cat([past_valid[:, None, :].expand(B, L, past_valid.shape[1]), mask], dim=-1)
    return mask[:, None]


def place_tokens(h: torch.Tensor, slots: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`h` `[B, L, D]` with the valid tokens of `feats` `[N, P, D]` (`valid` `[N, P]`, taken in row-major order)
    written at the True positions of `slots` `[B, L]` (row-major order): what `h.masked_scatter(slots[..., None],
    feats[valid])` gives, by index arithmetic alone, so that it needs no host synchronisation (and static shapes
    for `torch.compile`). `slots` must hold as many True entries as `valid`."""
    B, L, D = h.shape
    flat_valid = valid.reshape(-1)
    n = flat_valid.numel()
    rank = flat_valid.long().cumsum(0) - 1
    order = torch.zeros(n + 1, dtype=torch.long, device=h.device)  # order[r]: flat index of the r-th valid token
    order.scatter_(0, torch.where(flat_valid, rank, n), torch.arange(n, device=h.device))
    slot_rank = (slots.reshape(-1).long().cumsum(0) - 1).clamp(min=0)
    placed = feats.reshape(n, -1)[order[slot_rank]].reshape(B, L, D).to(h.dtype)
    return torch.where(slots[..., None], placed, h)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos table `[grid_size**2, embed_dim]`, row-major (index = row * grid_size + col); the first
    half of the channels encodes the column, the second half the row."""

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([one_axis(embed_dim // 2, cols), one_axis(embed_dim // 2, rows)], axis=1)


def grid_position_ids(h: int, w: int, max_per_side: int, device=None) -> torch.Tensor:
    """Flattened position ids of an `h x w` token grid in a `max_per_side`-wide table (the official "extrapolate")."""
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    return (rows * max_per_side + cols).reshape(-1)


# --------------------------------------------------------------------------------------------- language model


class QwenMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Qwen2 attention with q/k RMSNorm, doubled: understanding weights and `_moe_gen` generation weights."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(hidden, heads * self.head_dim, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(hidden, kv_heads * self.head_dim, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(hidden, kv_heads * self.head_dim, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(heads * self.head_dim, hidden, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(self.head_dim, eps))
            setattr(self, "k_norm" + suffix, RMSNorm(self.head_dim, eps))

    def forward(self, x, cos, sin, mask, span, past):
        B, L, _ = x.shape
        q = route(x, self.q_proj, self.q_proj_moe_gen, span).view(B, L, self.heads, self.head_dim)
        k = route(x, self.k_proj, self.k_proj_moe_gen, span).view(B, L, self.kv_heads, self.head_dim)
        v = route(x, self.v_proj, self.v_proj_moe_gen, span).view(B, L, self.kv_heads, self.head_dim)
        q = route(q, self.q_norm, self.q_norm_moe_gen, span)
        k = route(k, self.k_norm, self.k_norm_moe_gen, span)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        rep = self.heads // self.kv_heads
        Lk = k.shape[2]
        ke = k[:, :, None].expand(B, self.kv_heads, rep, Lk, self.head_dim).reshape(B, self.heads, Lk, self.head_dim)
        ve = v[:, :, None].expand(B, self.kv_heads, rep, Lk, self.head_dim).reshape(B, self.heads, Lk, self.head_dim)
        out = F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim)
        return route(out, self.o_proj, self.o_proj_moe_gen, span), (k, v)


class BagelDecoderLayer(nn.Module):
    """One Qwen2 MoT decoder layer (the official `Qwen2MoTDecoderLayer`)."""

    def __init__(self, cfg):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = MoTAttention(h, cfg.num_attention_heads, cfg.num_key_value_heads, eps)
        self.mlp = QwenMLP(h, cfg.intermediate_size)
        self.mlp_moe_gen = QwenMLP(h, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.input_layernorm_moe_gen = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(h, eps)

    def forward(self, h, cos, sin, mask, span=None, past=None):
        x = route(h, self.input_layernorm, self.input_layernorm_moe_gen, span)
        attn, kv = self.self_attn(x, cos, sin, mask, span, past)
        h = h + attn
        x = route(h, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, span)
        h = h + route(x, self.mlp, self.mlp_moe_gen, span)
        return h, kv


class BagelQwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([BagelDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, h, positions, mask, span=None, past=None, use_cache=False):
        """Run the decoder stack on embeddings `h` `[B, L, D]`; returns final-normed hidden states and (when
        `use_cache`) the per-layer `(k, v)` of cached + new tokens."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        caches = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, kv = self._gradient_checkpointing_func(layer.__call__, h, cos, sin, mask, span, layer_past)
            else:
                h, kv = layer(h, cos, sin, mask, span, layer_past)
            if use_cache:
                caches.append(kv)
        return route(h, self.norm, self.norm_moe_gen, span), (caches if use_cache else None)


class BagelLanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.layer_module != "Qwen2MoTDecoderLayer":
            raise ValueError(f"Only the mixture-of-transformers layout is implemented, got {cfg.layer_module!r}.")
        self.model = BagelQwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


# ------------------------------------------------------------------------------------------------ SigLIP NaViT


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=True)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, patches, position_ids):
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class SiglipMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers_used)])
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, x, mask):
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(layer.__call__, x, mask)
            else:
                x = layer(x, mask)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches, position_ids, valid):
        """`patches` `[N, P, 3*p*p]` (padded), `position_ids` / `valid` `[N, P]` -> `[N, P, D]`."""
        mask = valid[:, None, None, :] | torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)[None, None]
        x = self.embeddings(patches, position_ids)
        return self.post_layernorm(self.encoder(x, mask))


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches, position_ids, valid):
        return self.vision_model(patches, position_ids, valid)


# -------------------------------------------------------------------------------------------------------- glue


class MLPconnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"Unsupported connector activation {act!r}.")
        self.approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: 256 sinusoidal frequencies (cos, sin) of t in [0, 1], then a 2-layer SiLU MLP."""

    def __init__(self, hidden: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class PositionEmbedding(nn.Module):
    """A frozen 2-D sin-cos table (`pos_embed`, stored in the checkpoint), indexed by flattened position ids."""

    def __init__(self, max_per_side: int, hidden: int):
        super().__init__()
        self.max_per_side, self.hidden = max_per_side, hidden
        self.pos_embed = nn.Parameter(torch.zeros(max_per_side**2, hidden), requires_grad=False)

    def reset(self):
        with torch.no_grad():
            table = torch.from_numpy(sincos_2d(self.hidden, self.max_per_side)).float()
            self.pos_embed.copy_(table.to(self.pos_embed.dtype))

    def forward(self, position_ids):
        return self.pos_embed[position_ids]


# ------------------------------------------------------------------------------------------------------- model


class BagelModel(PreTrainedModel):
    """BAGEL (visual understanding + generation) without the VAE, which the backend holds beside it.

    The state dict of this module is exactly the official `ema.safetensors`.
    """

    config_class = BagelConfig
    base_model_prefix = "bagel"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BagelDecoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: BagelConfig):
        super().__init__(config)
        llm, vit = config.llm_config, config.vit_config
        self.hidden_size = llm.hidden_size
        self.language_model = BagelLanguageModel(llm)
        self.vit_model = SiglipVisionModel(vit)
        self.connector = MLPconnector(vit.hidden_size, llm.hidden_size, config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, llm.hidden_size)
        self.time_embedder = TimestepEmbedder(llm.hidden_size)
        self.vae2llm = nn.Linear(config.patch_latent_dim, llm.hidden_size)
        self.llm2vae = nn.Linear(llm.hidden_size, config.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, llm.hidden_size)
        # PEFT's CAUSAL_LM wrapper reads this attribute; BAGEL has no `generate`, the backend samples.
        self.prepare_inputs_for_generation = _no_generate
        self.post_init()

    # ------------------------------------------------------------------------------------------ init / info
    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, PositionEmbedding):
            if module.pos_embed.device.type != "meta":
                module.reset()
        elif isinstance(module, nn.Linear):
            if module.weight.device.type == "meta":
                return
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if module.weight.device.type != "meta":
                nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            if module.weight.device.type != "meta":
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, BagelModel):
            if module.llm2vae.weight.device.type != "meta":  # the official init: velocity head starts at zero
                nn.init.zeros_(module.llm2vae.weight)
                nn.init.zeros_(module.llm2vae.bias)

    def get_input_embeddings(self):
        return self.language_model.model.embed_tokens

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        """Write the official layout: `llm_config.json`, `vit_config.json`, `ema.safetensors` (this module's state
        dict, official key names), plus `config.json` (`model_type: bagel`) and a copy of the VAE weights when the
        model was loaded from a folder. Extra keyword arguments of `PreTrainedModel.save_pretrained` are ignored."""
        import os
        import shutil

        from safetensors.torch import save_file

        from .config import VAE_WEIGHTS_FILE, WEIGHTS_FILE

        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_folder(save_directory)
        self.config.save_pretrained(save_directory)
        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_FILE), metadata={"format": "pt"})
        source = getattr(self, "_vae_file", None)
        target = os.path.join(save_directory, VAE_WEIGHTS_FILE)
        if source and os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)

    def num_parameters_by_part(self) -> dict[str, int]:
        """Parameter counts: generation expert (`_moe_gen` + gen heads), understanding LLM, ViT side, total."""
        parts = {"llm_generation": 0, "llm_understanding": 0, "vit_and_connector": 0, "other": 0}
        for name, p in self.named_parameters():
            if "_moe_gen" in name or name.startswith(("vae2llm", "llm2vae", "time_embedder", "latent_pos_embed")):
                parts["llm_generation"] += p.numel()
            elif name.startswith("language_model"):
                parts["llm_understanding"] += p.numel()
            elif name.startswith(("vit_model", "connector", "vit_pos_embed")):
                parts["vit_and_connector"] += p.numel()
            else:
                parts["other"] += p.numel()
        parts["total"] = sum(parts.values())
        return parts

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, task: str | None = None, **inputs):
        """Dispatch: `task` is one of "context", "velocity", "context_velocity", "understand", "lm_step".

        Extra keyword arguments with value None (added by PEFT wrappers: `input_ids`, `labels`, ...) are ignored.
        """
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if task not in _TASKS:
            raise ValueError(f"BagelModel.forward: unknown task {task!r}; one of {sorted(_TASKS)}.")
        return getattr(self, "_" + task)(**inputs)

    @property
    def lm(self) -> BagelQwen2Model:
        return self.language_model.model

    def _embed_ids(self, ids):
        return self.lm.embed_tokens(ids)

    def _context(self, ids, valid):
        """Encode text rows (left padded, causal): the KV cache `[(k, v)] * layers` of the rows."""
        h = self._embed_ids(ids)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        block = torch.full_like(ids, -1)
        mask = build_attention_mask(valid, block)
        _, cache = self.lm(h, positions, mask, None, None, use_cache=True)
        return cache

    def latent_token_embeddings(self, x_t, t, grid):
        """`vae2llm(x_t) + time_embedder(t) + latent_pos_embed` for latent tokens `[R, n, 64]` at times `t` `[R]`."""
        h, w = grid
        pos = grid_position_ids(h, w, self.config.max_latent_size, device=x_t.device)
        dtype = self.vae2llm.weight.dtype
        tok = self.vae2llm(x_t.to(dtype))
        tok = tok + self.time_embedder(t)[:, None, :].to(dtype) + self.latent_pos_embed(pos)[None].to(dtype)
        return tok

    def _velocity(self, x_t, t, grid, markers, image_positions, cache=None, cache_valid=None):
        """Predicted velocity `[R, n, 64]` of latent tokens `x_t` at times `t`, the image block
        `[start_of_image, latents, end_of_image]` placed at rotary position `image_positions` `[R]` after the cached
        context (`cache_valid` `[R, Lc]`; rows without valid keys are unconditional)."""
        R, n, _ = x_t.shape
        tok = self.latent_token_embeddings(x_t, t, grid)
        ends = self._embed_ids(markers.to(x_t.device)[None].expand(R, 2)).to(tok.dtype)
        block = torch.cat([ends[:, :1], tok, ends[:, 1:]], dim=1)
        L = n + 2
        positions = image_positions[:, None].expand(R, L)
        valid = torch.ones(R, L, dtype=torch.bool, device=x_t.device)
        block_id = torch.zeros(R, L, dtype=torch.long, device=x_t.device)
        mask = build_attention_mask(valid, block_id, cache_valid if cache is not None else None)
        hidden, _ = self.lm(block, positions, mask, (1, 1 + n), cache, use_cache=False)
        return self.llm2vae(hidden[:, 1 : 1 + n])

    def _context_velocity(self, ids, valid, x_t, t, grid, markers):
        """Context + velocity in one forward (training): gradients reach both the generation and the
        understanding weights that encode the prompt."""
        cache = self._context(ids, valid)
        image_positions = valid.long().sum(-1)
        return self._velocity(x_t, t, grid, markers, image_positions, cache, valid)

    def encode_vit(self, patches, position_ids, valid):
        """ViT + connector + `vit_pos_embed`: `[N, P, D_llm]` (padded positions hold garbage)."""
        feats = self.vit_model(patches.to(self.vit_model.vision_model.embeddings.patch_embedding.weight.dtype),
                               position_ids, valid)
        return self.connector(feats) + self.vit_pos_embed(position_ids).to(feats.dtype)

    def _understand(self, ids, valid, positions, block_id, vit_slots=None, vit_patches=None, vit_position_ids=None,
                    vit_valid=None, use_cache=False, all_logits=False):
        """Logits of the next token after multimodal rows: text ids with ViT tokens scattered at `vit_slots`
        (`[B, L]` bool, row-major in the order of the valid ViT tokens of `vit_patches`); with `all_logits`, the
        logits at every position `[B, L, V]` (teacher-forced answers)."""
        h = self._embed_ids(ids.clamp(min=0))
        if vit_slots is not None:
            h = place_tokens(h, vit_slots, self.encode_vit(vit_patches, vit_position_ids, vit_valid), vit_valid)
        mask = build_attention_mask(valid, block_id)
        hidden, cache = self.lm(h, positions, mask, None, None, use_cache=use_cache)
        logits = self.language_model.lm_head(hidden if all_logits else hidden[:, -1])
        return (logits, cache) if use_cache else logits

    def _lm_step(self, ids, positions, cache, cache_valid):
        """One text token per row after a cache: `(logits [B, V], cache)`."""
        h = self._embed_ids(ids)
        valid = torch.ones_like(ids, dtype=torch.bool)
        mask = build_attention_mask(valid, torch.full_like(ids, -1), cache_valid)
        hidden, cache = self.lm(h, positions, mask, None, cache, use_cache=True)
        return self.language_model.lm_head(hidden[:, -1]), cache


_TASKS = {"context", "velocity", "context_velocity", "understand", "lm_step"}


def _no_generate(*args, **kwargs):
    raise NotImplementedError("BAGEL has no transformers `generate`; use BagelBackend.generate / answer.")


def build_bagel_model(config: BagelConfig, device=None, dtype: torch.dtype | None = None) -> BagelModel:
    """A `BagelModel` of `config`; `device="meta"` allocates nothing (for counting or for loading with assign)."""
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return BagelModel(config)
    model = BagelModel(config)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
