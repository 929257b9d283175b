"""Pieces shared by the self-rewarding trainers: model and judge resolution, input checks, reward checks."""

from __future__ import annotations

import math

import torch

from ..data.rollouts import is_rollout_dataset
from ..models import UMMBackend, load_backend
from ..rewards import UMMJudgeRewardFunction


def resolve_backend(model, args, processing_class=None, peft_config=None) -> UMMBackend:
    """A backend for `model` (path, model object or backend), with a PEFT adapter added when `peft_config` is given.

    The run's seed is set first (as the Trainer does later), so that the adapter's random initialisation is the same
    in every run with the same `seed`. A path loaded without a `dtype` in `model_init_kwargs` is loaded in float32
    when the run is on the CPU, and in the checkpoint's dtype otherwise."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
    init_kwargs = dict(args.model_init_kwargs or {})
    if not isinstance(model, (str, bytes)) and init_kwargs:
        raise ValueError("model_init_kwargs only apply when `model` is a path; the model object is already built.")
    if isinstance(model, (str, bytes)) and "dtype" not in init_kwargs and "torch_dtype" not in init_kwargs and (
            args.use_cpu or not torch.cuda.is_available()):
        init_kwargs["dtype"] = "float32"  # a bfloat16 checkpoint samples about 13x slower on a CPU
    backend = load_backend(model, processor=processing_class, **init_kwargs)
    if processing_class is not None:
        backend.processor = processing_class
    if peft_config is not None:
        from peft import get_peft_model

        if hasattr(backend.model, "peft_config"):
            raise ValueError("`model` already has PEFT adapters; pass peft_config=None to train them as they are.")
        if getattr(peft_config, "target_modules", None) is None and hasattr(backend, "default_lora_targets"):
            peft_config.target_modules = backend.default_lora_targets()
        backend.model = get_peft_model(backend.model, peft_config)
    return backend


def resolve_judge(reward_funcs, args, backend) -> tuple[UMMJudgeRewardFunction, list]:
    """Split `reward_funcs` into the judge that makes reward maps and plain TRL-style reward callables.

    `None` builds the default judge from the config (`judge_mode`, `region_proposer`, ...), judging with the
    training model itself.
    """
    if reward_funcs is None:
        reward_funcs = []
    elif not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    judges = [f for f in reward_funcs if isinstance(f, UMMJudgeRewardFunction)]
    others = [f for f in reward_funcs if not isinstance(f, UMMJudgeRewardFunction)]
    for f in others:
        if not callable(f):
            raise ValueError(f"reward_funcs entries must be callables or UMMJudgeRewardFunction, got {f!r}.")
    if len(judges) > 1:
        raise ValueError("Pass at most one UMMJudgeRewardFunction in reward_funcs: it makes the reward maps.")
    if judges:
        judge = judges[0]
        _warn_ignored_judge_fields(args)
    else:
        judge = default_judge(args)
    return judge.bind(backend), others


def default_judge(args) -> UMMJudgeRewardFunction:
    """The self-judge built from a config's judge fields (`judge_mode`, `region_proposer`, `map_rule`, ...)."""
    return UMMJudgeRewardFunction(
        mode=args.judge_mode,
        region_proposer=args.region_proposer,
        region_grid=args.region_grid,
        map_rule=args.map_rule,
        downsample_mode=args.map_downsample,
        use_global=getattr(args, "use_global_reward", True),
        use_local=getattr(args, "use_local_reward", True),
        frozen=args.judge_frozen,
    )


_JUDGE_FIELDS = ("judge_mode", "region_proposer", "region_grid", "map_rule", "map_downsample", "use_global_reward",
                 "use_local_reward", "judge_frozen")


