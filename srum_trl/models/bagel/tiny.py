"""Tiny BAGEL models built offline: a few-layer configuration of the real architecture, a WordLevel tokenizer with
BAGEL's special tokens, and a random backend. Used by the tests and the CPU smoke mode of the GPU benchmark."""

from __future__ import annotations

from .config import BagelConfig, BagelLLMConfig, BagelVAEConfig, BagelViTConfig

SPECIAL = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def build_tiny_tokenizer(words: list[str]):
    """A whitespace WordLevel tokenizer over `words` + BAGEL's special tokens (pad `<|endoftext|>`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in SPECIAL + ["yes", "no", "Yes", "No"] + list(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="<unk>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[2:]})
    return tokenizer


def tiny_bagel_config(vocab_size: int = 64, hidden: int = 64, layers: int = 2, image_size: int = 64,
                      vae_channels: int = 32) -> BagelConfig:
    """A ~0.5M-parameter BAGEL: 2 MoT layers of width 64, a 2-layer ViT on 56 px, a 4-level VAE of width 32 with 16
    latent channels; images up to 8 * 16 = 128 px (default 64 px -> 4x4 generation tokens)."""
    llm = BagelLLMConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=10000.0)
    vit = BagelViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=56, patch_size=14)
    vae = BagelVAEConfig(ch=vae_channels, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16)
    return BagelConfig(llm=llm, vit=vit, vae=vae, max_latent_size=max(8, image_size // 16),
                       vit_max_num_patch_per_side=4)


TINY_BACKEND_SETTINGS = dict(image_size=64, num_timesteps=4, vit_max_size=56, vit_min_size=28,
                             vit_max_pixels=None, understanding_batch_size=4)


def tiny_bagel_backend(words: list[str], seed: int = 0, **settings):
    """A random tiny [`BagelBackend`] (64 px images, 4x4 tokens, 3 Euler steps)."""
    from .loading import random_bagel_backend

    tokenizer = build_tiny_tokenizer(words)
    config = tiny_bagel_config(vocab_size=len(tokenizer))
    return random_bagel_backend(config, tokenizer, seed=seed, **{**TINY_BACKEND_SETTINGS, **settings})
