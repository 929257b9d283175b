"""Small bridges across the transformers releases that the requirements admit.

transformers 5.24 renamed the K/V cache argument of its model and layer forwards from `past_key_values` to `cache`
(and the output field likewise), keeping the old name as a deprecated alias until 5.40. We pass whichever name the
installed release declares, so that neither the old release nor the new one sees a name it does not expect.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(func) -> str:
    params = inspect.signature(func).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(module) -> str:
    """The name under which `module.forward` takes its K/V cache: "cache" (transformers >= 5.24) or
    "past_key_values" (earlier releases)."""
    return _cache_kwarg_of(type(module).forward)


def output_cache(output):
    """The K/V cache an output carries (`output.cache`, or `output.past_key_values` before transformers 5.24)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)
