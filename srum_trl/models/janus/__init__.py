"""Janus / Janus-Pro backend (transformers' `JanusForConditionalGeneration`)."""

from .backend import JanusBackend
from .loading import load_janus
from .tiny import TinyJanusSpec, build_tiny_janus, build_tokenizer

__all__ = ["JanusBackend", "TinyJanusSpec", "build_tiny_janus", "build_tokenizer", "load_janus"]
