"""The FLUX autoencoder of BAGEL, held by diffusers' `AutoencoderKL`, and the key conversion between the official
`ae.safetensors` layout (the original FLUX / LDM names) and diffusers' layout.

Official (LDM) names -> diffusers names:

    {encoder,decoder}.conv_in / conv_out          -> same
    {encoder,decoder}.norm_out                    -> conv_norm_out
    encoder.down.I.block.J.{norm1,conv1,norm2,conv2,nin_shortcut}
                                                  -> encoder.down_blocks.I.resnets.J.{...,conv_shortcut}
    encoder.down.I.downsample.conv                -> encoder.down_blocks.I.downsamplers.0.conv
    decoder.up.I.block.J.*                        -> decoder.up_blocks.(N-1-I).resnets.J.*   (order reversed)
    decoder.up.I.upsample.conv                    -> decoder.up_blocks.(N-1-I).upsamplers.0.conv
    {enc,dec}.mid.block_1 / block_2               -> mid_block.resnets.0 / 1
    {enc,dec}.mid.attn_1.{norm,q,k,v,proj_out}    -> mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                                     (1x1 convolutions [C, C, 1, 1] <-> linear weights [C, C])

Latents are scaled as the official `AutoEncoder` does: `z = scale * (mean_or_sample - shift)` on encode and
`z / scale + shift` before decoding.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from .config import BagelVAEConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

_RESNET_RENAME = {"nin_shortcut": "conv_shortcut"}
_ATTN_RENAME = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def build_vae(cfg: BagelVAEConfig | None = None) -> "AutoencoderKL":
    from diffusers import AutoencoderKL  # imported here: diffusers is slow to import

    cfg = cfg or BagelVAEConfig()
    n = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _ldm_key_to_diffusers(key: str, num_levels: int) -> tuple[str, bool]:
    """(diffusers key, whether the tensor is a 1x1 attention conv to squeeze)."""
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        raise KeyError(key)
    if rest.startswith(("conv_in.", "conv_out.")):
        return key, False
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[len('norm_out.'):]}", False
    m = re.fullmatch(r"mid\.block_([12])\.(\w+)\.(weight|bias)", rest)
    if m:
        name = _RESNET_RENAME.get(m.group(2), m.group(2))
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{name}.{m.group(3)}", False
    m = re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{_ATTN_RENAME[m.group(1)]}.{m.group(2)}", m.group(1) != "norm"
    m = re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        level = int(m.group(2)) if m.group(1) == "down" else num_levels - 1 - int(m.group(2))
        name = _RESNET_RENAME.get(m.group(4), m.group(4))
        return f"{part}.{m.group(1)}_blocks.{level}.resnets.{m.group(3)}.{name}.{m.group(5)}", False
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest)
    if m:
        return f"{part}.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}", False
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest)
    if m:
        return f"{part}.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}", False
    raise KeyError(key)


def ldm_to_diffusers(state_dict: dict, cfg: BagelVAEConfig | None = None) -> dict:
    """Official FLUX `ae.safetensors` keys -> diffusers `AutoencoderKL` keys. Raises `KeyError` on unknown keys."""
    cfg = cfg or BagelVAEConfig()
    out = {}
    for key, value in state_dict.items():
        new, squeeze = _ldm_key_to_diffusers(key, len(cfg.ch_mult))
        out[new] = value.reshape(value.shape[0], value.shape[1]) if squeeze and value.dim() == 4 else value
    return out


def diffusers_to_ldm(state_dict: dict, cfg: BagelVAEConfig | None = None) -> dict:
    """The inverse of [`ldm_to_diffusers`] (writes the official layout)."""
    cfg = cfg or BagelVAEConfig()
    n = len(cfg.ch_mult)
    inverse = {}
    # enumerate the official names of a model of this shape and invert the forward mapping
    for key in official_vae_keys(cfg):
        new, squeeze = _ldm_key_to_diffusers(key, n)
        inverse[new] = (key, squeeze)
    out = {}
    for key, value in state_dict.items():
        if key not in inverse:
            raise KeyError(f"diffusers VAE key {key!r} has no official counterpart")
        old, squeeze = inverse[key]
        out[old] = value.reshape(*value.shape, 1, 1) if squeeze and value.dim() == 2 else value
    return out


def official_vae_keys(cfg: BagelVAEConfig | None = None) -> list[str]:
    """Every key of the official FLUX autoencoder state dict for `cfg`."""
    cfg = cfg or BagelVAEConfig()
    keys = []
    wb = ("weight", "bias")

    def resnet(prefix, shortcut):
        for layer in ("norm1", "conv1", "norm2", "conv2") + (("nin_shortcut",) if shortcut else ()):
            keys.extend(f"{prefix}.{layer}.{p}" for p in wb)

    def mid(prefix):
        resnet(f"{prefix}.mid.block_1", False)
        for layer in ("norm", "q", "k", "v", "proj_out"):
            keys.extend(f"{prefix}.mid.attn_1.{layer}.{p}" for p in wb)
        resnet(f"{prefix}.mid.block_2", False)

    chans = cfg.block_out_channels
    n = len(chans)
    keys.extend(f"encoder.conv_in.{p}" for p in wb)
    block_in = cfg.ch
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in != chans[i])
            block_in = chans[i]
        if i != n - 1:
            keys.extend(f"encoder.down.{i}.downsample.conv.{p}" for p in wb)
    mid("encoder")
    keys.extend(f"encoder.norm_out.{p}" for p in wb)
    keys.extend(f"encoder.conv_out.{p}" for p in wb)
    keys.extend(f"decoder.conv_in.{p}" for p in wb)
    mid("decoder")
    block_in = chans[-1]
    for i in reversed(range(n)):
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in != chans[i])
            block_in = chans[i]
        if i != 0:
            keys.extend(f"decoder.up.{i}.upsample.conv.{p}" for p in wb)
    keys.extend(f"decoder.norm_out.{p}" for p in wb)
    keys.extend(f"decoder.conv_out.{p}" for p in wb)
    return keys


def vae_config_from_file(path: str) -> BagelVAEConfig:
    """The autoencoder's shape read from an `ae.safetensors` header (the official one gives the FLUX defaults)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    ch = shapes["encoder.conv_in.weight"][0]
    mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels]
    return BagelVAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=len(blocks),
        z_channels=shapes["decoder.conv_in.weight"][1],
    )


def load_vae(path: str, cfg: BagelVAEConfig | None = None, device=None,
             dtype=torch.float32) -> "AutoencoderKL":
    """Load an official `ae.safetensors` into a diffusers `AutoencoderKL`, strictly."""
    from safetensors.torch import load_file

    cfg = cfg or BagelVAEConfig()
    state = ldm_to_diffusers(load_file(path, device="cpu"), cfg)
    with torch.device("meta"):
        vae = build_vae(cfg)
    result = vae.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: the VAE weights do not match the FLUX autoencoder: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}."
        )
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_vae(vae, path: str, cfg: BagelVAEConfig | None = None) -> None:
    """Write the VAE as an official `ae.safetensors`."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file(diffusers_to_ldm(state, cfg), path)


def encode_images(vae, pixels: torch.Tensor, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] `[B, 3, H, W]` -> scaled latents `[B, C, H/8, W/8]` (the official encode samples; the mean
    is used unless `sample`)."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return (z.float() - vae.config.shift_factor) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents `[B, C, h, w]` -> pixels in [-1, 1] (float32)."""
    z = latents.float() / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)