def _warn_ignored_judge_fields(args) -> None:
    """The config's judge fields only build the default judge: say so when a judge was passed and they were set."""
    import dataclasses

    from ..warn import warn

    defaults = {f.name: f.default for f in dataclasses.fields(type(args))}
    changed = [n for n in _JUDGE_FIELDS if hasattr(args, n) and getattr(args, n) != defaults.get(n)]
    if changed:
        warn(f"reward_funcs holds a UMMJudgeRewardFunction, so the config's judge fields {changed} are "
             "ignored: set them on the judge itself.", stacklevel=3)


def check_train_dataset(dataset, name: str = "train_dataset") -> None:
    """Raise early, naming the field, when a dataset cannot feed a trainer."""
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise ValueError(f"{name} must be a datasets.Dataset with a 'prompt' column, got {type(dataset).__name__}.")
    if "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {columns}); rename your text column, e.g. "
            "dataset.rename_column('text', 'prompt')."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    if not is_rollout_dataset(dataset):
        for i, prompt in enumerate(dataset["prompt"]):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{name}['prompt'][{i}] is empty or not a string ({prompt!r}).")


def check_prompts_fit(dataset, backend, judges, name: str = "train_dataset") -> None:
    """Before training: the prompts of a prompt dataset can be generated (known words, context) and every judge's
    questions about them fit the judging model's context (stored rollouts are not checked: they are made)."""
    if dataset is None or is_rollout_dataset(dataset):
        return
    prompts = list(dataset["prompt"])
    backend.check_prompts(prompts, f"{name}['prompt']")
    for judge in judges:
        judge.check_prompts(prompts, f"{name}['prompt']")


def check_rewards(values, expected: int, name: str) -> list[float]:
    """Validate the output of a reward function: `expected` finite numbers (None / NaN allowed, masked later)."""
    if values is None or len(values) != expected:
        got = "None" if values is None else len(values)
        raise ValueError(f"Reward function {name!r} returned {got} values for {expected} images; return one each.")
    out = []
    for i, v in enumerate(values):
        v = float("nan") if v is None else float(v)
        if math.isinf(v):
            raise ValueError(f"Reward function {name!r} returned {v} for image {i}; rewards must be finite.")
        out.append(v)
    return out


def func_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def weighted_nanmean(values, weights) -> float:
    """`sum(w * v) / sum(w)` over the values that are not NaN (NaN when none is, or their weights sum to 0)."""
    pairs = [(float(w), float(v)) for v, w in zip(values, weights) if not math.isnan(float(v))]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else float("nan")


def masked_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` (optionally weighted elementwise) over all finite entries."""
    finite = torch.isfinite(values)
    values = torch.where(finite, values, torch.zeros_like(values))
    if weights is not None:
        values = values * weights
    return values.sum() / finite.sum().clamp(min=1)


def logp_difference(train_logps: torch.Tensor, sampling_logps: torch.Tensor) -> tuple[float, float]:
    """Mean and max over tokens of |train - sampling| (log-probs of the same tokens), NaN entries left out (0, 0
    when none is left)."""
    delta = (train_logps.float() - sampling_logps.float().to(train_logps.device)).abs()
    delta = delta[~torch.isnan(delta)]
    if delta.numel() == 0:
        return 0.0, 0.0
    return float(delta.mean()), float(delta.max())


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_sampling_ratio(train_logps: torch.Tensor, sampling_logps: torch.Tensor, mode: str = "token_truncate",
                              clip_min: float | None = None, clip_max: float | None = 3.0) -> torch.Tensor:
    """TRL's correction for a sampler whose numerics differ from the training forward's (its
    `vllm_importance_sampling_*`): the weights `exp(train - sampling)` per token `[B, T]` ("token_*" modes) or per
    image `[B, 1]` (exp of the summed difference, "sequence_*"), clipped to `[clip_min, clip_max]` ("*_truncate") or
    set to 0 outside it ("*_mask"). A token whose sampling log-prob is NaN gets weight 1."""
    if mode not in IS_MODES:
        raise ValueError(f"importance_sampling_mode must be one of {IS_MODES}, got {mode!r}.")
    diff = torch.nan_to_num(train_logps.float() - sampling_logps.float().to(train_logps.device), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
