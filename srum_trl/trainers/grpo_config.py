"""Configuration of [`GRPOUMMTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl.trainer.base_config import _BaseConfig

from .config_checks import TRAINING_AT_LEAST_ONE, TRAINING_NON_NEGATIVE, check_ranges
from .config_base import UMMConfigBase, shared_fields_doc

_MODES = ("grpo", "sft")
_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
_SCALE_REWARDS = ("group", "batch", "none")
_IS_LEVELS = ("token", "sequence", "step")
_ADVANTAGE_MODES = ("scalar", "dense")
_LOSS_GUIDANCE = ("guided", "conditional")
_JUDGE_MODES = ("logits", "text")


@dataclass
class GRPOUMMConfig(UMMConfigBase):
    r"""
    Configuration class for [`GRPOUMMTrainer`]: GRPO on the image tokens of a unified multimodal model, as in UniRL
    (arXiv 2505.23380), with the model's own judge as reward, optional dense per-token advantages from the judge's
    reward maps, and UniRL's self-SFT mode. Field names and meanings follow TRL's `GRPOConfig` wherever one exists.
    With a flow-matching backend (BAGEL) the same fields run flow GRPO on the latents (Flow-GRPO, arXiv 2505.05470):
    SDE rollouts (`noise_level`, `sde_*` fields) and log-probabilities per denoising step and latent token.

    Every field is also a command-line flag of `examples/grpo_janus.py` (TRL's parser). Besides these, all
    [`~transformers.TrainingArguments`] fields apply.

    Parameters:
        model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for the model's `from_pretrained` when `model` is a path (`dtype`,
            `attn_implementation`, ...). A JSON string is accepted on the command line. Without `dtype`, the
            checkpoint's dtype, except on the CPU (no CUDA device, or `use_cpu`), where it is float32.
        mode (`str`, *optional*, defaults to `"grpo"`):
            "grpo": TRL's clipped policy-gradient loss. "sft": UniRL's self-SFT (the SFT baseline of the SRUM
            paper): cross-entropy on the model's own images, optionally only the best of each group
            (`sft_best_of_n`); no advantages, no ratio, no KL.
        num_generations (`int`, *optional*, defaults to `8`):
            Group size G: images sampled per prompt (UniRL uses 8 for Janus). The generation batch must hold whole
            groups. GRPO needs at least 2.
        max_completion_length (`int`, *optional*):
            The constant normaliser of `loss_type="dr_grpo"`. Defaults to the number of image tokens of the model
            (every image has exactly that many tokens); flow backends: latent tokens x trained steps.
        shuffle_dataset (`bool`, *optional*, defaults to `True`):
            Shuffle the prompts of the training dataset.
        generation_batch_size (`int`, *optional*):
            Images per generation round over all processes (TRL's meaning). Defaults to
            `per_device_train_batch_size * num_processes * steps_per_generation`. Set at most one of this and
            `steps_per_generation`.
        steps_per_generation (`int`, *optional*):
            Micro-steps served by one generation round. Defaults to `gradient_accumulation_steps`.
        generation_chunk_size (`int`, *optional*):
            Images per generation forward pass; defaults to the whole per-process generation round at once.
        guidance_scale (`float`, *optional*, defaults to `5.0`):
            Classifier-free guidance scale w of the rollouts (1.0: no guidance). The policy is the distribution that
            sampled the tokens, `softmax((u + w (c - u)) / temperature)`: log-probabilities, ratios and KL are all
            taken on these guided logits. Flow backends likewise: the SDE steps are drawn with the guided velocity
            (inside the backend's CFG interval) and their log-probabilities are recomputed with it; 1.0 samples and
            trains without CFG, one forward per row instead of two in both (see docs/grpo.md).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the rollouts (log-probabilities are divided by it, as in TRL).
        top_k (`int`, *optional*):
            Sample only among the k most likely image tokens (None: all). Log-probabilities ignore the truncation,
            as TRL's do.
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient (k3 estimator `exp(ref - logp) - (ref - logp) - 1`, per token). The reference is the
            model with its LoRA adapters disabled (`backend.frozen()`), so no second copy is kept. A full
            fine-tune with `beta > 0` needs `ref_model_copy=True`.
        ref_model_copy (`bool`, *optional*, defaults to `False`):
            Without PEFT adapters and with `beta > 0`: keep a frozen copy of the starting model as the reference
            (doubles the model memory). Ignored with a PEFT model.
        num_iterations (`int`, *optional*, defaults to `1`):
            Optimisation passes over each generation round (mu in the GRPO paper).
        epsilon (`float`, *optional*, defaults to `0.2`):
            Lower clipping bound: the ratio is clipped to `[1 - epsilon, 1 + epsilon_high]`.
        epsilon_high (`float`, *optional*):
            Upper clipping bound; defaults to `epsilon` (DAPO recommends 0.28).
        importance_sampling_level (`str`, *optional*, defaults to `"token"`):
            "token": one ratio per token (flow backends: per latent token and trained step); "sequence" (GSPO): the
            exp of the mean per-token log-ratio of the image; "step" (flow backends only): one ratio per image and
            trained step, the exp of the mean over the step's tokens (Flow-GRPO's granularity).
        reward_weights (`list[float]`, *optional*):
            One weight per reward function; the reward is the NaN-skipping weighted sum (TRL's `nansum`). Defaults
            to all ones.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Advantage `A = r - mean_group(r)`, divided by the group's std ("group"), the batch's std ("batch"), or
            by nothing ("none", Dr. GRPO), with 1e-4 added to the std. `True`/`False` mean "group"/"none".
        loss_type (`str`, *optional*, defaults to `"dapo"`):
            How per-token losses are aggregated (TRL's): "grpo" per-image mean then batch mean; "bnpo" mean over the
            tokens of the micro-batch; "dr_grpo" sum divided by `batch * max_completion_length`; "dapo" sum divided
            by the mean number of tokens per micro-batch of the whole generation round. Every image has the same
            number of tokens, so all four agree up to constants here.
        advantage_mode (`str`, *optional*, defaults to `"scalar"`):
            "scalar": plain GRPO, every token of an image gets the image's advantage A. "dense": A is spread over
            the tokens by the judge's reward map m (normalised to [0, 1]): `A_t = A * m_t / mean(m)` when A >= 0
            (credit to the tokens the judge liked), `A_t = A * (1 - m_t) / mean(1 - m)` when A < 0 (blame on the
            tokens it disliked); the mean over tokens of A_t is A. Needs a `UMMJudgeRewardFunction` among the
            reward functions (the first one's maps are used).
        sft_best_of_n (`bool`, *optional*, defaults to `False`):
            Self-SFT: train only on the image with the highest reward of each group (ties: the first). Off: on all
            images.
        sft_loss_guidance (`str`, *optional*, defaults to `"guided"`):
            Self-SFT: which prediction the cross-entropy trains, "guided" (the logits that sampled) or
            "conditional" (the conditional prediction, with prompt dropout).
        sft_text_dropout (`float`, *optional*):
            Self-SFT: prompt-dropout probability of the conditional loss. Defaults to 0.1 with
            `sft_loss_guidance="conditional"` and 0.0 with "guided".
        noise_level (`float`, *optional*, defaults to `0.7`):
            Flow backends: the noise level a of the rollouts' SDE, `sigma_t = a * sqrt(t / (1 - t))` (Flow-GRPO's
            default). The SDE has the marginals of the deterministic sampler; a larger a explores more.
        sde_steps (`str`, *optional*, defaults to `"window"`):
            Flow backends: which denoising steps are stochastic and trained. "window": `sde_window_size` consecutive
            SDE steps at a random place of `sde_window_range`, deterministic (ODE) steps elsewhere, only the window
            trained (Flow-GRPO-Fast, MixGRPO: the cheapest); "random": every step stochastic, a random subset of
            `sde_num_train_steps` trained (Flow-GRPO's training on fewer steps); "all": every step stochastic and
            trained (Flow-GRPO). The choice is drawn once per generation round, the same on every process.
        sde_window_size (`int`, *optional*, defaults to `2`):
            Flow backends, `sde_steps="window"`: SDE steps in the window (1 to 3 in Flow-GRPO-Fast and MixGRPO).
        sde_window_range (`list[int]`, *optional*):
            Flow backends, `sde_steps="window"`: `[lo, hi]`, the window lies within steps lo .. hi - 1 of the
            sampler. Defaults to the first half of the steps (Flow-GRPO-Fast's range: the early, high-noise steps).
        sde_num_train_steps (`int`, *optional*):
            Flow backends, `sde_steps="random"`: steps trained per round. Defaults to half of the steps (rounded up).
        judge_mode (`str`, *optional*, defaults to `"logits"`):
            Default judge (built when `reward_funcs=None`): "logits" (2 P(yes) - 1) or "text" (`Score: x`).
        region_proposer (`str`, *optional*, defaults to `"grid"`):
            Default judge: where local scores are taken, "grid", "sam" or "none".
        region_grid (`int`, *optional*, defaults to `2`):
            Default judge: cells per side of the grid proposer.
        map_rule (`str`, *optional*, defaults to `"srum"`):
            Default judge: how scores become the reward map, "srum" or "signed".
        map_downsample (`str`, *optional*, defaults to `"bilinear"`):
            Default judge: pixel map to token grid, "bilinear" or "area".
        judge_frozen (`bool`, *optional*, defaults to `True`):
            Default judge: with a PEFT model, judge with the adapters disabled (the frozen starting point).
        save_reward_maps (`int`, *optional*, defaults to `0`):
            At every logging step, save this many pictures of the last round (image beside the judge's reward map)
            under `output_dir/reward_maps/` and send them to the trackers in `report_to` that take images (trackio,
            W&B, TensorBoard). Needs a [`UMMJudgeRewardFunction`] among the reward functions.
    """

    _VALID_DICT_FIELDS = _BaseConfig._VALID_DICT_FIELDS + ["model_init_kwargs"]

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's GRPO default)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; default: on where a bf16 GPU is used (not with use_cpu), off "
                  "otherwise."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (off by default)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the trainer reads `prompt`."}
    )

    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of the model's from_pretrained (dtype, attn_implementation, ...)."},
    )
    mode: str = field(default="grpo", metadata={"help": "'grpo' (policy gradient) or 'sft' (self-SFT)."})
    num_generations: int = field(default=8, metadata={"help": "Group size G: images sampled per prompt."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "dr_grpo normaliser (default: the number of image tokens)."}
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the training prompts."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Images per generation round over all processes (TRL's meaning)."}
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-steps per generation round (default: gradient_accumulation_steps)."}
    )
    generation_chunk_size: int | None = field(
        default=None, metadata={"help": "Images per generation forward pass (default: the whole round)."}
    )
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale w of the rollouts (1.0: none)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_k: int | None = field(default=None, metadata={"help": "Sample among the k most likely tokens."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (reference: LoRA adapters disabled)."})
    ref_model_copy: bool = field(
        default=False, metadata={"help": "Without PEFT and beta > 0: keep a frozen copy as the reference."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes per generation round (mu)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping epsilon."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping epsilon (default: epsilon)."})
    importance_sampling_level: str = field(default="token", metadata={"help": "'token' or 'sequence' (GSPO)."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default: all 1)."}
    )
    scale_rewards: str = field(default="group", metadata={"help": "Advantage scaling: 'group', 'batch' or 'none'."})
    loss_type: str = field(default="dapo", metadata={"help": "'grpo', 'dr_grpo', 'dapo' or 'bnpo'."})
    advantage_mode: str = field(
        default="scalar", metadata={"help": "'scalar' (plain GRPO) or 'dense' (spread by the judge's reward map)."}
    )
    sft_best_of_n: bool = field(default=False, metadata={"help": "Self-SFT on the best image of each group only."})
    save_reward_maps: int = field(
        default=0, metadata={"help": "Reward-map pictures per logging step: PNGs under output_dir/reward_maps and "
                             "images for the trackers of report_to (trackio, wandb, tensorboard)."}
    )
    sft_loss_guidance: str = field(default="guided", metadata={"help": "Self-SFT loss: 'guided' or 'conditional'."})
    sft_text_dropout: float | None = field(
        default=None, metadata={"help": "Self-SFT prompt dropout (default 0.1 conditional, 0 guided)."}
    )
    noise_level: float = field(
        default=0.7, metadata={"help": "Flow backends: SDE noise level a (sigma_t = a sqrt(t / (1 - t)))."}
    )
    sde_steps: str = field(
        default="window", metadata={"help": "Flow backends: stochastic and trained steps, 'window', 'random' or 'all'."}
    )
    sde_window_size: int = field(default=2, metadata={"help": "Flow backends: consecutive SDE steps of the window."})
    sde_window_range: list[int] | None = field(
        default=None, metadata={"help": "Flow backends: [lo, hi] steps holding the window (default: first half)."}
    )
    sde_num_train_steps: int | None = field(
        default=None, metadata={"help": "Flow backends, sde_steps='random': steps trained per round (default: half)."}
    )
    judge_mode: str = field(default="logits", metadata={"help": "Default judge: 'logits' or 'text'."})
    region_proposer: str = field(default="grid", metadata={"help": "Default judge: 'grid', 'sam' or 'none'."})
    region_grid: int = field(default=2, metadata={"help": "Default judge: cells per side of the grid proposer."})
    map_rule: str = field(default="srum", metadata={"help": "Default judge: map rule 'srum' or 'signed'."})
    map_downsample: str = field(default="bilinear", metadata={"help": "Default judge: 'bilinear' or 'area'."})
    judge_frozen: bool = field(default=True, metadata={"help": "Default judge: judge with LoRA adapters disabled."})

    def __post_init__(self):
        check_ranges(self, TRAINING_AT_LEAST_ONE + ("generation_batch_size", "generation_chunk_size", "top_k",
                                                    "region_grid", "max_completion_length"),
                     TRAINING_NON_NEGATIVE)
        super().__post_init__()  # bf16 default: UMMConfigBase
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards, self.scale_rewards
        )
        for name, allowed in (("mode", _MODES), ("loss_type", _LOSS_TYPES), ("scale_rewards", _SCALE_REWARDS),
                              ("importance_sampling_level", _IS_LEVELS), ("advantage_mode", _ADVANTAGE_MODES),
                              ("sft_loss_guidance", _LOSS_GUIDANCE), ("judge_mode", _JUDGE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.sft_text_dropout is None:
            self.sft_text_dropout = 0.1 if self.sft_loss_guidance == "conditional" else 0.0
        if not 0.0 <= self.sft_text_dropout < 1.0:
            raise ValueError(f"sft_text_dropout must be in [0, 1), got {self.sft_text_dropout}.")
        if self.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be > 0 (1.0 disables guidance), got {self.guidance_scale}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}.")
        if self.mode == "sft" and self.importance_sampling_correction:
            raise ValueError("importance_sampling_correction applies to mode='grpo' (its ratios); self-SFT logs the "
                             "log-prob mismatch without correcting it.")
        if self.mode == "sft" and self.beta > 0:
            raise ValueError("beta (the KL term) applies to mode='grpo' only; set beta=0 for self-SFT.")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}.")
        if self.epsilon < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon and epsilon_high must be >= 0, got {self.epsilon}, {self.epsilon_high}.")
        self.sde_config()  # validates the flow fields (used only with flow backends)
        minimum = 2 if self.mode == "grpo" else 1
        if self.num_generations < minimum:
            raise ValueError(
                f"num_generations must be >= {minimum} in mode={self.mode!r} (GRPO compares images of one prompt), "
                f"got {self.num_generations}."
            )
        self._resolve_generation_batch()
        if self.do_eval and self.eval_strategy != "no" and (
            self.per_device_eval_batch_size * self.world_size
        ) % self.num_generations != 0:
            raise ValueError(
                f"The global eval batch size ({self.per_device_eval_batch_size} * {self.world_size}) must be "
                f"divisible by num_generations ({self.num_generations})."
            )

    def sde_config(self):
        """The flow backends' [`SDEConfig`] of these fields (a ValueError names a bad one)."""
        from ..models.flow_sde import SDEConfig

        window = self.sde_window_range
        if window is not None:
            if len(window) != 2:
                raise ValueError(f"sde_window_range must be two step indices [lo, hi], got {window!r}.")
            window = (int(window[0]), int(window[1]))
        return SDEConfig(noise_level=self.noise_level, steps=self.sde_steps, window_size=self.sde_window_size,
                         window_range=window, num_train_steps=self.sde_num_train_steps)

    def _resolve_generation_batch(self) -> None:
        """TRL's rule: derive whichever of generation_batch_size / steps_per_generation is unset."""
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set at most one of generation_batch_size and steps_per_generation.")
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            if self.steps_per_generation < 1:
                raise ValueError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}.")
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            if self.generation_batch_size % global_batch != 0:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be divisible by the global batch size "
                    f"({global_batch})."
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be divisible by num_generations "
                f"({self.num_generations}): a generation round holds whole groups. Raise per_device_train_batch_size "
                "or steps_per_generation."
            )


# the fields shared with SRUMConfig (overwrite_output_dir, importance_sampling_*) are documented in config_base
GRPOUMMConfig.__doc__ = GRPOUMMConfig.__doc__.rstrip() + shared_fields_doc(
    "The round's log-probabilities are then always recomputed (TRL's rule), one\n"
    "            no-gradient forward over each round; the weight multiplies the clipped surrogate, before the KL\n"
    '            term. Mode "grpo" only.')
