"""What to train in BAGEL: LoRA target sets and full fine-tuning parameter sets.

LoRA targets (PEFT `target_modules` regexes, matched with `re.fullmatch` on module names):

- `"gen"` (default): the generation expert only: `self_attn.{q,k,v,o}_proj_moe_gen` and
  `mlp_moe_gen.{gate,up,down}_proj` of every decoder layer. The understanding path (the judge) is unchanged, so
  judging with or without adapters gives the same scores.
- `"und"`: the understanding expert: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` (the text prompt's
  encoding and the judge change).
- `"both"`: the union.

Full fine-tuning sets ([`set_trainable`]):

- `"gen"`: the `_moe_gen` weights and the generation heads (`vae2llm`, `llm2vae`, `time_embedder`), about 7B;
- `"llm"`: the SRUM paper's recipe (BAGEL's trainer with `freeze_vit`, `visual_und=False`): the whole language model
  plus the generation heads; the ViT side is frozen. Parameters that a text-to-image loss cannot reach are frozen
  too (the understanding `lm_head` and final norm, the last layer's understanding query / output / MLP), so DDP needs
  no `find_unused_parameters`.
"""

from __future__ import annotations

import re

import torch

_GEN = r"self_attn\.(q|k|v|o)_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj"
_UND = r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
_PREFIX = r".*language_model\.model\.layers\.\d+\."

LORA_TARGET_SETS = {
    "gen": _PREFIX + f"({_GEN})",
    "und": _PREFIX + f"({_UND})",
    "both": _PREFIX + f"({_GEN}|{_UND})",
}


def lora_targets(which: str = "gen") -> str:
    """A PEFT `target_modules` regex: "gen" (generation expert), "und" (understanding expert) or "both"."""
    if which not in LORA_TARGET_SETS:
        raise ValueError(f"which must be one of {sorted(LORA_TARGET_SETS)}, got {which!r}.")
    return LORA_TARGET_SETS[which]


def t2i_unreachable(name: str, num_layers: int) -> bool:
    """Whether a parameter gets no gradient from a text-to-image flow loss."""
    if name.startswith(("vit_model.", "connector.", "vit_pos_embed.", "latent_pos_embed.")):
        return True
    if name.startswith(("language_model.lm_head.", "language_model.model.norm.")):
        return True
    last = f"language_model.model.layers.{num_layers - 1}."
    if name.startswith(last):
        rest = name[len(last):]
        # text tokens of the last layer only feed their own (unused) outputs; their keys / values are used
        return bool(re.match(r"(self_attn\.(q_proj|q_norm|o_proj)\.|post_attention_layernorm\.|mlp\.)", rest))
    return False


def set_trainable(model: torch.nn.Module, which: str = "llm") -> dict[str, int]:
    """Set `requires_grad` for full fine-tuning ("gen" or "llm", see the module docs); returns parameter counts."""
    if which not in ("gen", "llm"):
        raise ValueError(f"which must be 'gen' or 'llm', got {which!r}.")
    num_layers = len(model.language_model.model.layers)
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        if which == "gen":
            train = "_moe_gen" in name or name.startswith(("vae2llm.", "llm2vae.", "time_embedder."))
        else:
            train = name.startswith(("language_model.", "vae2llm.", "llm2vae.", "time_embedder."))
        train = train and not t2i_unreachable(name, num_layers)
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    return counts
