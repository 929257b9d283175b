"""What [`SRUMConfig`] and [`GRPOUMMConfig`] share: the bf16 default, the output-directory and sampler-correction
fields, and keeping access tokens out of every saved copy of the configuration."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from trl.trainer.base_config import _BaseConfig

from .common import IS_MODES

_TOKEN_FIELDS = ("hub_token", "push_to_hub_token")
_TOKEN_KWARGS = ("token", "use_auth_token")


def _without_tokens(model_init_kwargs):
    if isinstance(model_init_kwargs, dict) and any(k in model_init_kwargs for k in _TOKEN_KWARGS):
        return {k: v for k, v in model_init_kwargs.items() if k not in _TOKEN_KWARGS}
    return model_init_kwargs


def shared_fields_doc(correction_note: str) -> str:
    """The docstring entries of [`UMMConfigBase`]'s fields, appended to each configuration's docstring;
    `correction_note` ends the entry of `importance_sampling_correction` with what it does in that trainer."""
    return f"""
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Allow a new run (not a resumed one) in an `output_dir` that already holds `checkpoint-N` folders. Without
            it such a run is refused before training: its checkpoints would mix with the earlier ones, and
            `save_total_limit` would delete them. To continue the earlier run, pass `resume_from_checkpoint`.
        importance_sampling_correction (`bool`, *optional*, defaults to `False`):
            Correct for the sampler's numerics (the fast decoder, bf16) differing from the training forward's
            (TRL's `vllm_importance_sampling_correction`; here the sampler is the backend's own): at the start of
            each round the training forward recomputes the log-probabilities of the sampled tokens, and each token's
            loss is weighted by `exp(log p_train - log p_sampler)`, bounded as `importance_sampling_mode` says.
            Needs a backend that records the sampler's log-probabilities (discrete tokens, e.g. Janus) and
            on-the-fly rollouts. {correction_note}
        importance_sampling_mode (`str`, *optional*, defaults to `"token_truncate"`):
            TRL's modes: "token_truncate" (per-token weights clipped to `[importance_sampling_clip_min,
            importance_sampling_clip_max]`), "token_mask" (per-token weights outside those bounds set to 0),
            "sequence_truncate" / "sequence_mask" (one weight per image, the exp of the summed difference, clipped
            or masked). TRL defaults to "sequence_mask"; an image has hundreds of tokens, whose ratios multiply in a
            per-image weight, hence the per-token default here.
        importance_sampling_clip_min (`float`, *optional*):
            Lower bound of the importance weights (None: no lower bound).
        importance_sampling_clip_max (`float`, *optional*, defaults to `3.0`):
            Upper bound of the importance weights (TRL's default).
"""


@dataclass
class UMMConfigBase(_BaseConfig):
    """Fields and rules common to the self-rewarding trainers' configurations (documented in each of them).

    Access tokens (`hub_token`, a `token` in `model_init_kwargs`) stay in memory only: pickling the configuration
    (transformers saves it as `training_args.bin` in `output_dir`, every checkpoint and what `push_to_hub` uploads)
    and `to_dict` (what loggers such as W&B or TensorBoard record) leave them out. Copies keep them.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds checkpoints of an earlier one (they may then "
                  "be overwritten or, with save_total_limit, deleted)."},
    )
    importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Weight the loss by exp(training-forward log p - sampler log p), truncated (TRL's "
                  "vllm_importance_sampling_correction); discrete backends."},
    )
    importance_sampling_mode: str = field(
        default="token_truncate",
        metadata={"help": "'token_truncate', 'token_mask', 'sequence_truncate' or 'sequence_mask' (TRL's modes)."},
    )
    importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the importance weights (None: none)."}
    )
    importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of the importance weights (TRL's default 3)."}
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on by default, which transformers refuses on machines without a bf16 GPU. One rule for
            # every trainer: on where a bf16 GPU is used, off on the CPU (use_cpu) and elsewhere.
            import torch

            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()
        if self.importance_sampling_mode not in IS_MODES:
            raise ValueError(f"importance_sampling_mode must be one of {IS_MODES}, got "
                             f"{self.importance_sampling_mode!r}.")
        low, high = self.importance_sampling_clip_min, self.importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"importance_sampling_clip_min ({low}) must be less than importance_sampling_clip_max "
                             f"({high}).")
        if self.importance_sampling_mode.endswith("truncate") and low is None and high is None:
            raise ValueError("Set importance_sampling_clip_min or importance_sampling_clip_max with a '*_truncate' "
                             "importance_sampling_mode.")

    # ------------------------------------------------------------------------------- tokens stay in memory
    def __getstate__(self):
        state = dict(self.__dict__)
        for name in _TOKEN_FIELDS:
            if state.get(name) is not None:
                state[name] = None
        if "model_init_kwargs" in state:
            state["model_init_kwargs"] = _without_tokens(state["model_init_kwargs"])
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def to_dict(self):
        d = super().to_dict()
        if "model_init_kwargs" in d:
            d["model_init_kwargs"] = _without_tokens(d["model_init_kwargs"])
        return d
