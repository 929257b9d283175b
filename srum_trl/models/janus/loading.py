"""Load a Janus checkpoint folder (or Hub id) into a [`JanusBackend`]."""

from __future__ import annotations

import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

from .backend import JanusBackend
from .tiny import configure_generation

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_janus(path: str, adapter: str | None = None, backend_kwargs: dict | None = None, **model_init_kwargs):
    """Load model + processor with `from_pretrained`, optionally a PEFT adapter on top.

    `model_init_kwargs` go to `JanusForConditionalGeneration.from_pretrained` (`dtype`, `attn_implementation`, ...);
    `dtype` may be given as a string ("bfloat16").
    """
    kwargs = dict(model_init_kwargs)
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"model_init_kwargs['dtype'] must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        dtype = _DTYPES[dtype]
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.setdefault("attn_implementation", "sdpa")
    model = JanusForConditionalGeneration.from_pretrained(path, **kwargs)
    processor = JanusProcessor.from_pretrained(path)
    if not getattr(model.generation_config, "generation_kwargs", None):
        configure_generation(model, processor.tokenizer)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return JanusBackend(model, processor, **(backend_kwargs or {}))
