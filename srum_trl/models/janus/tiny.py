"""Build small Janus-architecture models entirely offline: a `JanusConfig` of the real classes, a WordLevel tokenizer
written in code, and a `JanusProcessor`. Used by the tests, the demos and ShapesWorld's pretraining.

Known traps handled here: the VQ `projection_dim` and `image_token_embed_dim` must equal the text hidden size;
`vision_config.num_image_tokens` must equal `(image_size / patch_size) ** 2`; the VQ downsamples by
`2 ** (len(channel_multiplier) - 1)`, so `image_size / patch_size` tokens per side decode to
`tokens_per_side * 2 ** (len(channel_multiplier) - 1)` pixels; GroupNorm needs channel counts divisible by 32;
image generation needs `generation_kwargs={"boi_token_id": ...}` in the generation config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>"]


@dataclass
class TinyJanusSpec:
    """Dimensions of a tiny Janus model. Defaults give a ~1M-parameter model: 32x32 images, 4x4 image tokens."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 128
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vq_base_channels: int = 32
    vq_channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2])
    vq_embed_dim: int = 8
    vq_latent_channels: int = 32
    vq_num_res_blocks: int = 1
    codebook_size: int = 64

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer over `words` plus Janus' special tokens; BOS is prepended to every text."""
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + list(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )


def build_tiny_janus(
    words: list[str], spec: TinyJanusSpec | None = None, seed: int = 0
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A randomly initialised `JanusForConditionalGeneration` of the given spec, and its processor."""
    spec = spec or TinyJanusSpec()
    if spec.image_size % spec.patch_size:
        raise ValueError(f"image_size ({spec.image_size}) must be a multiple of patch_size ({spec.patch_size}).")
    if 2 ** (len(spec.vq_channel_multiplier) - 1) != spec.patch_size:
        raise ValueError(
            f"The VQ downsamples by 2 ** (len(vq_channel_multiplier) - 1) = {2 ** (len(spec.vq_channel_multiplier) - 1)}"
            f", which must equal patch_size ({spec.patch_size}) so that decoded images are image_size pixels."
        )
    tokenizer = build_tokenizer(words)
    n_tokens = spec.tokens_per_side**2
    text_config = dict(
        model_type="llama",
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = dict(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.hidden_size,
        num_image_tokens=n_tokens,
        mlp_ratio=2.0,
    )
    vq_config = dict(
        embed_dim=spec.vq_embed_dim,
        num_embeddings=spec.codebook_size,
        latent_channels=spec.vq_latent_channels,
        base_channels=spec.vq_base_channels,
        channel_multiplier=list(spec.vq_channel_multiplier),
        num_res_blocks=spec.vq_num_res_blocks,
        projection_dim=spec.hidden_size,
        image_token_embed_dim=spec.hidden_size,
    )
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    configure_generation(model, tokenizer)
    image_processor = JanusImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=n_tokens)
    model.config.srum_tiny_spec = asdict(spec)
    return model, processor


def configure_generation(model: JanusForConditionalGeneration, tokenizer) -> None:
    """Fill the generation config so that transformers' own `generate(generation_mode="image")` works too."""
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")}
