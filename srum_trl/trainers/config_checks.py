"""Early checks of config fields that TrainingArguments leaves unchecked (a zero batch size, a negative rate)."""

from __future__ import annotations

import math


def check_ranges(config, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming the first field of `config` that is out of range (None values are skipped: they
    mean "derive a default")."""
    for name in at_least_one:
        value = getattr(config, name, None)
        if value is not None and not value >= 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}.")
    for name in non_negative:
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, float) and math.isnan(value) or not value >= 0):
            raise ValueError(f"{name} must be >= 0, got {value!r}.")


#: Fields of TrainingArguments that both configs check.
TRAINING_AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
TRAINING_NON_NEGATIVE = ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "adam_epsilon")
