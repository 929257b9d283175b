"""Configuration of the native BAGEL implementation, read from the official checkpoint files.

An official BAGEL folder (e.g. `ByteDance-Seed/BAGEL-7B-MoT`) holds `llm_config.json` (a Qwen2 config),
`vit_config.json` (a SigLIP vision config), `ae.safetensors` (the FLUX VAE), `ema.safetensors` (all other weights) and
the Qwen2 tokenizer files. The official loader overrides a few of the json values in code; [`BagelConfig.from_folder`]
applies the same overrides:

- language model: `qk_norm=True`, `tie_word_embeddings=False`, `layer_module="Qwen2MoTDecoderLayer"`;
- ViT: `rope=False` (learned position embeddings) and the last encoder layer dropped (`num_hidden_layers - 1`);
- BAGEL: `vit_max_num_patch_per_side=70`, `connector_act="gelu_pytorch_tanh"`, `latent_patch_size=2`,
  `max_latent_size=64`;
- VAE: FLUX autoencoder, 16 latent channels, downsample 8, scale 0.3611, shift 0.1159. Another autoencoder's shape
  is read from the header of `ae.safetensors`, and what the weights do not tell (latent scale and shift, group-norm
  groups) from `ae_config.json` beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from transformers import PretrainedConfig

LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
VAE_WEIGHTS_FILE = "ae.safetensors"
WEIGHTS_FILE = "ema.safetensors"
#: written beside `ae.safetensors` when the autoencoder is not FLUX's: what its weights do not tell (latent scale and
#: shift, group-norm groups); the official folder has none and gets the FLUX values
VAE_CONFIG_FILE = "ae_config.json"


def _pick(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass
class BagelLLMConfig:
    """The Qwen2 mixture-of-transformers language model (fields of `llm_config.json`).

    Defaults are Qwen2.5-7B-Instruct's, the language model of BAGEL-7B-MoT.
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    layer_module: str = "Qwen2MoTDecoderLayer"
    # kept so that a saved llm_config.json round-trips; not used by the model
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict) -> "BagelLLMConfig":
        known = _pick(cls, values)
        known.pop("extra", None)
        extra = {k: v for k, v in values.items() if k not in known}
        config = cls(**known, extra=extra)
        # the official loader's overrides
        config.qk_norm = True
        config.tie_word_embeddings = False
        config.layer_module = "Qwen2MoTDecoderLayer"
        return config

    def to_json_dict(self) -> dict:
        values = asdict(self)
        extra = values.pop("extra")
        return {**extra, **values, "model_type": "qwen2"}


