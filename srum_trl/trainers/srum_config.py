"""Configuration of [`SRUMTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl.trainer.base_config import _BaseConfig

from .config_checks import TRAINING_AT_LEAST_ONE, TRAINING_NON_NEGATIVE, check_ranges
from .config_base import UMMConfigBase, shared_fields_doc

_LOSS_GUIDANCE = ("guided", "conditional")
_JUDGE_MODES = ("logits", "text")
_REWARD_BASELINES = ("none", "batch", "prompt", "position")
_LOCAL_CREDITS = ("map", "object")


@dataclass
class SRUMConfig(UMMConfigBase):
    r"""
    Configuration class for [`SRUMTrainer`] (SRUM, arXiv 2510.12784): the model generates images for prompts,
    judges them with its own understanding side into dense reward maps R, and trains on its own images with the
    loss `mean over image tokens of (R + constraint_weight) * per-token generation loss`.

    Optimizer and schedule defaults are those of the SRUM reference training script (`train/pretrain_unified_navit.py`
    and its `scripts/train_reg_*.sh` launchers, which inherit BAGEL's optimizer settings): AdamW with lr 2e-5, betas
    (0.9, 0.95), eps 1e-15 and weight decay 0, a constant schedule after 100 linear warmup steps, gradient clipping at
    norm 1.0, lambda (`constraint_weight`) 0.5, and 10% prompt dropout with the conditional loss. Two defaults differ
    from the reference on purpose: `loss_guidance="guided"` (see that field) and hence `text_dropout=0`.

    Every field is also a command-line flag of `srum-trl train` (TRL's parser). Besides these, all
    [`~transformers.TrainingArguments`] fields apply.

    Parameters:
        model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for the model's `from_pretrained` when `model` is a path: `dtype` ("bfloat16",
            "float32", "auto"), `attn_implementation` ("sdpa" by default, "flash_attention_2" when flash-attn is
            installed), ... A JSON string is accepted on the command line. Without `dtype`, the checkpoint's
            dtype, except on the CPU (no CUDA device, or `use_cpu`), where it is float32: bfloat16 weights sample
            about 13x slower there.
        guidance_scale (`float`, *optional*, defaults to `5.0`):
            Classifier-free guidance scale w of the rollouts (1.0: no guidance).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the rollouts.
        top_k (`int`, *optional*):
            Sample only among the k most likely image tokens (None: all).
        generation_batch_size (`int`, *optional*):
            Images per generation forward batch; defaults to the size of one generation round.
        steps_per_generation (`int`, *optional*, defaults to `1`):
            Rollouts are made by the current policy for this many micro-steps at once, then consumed slice by
            slice (TRL's name): the refresh period of on-the-fly rollouts.
        constraint_weight (`float`, *optional*, defaults to `0.5`):
            lambda, the unweighted term of the loss weight `R + lambda`: it keeps the model near its own outputs and
            guards against reward hacking.
        reward_baseline (`str`, *optional*, defaults to `"none"`):
            What is subtracted from the reward map before lambda is added. "none" (the paper's): the weight is
            `R + lambda`, never negative, so every sampled token is pulled up. "batch": the mean token weight of the
            whole generation round (over all processes) is subtracted, `R - mean(R) + lambda`, so tokens judged worse
            than the round's average are pushed down. "prompt": the mean token weight of the round's images of the
            same prompt (set `num_generations` > 1 so that each prompt is sampled several times per round), so an
            image is only compared with images of its own prompt. For a cross-entropy loss (discrete backends such as
            Janus) on rollouts refreshed from the policy and scored on the guided logits that sampled them, a constant
            weight has zero expected gradient (E[grad log p] = 0 under the sampling distribution): there a baseline (and
            `constraint_weight=0`) removes that noise and leaves a per-token policy gradient. Flow matching (BAGEL) has
            no such identity: a velocity regression on the model's own samples moves the model even with a constant
            weight, so lambda and the mean of R are not noise there.
            "position": each token's weight minus the mean weight at the same token position over the round's
            images of the same prompt (`num_generations` > 1): a background that every image of the prompt shares
            carries no weight, where a per-image or per-prompt mean would give most background tokens a negative
            one.
        local_credit (`str`, *optional*, defaults to `"map"`):
            How region scores reach the tokens. "map" (the paper's): through the map rule (`map_rule`), inside the
            reward map R. "object": R is the map of the global score alone (uniform per image) and each judged
            region adds `local_credit_weight * (s - b) / 4` on the tokens it covers, with s its score and b the mean
            score of the regions with the same label (the local question that scored best) in the other images of
            its prompt: a region is compared with the same object elsewhere, never with background. Needs
            `num_generations` > 1 and `use_local_reward=True`; /4 puts region scores on the scale of the srum rule's
            global term (g + 1) / 4.
        local_credit_weight (`float`, *optional*, defaults to `1.0`):
            beta, the weight of the region credit of `local_credit="object"`.
        num_generations (`int`, *optional*, defaults to `1`):
            Images sampled per prompt in a round (on-the-fly rollouts): each prompt is repeated this many times, next
            to each other, in the round. The per-process round (`per_device_train_batch_size x
            steps_per_generation`) must be divisible by it.
        loss_guidance (`str`, *optional*, defaults to `"guided"`):
            Which prediction the loss trains. "guided": the guided logits u + w (c - u) that sampled the tokens
            (safe with refreshed rollouts); "conditional": the conditional prediction alone (the paper's loss, for
            one-shot offline use: training it on CFG samples and sampling with CFG again compounds the guidance).
        text_dropout (`float`, *optional*):
            Probability of dropping a prompt in the conditional-only loss, so that the unconditional prediction
            keeps being trained. Defaults to 0.1 with `loss_guidance="conditional"` and 0.0 with "guided".
        judge_mode (`str`, *optional*, defaults to `"logits"`):
            "logits" (score = 2 P(yes) - 1, one forward pass) or "text" (the paper's `Score: x` answers).
        region_proposer (`str`, *optional*, defaults to `"grid"`):
            Where local scores are taken: "grid", "sam" (needs a SAM checkpoint) or "none".
        region_grid (`int`, *optional*, defaults to `2`):
            Cells per side of the grid proposer.
        map_rule (`str`, *optional*, defaults to `"srum"`):
            How scores become the reward map: "srum" (the paper's) or "signed" (bad regions push away).
        map_downsample (`str`, *optional*, defaults to `"bilinear"`):
            How the pixel map becomes token weights: "bilinear" (the paper's: the value at each token's center) or
            "area" (the mean over the pixels a token covers, so boxes smaller than a token still count).
        use_global_reward (`bool`, *optional*, defaults to `True`):
            Ask the global question (off: the map uses g = 1; the paper's local-only ablation).
        use_local_reward (`bool`, *optional*, defaults to `True`):
            Score regions (off: a uniform map scaled by g; the paper's global-only ablation).
        judge_frozen (`bool`, *optional*, defaults to `True`):
            With a PEFT model, judge with the adapters disabled (the frozen starting point) rather than the policy.
        save_reward_maps (`int`, *optional*, defaults to `0`):
            At every logging step, save this many pictures (image beside its reward map) under
            `output_dir/reward_maps/`, and send them to the trackers in `report_to` that take images (trackio, W&B,
            TensorBoard).
        reward_weights (`list[float]`, *optional*):
            One non-negative weight per plain reward function of `reward_funcs`: the global score is their weighted
            mean over the functions that apply to an image (NaN values skipped), so it stays in [-1, 1]. Defaults
            to equal weights.
    """

    _VALID_DICT_FIELDS = _BaseConfig._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # Defaults of the paper's reference scripts
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-15, metadata={"help": "AdamW epsilon (the reference's 1e-15)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=100, metadata={"help": "Linear warmup steps (a float < 1: a ratio)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; default: on where a bf16 GPU is used (not with use_cpu), off "
                  "otherwise."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (alias of "
                  "activation_checkpointing; off by default)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the trainer reads `prompt` and rollout columns."}
    )

    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of the model's from_pretrained (dtype, attn_implementation, ...)."},
    )
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale w of the rollouts (1.0: none)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_k: int | None = field(default=None, metadata={"help": "Sample among the k most likely tokens."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Images per generation forward batch (default: one generation round)."}
    )
    steps_per_generation: int = field(
        default=1, metadata={"help": "Micro-steps served by one round of rollouts (their refresh period)."}
    )
    constraint_weight: float = field(
        default=0.5, metadata={"help": "lambda in the loss weight R + lambda (keeps the model near its outputs)."}
    )
    reward_baseline: str = field(
        default="none",
        metadata={"help": "'none' (the paper's weight R + lambda), 'batch' (R - mean of the round + lambda) or "
                  "'prompt' (R - mean over the round's images of the same prompt + lambda) or 'position' (R - the "
                  "mean at the same token position over the prompt's images + lambda)."},
    )
    num_generations: int = field(
        default=1, metadata={"help": "Images per prompt in a round (for reward_baseline='prompt'/'position')."}
    )
    local_credit: str = field(
        default="map",
        metadata={"help": "'map' (region scores through the map rule, the paper's) or 'object' (each region's score "
                  "against the same object in the prompt's other images, on the region's tokens only)."},
    )
    local_credit_weight: float = field(
        default=1.0, metadata={"help": "beta, the weight of the region credit of local_credit='object'."}
    )
    loss_guidance: str = field(
        default="guided",
        metadata={"help": "'guided': train the guided logits that sampled; 'conditional': the paper's loss."},
    )
    text_dropout: float | None = field(
        default=None, metadata={"help": "Prompt dropout of the conditional loss (default 0.1; 0 when guided)."}
    )
    judge_mode: str = field(default="logits", metadata={"help": "'logits' (2 P(yes) - 1) or 'text' (Score: x)."})
    region_proposer: str = field(default="grid", metadata={"help": "'grid', 'sam' or 'none'."})
    region_grid: int = field(default=2, metadata={"help": "Cells per side of the grid proposer."})
    map_rule: str = field(default="srum", metadata={"help": "'srum' (the paper's) or 'signed'."})
    map_downsample: str = field(default="bilinear", metadata={"help": "'bilinear' (the paper's) or 'area'."})
    use_global_reward: bool = field(default=True, metadata={"help": "Ask the global question."})
    use_local_reward: bool = field(default=True, metadata={"help": "Score regions."})
    judge_frozen: bool = field(default=True, metadata={"help": "Judge with LoRA adapters disabled."})
    save_reward_maps: int = field(
        default=0, metadata={"help": "Reward-map pictures per logging step: PNGs under output_dir/reward_maps and "
                             "images for the trackers of report_to (trackio, wandb, tensorboard)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the plain reward functions (weighted mean; default equal)."}
    )

    def __post_init__(self):
        check_ranges(self, TRAINING_AT_LEAST_ONE + ("generation_batch_size", "top_k", "region_grid"),
                     TRAINING_NON_NEGATIVE + ("save_reward_maps",))
        super().__post_init__()  # bf16 default: UMMConfigBase
        if self.loss_guidance not in _LOSS_GUIDANCE:
            raise ValueError(f"loss_guidance must be one of {_LOSS_GUIDANCE}, got {self.loss_guidance!r}.")
        if self.reward_baseline not in _REWARD_BASELINES:
            raise ValueError(f"reward_baseline must be one of {_REWARD_BASELINES}, got {self.reward_baseline!r}.")
        if self.local_credit not in _LOCAL_CREDITS:
            raise ValueError(f"local_credit must be one of {_LOCAL_CREDITS}, got {self.local_credit!r}.")
        if self.local_credit == "object" and not self.use_local_reward:
            raise ValueError("local_credit='object' spreads region scores over their tokens, but use_local_reward=False "
                             "scores no region: set use_local_reward=True or local_credit='map'.")
        if self.local_credit_weight < 0:
            raise ValueError(f"local_credit_weight must be >= 0, got {self.local_credit_weight}.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}.")
        if (self.per_device_train_batch_size * self.steps_per_generation) % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation ({self.per_device_train_batch_size} x "
                f"{self.steps_per_generation}) must be divisible by num_generations ({self.num_generations}): a round "
                "holds whole groups of images of one prompt."
            )
        if self.judge_mode not in _JUDGE_MODES:
            raise ValueError(f"judge_mode must be one of {_JUDGE_MODES}, got {self.judge_mode!r}.")
        if self.text_dropout is None:
            self.text_dropout = 0.1 if self.loss_guidance == "conditional" else 0.0
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"text_dropout must be in [0, 1), got {self.text_dropout}.")
        if self.text_dropout > 0 and self.loss_guidance != "conditional":
            raise ValueError(
                "text_dropout only applies to loss_guidance='conditional' (the guided loss trains the "
                "unconditional prediction through u + w (c - u) itself); set text_dropout=0 or use 'conditional'."
            )
        if self.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be > 0 (1.0 disables guidance), got {self.guidance_scale}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}.")
        if self.constraint_weight < 0:
            raise ValueError(f"constraint_weight (lambda) must be >= 0, got {self.constraint_weight}.")
        if self.reward_weights is not None and any(w < 0 for w in self.reward_weights):
            raise ValueError(f"reward_weights must be >= 0 (a weighted mean), got {self.reward_weights}.")
        if not (self.use_global_reward or self.use_local_reward):
            raise ValueError("use_global_reward and use_local_reward are both False: nothing would be judged.")


# the fields shared with GRPOUMMConfig (overwrite_output_dir, importance_sampling_*) are documented in config_base
SRUMConfig.__doc__ = SRUMConfig.__doc__.rstrip() + shared_fields_doc("Costs one no-gradient forward over each round.")