@dataclass
class BagelViTConfig:
    """The SigLIP NaViT encoder (fields of `vit_config.json`). Defaults: siglip-so400m-patch14, 980 px.

    `num_hidden_layers` is the value of the json file; the model builds `num_hidden_layers - drop_last_layers`
    layers (the official loader drops the last one).
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    drop_last_layers: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def num_layers_used(self) -> int:
        return self.num_hidden_layers - self.drop_last_layers

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict) -> "BagelViTConfig":
        known = _pick(cls, values)
        known.pop("extra", None)
        extra = {k: v for k, v in values.items() if k not in known}
        return cls(**known, extra=extra)

    def to_json_dict(self) -> dict:
        values = asdict(self)
        extra = values.pop("extra")
        values.pop("drop_last_layers")
        return {**extra, **values, "model_type": "siglip_vision_model"}


@dataclass
class BagelVAEConfig:
    """The FLUX autoencoder (the official `AutoEncoderParams`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_num_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def block_out_channels(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    @classmethod
    def from_dict(cls, values: dict) -> "BagelVAEConfig":
        return cls(**_pick(cls, values))

    @property
    def is_flux(self) -> bool:
        """Whether this is the FLUX autoencoder of BAGEL-7B-MoT (the official folder's, described by no file)."""
        return self == BagelVAEConfig()


class BagelConfig(PretrainedConfig):
    """Everything the native BAGEL model needs: `llm`, `vit`, `vae` sub-configurations and the BAGEL glue.

    Args:
        llm, vit, vae: dicts (or dataclasses) of [`BagelLLMConfig`], [`BagelViTConfig`], [`BagelVAEConfig`].
        latent_patch_size: latent pixels per side of one generation token (2: a token is 2x2x16 = 64 numbers).
        max_latent_size: tokens per side of `latent_pos_embed` (64: up to 1024 px).
        vit_max_num_patch_per_side: patches per side of `vit_pos_embed` and of the ViT position ids (70: 980 px).
        connector_act: activation of the ViT -> LLM connector MLP.
        timestep_shift: shift s of the training timesteps t -> s t / (1 + (s - 1) t) (the official training default
            is 1.0: no shift; sampling uses its own shift).
    """

    model_type = "bagel"

    def __init__(
        self,
        llm: dict | BagelLLMConfig | None = None,
        vit: dict | BagelViTConfig | None = None,
        vae: dict | BagelVAEConfig | None = None,
        latent_patch_size: int = 2,
        max_latent_size: int = 64,
        vit_max_num_patch_per_side: int = 70,
        connector_act: str = "gelu_pytorch_tanh",
        timestep_shift: float = 1.0,
        **kwargs,
    ):
        self.llm = self._as_dict(llm, BagelLLMConfig)
        self.vit = self._as_dict(vit, BagelViTConfig)
        self.vae = self._as_dict(vae, BagelVAEConfig)
        self.latent_patch_size = latent_patch_size
        self.max_latent_size = max_latent_size
        self.vit_max_num_patch_per_side = vit_max_num_patch_per_side
        self.connector_act = connector_act
        self.timestep_shift = timestep_shift
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @staticmethod
    def _as_dict(value, cls) -> dict:
        if value is None:
            return asdict(cls())
        if isinstance(value, dict):
            return asdict(cls(**_pick(cls, value)))
        return asdict(value)

    # typed views of the sub-configurations
    @property
    def llm_config(self) -> BagelLLMConfig:
        return BagelLLMConfig(**self.llm)

    @property
    def vit_config(self) -> BagelViTConfig:
        return BagelViTConfig(**self.vit)

    @property
    def vae_config(self) -> BagelVAEConfig:
        return BagelVAEConfig(**self.vae)

    @property
    def latent_channels(self) -> int:
        return self.vae["z_channels"]

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per side of one generation token (16)."""
        return BagelVAEConfig(**self.vae).downsample * self.latent_patch_size

    @classmethod
    def from_folder(cls, path: str, **overrides) -> "BagelConfig":
        """The configuration of an official BAGEL folder (`llm_config.json` + `vit_config.json`)."""
        with open(os.path.join(path, LLM_CONFIG_FILE)) as f:
            llm = BagelLLMConfig.from_dict(json.load(f))
        with open(os.path.join(path, VIT_CONFIG_FILE)) as f:
            vit = BagelViTConfig.from_dict(json.load(f))
        vae = BagelVAEConfig()
        if os.path.isfile(os.path.join(path, VAE_WEIGHTS_FILE)):
            from .vae import vae_config_from_file

            vae = vae_config_from_file(os.path.join(path, VAE_WEIGHTS_FILE))
        if os.path.isfile(os.path.join(path, VAE_CONFIG_FILE)):  # a non-FLUX autoencoder: scale, shift, groups
            with open(os.path.join(path, VAE_CONFIG_FILE)) as f:
                vae = BagelVAEConfig.from_dict({**asdict(vae), **json.load(f)})
        if os.path.isfile(os.path.join(path, "config.json")):  # written by save_pretrained: the BAGEL glue values
            try:
                with open(os.path.join(path, "config.json")) as f:
                    saved = json.load(f)
            except ValueError:
                saved = {}
            if saved.get("model_type") == "bagel":
                for key in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "connector_act",
                            "timestep_shift"):
                    if key in saved:
                        overrides.setdefault(key, saved[key])
        return cls(llm=llm, vit=vit, vae=vae, **overrides)

    def save_folder(self, path: str) -> None:
        """Write `llm_config.json` and `vit_config.json` as the official folder holds them, and `ae_config.json`
        when the autoencoder is not FLUX's."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, LLM_CONFIG_FILE), "w") as f:
            json.dump(self.llm_config.to_json_dict(), f, indent=2)
        with open(os.path.join(path, VIT_CONFIG_FILE), "w") as f:
            json.dump(self.vit_config.to_json_dict(), f, indent=2)
        if not self.vae_config.is_flux:
            with open(os.path.join(path, VAE_CONFIG_FILE), "w") as f:
                json.dump(asdict(self.vae_config), f, indent=2)


def bagel_7b_mot_config() -> BagelConfig:
    """BAGEL-7B-MoT's configuration (what `BagelConfig.from_folder` gives on the official folder)."""
    return BagelConfig(llm=BagelLLMConfig(), vit=BagelViTConfig(), vae=BagelVAEConfig())


def is_bagel_folder(path) -> bool:
    """A folder is a BAGEL checkpoint when it holds `llm_config.json` and `vit_config.json`."""
    path = str(path)
    return os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, name)) for name in (LLM_CONFIG_FILE, VIT_CONFIG_FILE)
    )
