"""SRUM on BAGEL-7B-MoT (the native BAGEL backend), the paper's recipe by default.

    # LoRA on the generation expert, one GPU
    accelerate launch --config_file examples/accelerate/single_gpu.yaml examples/train_bagel.py \
        --model_name_or_path path/to/BAGEL-7B-MoT --prompts prompts.jsonl --output_dir bagel-srum \
        --use_peft --lora_r 16 --lora_alpha 32 --max_steps 300

    # full fine-tune of the language model (the paper's setting), FSDP over 8 GPUs
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/train_bagel.py \
        --model_name_or_path path/to/BAGEL-7B-MoT --prompts prompts.jsonl --output_dir bagel-srum-full \
        --train_part llm --dtype float32 --max_steps 309

`--prompts` is a JSON list or JSONL of {"prompt": ..., "category": ...} records (or a text file, one prompt per line,
or a `datasets` folder with a "prompt" column). Every SRUMConfig field and TRL's ModelConfig (LoRA) flags are
accepted. The defaults below are the SRUM reference's BAGEL training settings (`PAPER_SETTINGS`: AdamW lr 2e-5, betas
(0.9, 0.95), eps 1e-15, weight decay 0, a constant schedule after 100 warmup steps, gradient clipping 1.0, lambda 0.5,
the conditional flow loss with 10% prompt dropout, no reward baseline) and BAGEL's sampler (text CFG 4.0, 50 steps,
shift 3, CFG interval (0.4, 1.0], global renormalisation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The SRUM reference's training settings (train/pretrain_unified_navit.py and its scripts/train_reg_*.sh launchers).
PAPER_SETTINGS = dict(
    learning_rate=2e-5,  # --lr 2e-5
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_epsilon=1e-15,
    weight_decay=0.0,
    lr_scheduler_type="constant_with_warmup",  # lr_scheduler "constant" after warmup_steps 100
    warmup_steps=100,
    max_grad_norm=1.0,
    constraint_weight=0.5,  # --lambda_constraint 0.5
    reward_baseline="none",
    loss_guidance="conditional",  # the conditional flow loss ...
    text_dropout=0.1,  # ... with text_cond_dropout_prob 0.1
)

BAGEL_DEFAULTS = dict(
    **PAPER_SETTINGS,
    guidance_scale=4.0,  # BAGEL's text CFG
    per_device_train_batch_size=1,
    gradient_checkpointing=True,
    dtype="bfloat16",  # the checkpoint's dtype
    logging_steps=1,
)


@dataclass
class BagelScriptArguments:
    """Data and BAGEL settings of `train_bagel.py`."""

    prompts: str = field(metadata={"help": "Prompt file (JSON list / JSONL of {prompt, category}, or text), or a "
                                           "datasets folder with a 'prompt' column."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Prompt file for evaluation."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    image_size: int = field(default=1024, metadata={"help": "Side of generated images (multiple of 16, <= 1024)."})
    num_timesteps: int = field(default=50, metadata={"help": "Sampler time grid points (num_timesteps - 1 steps)."})
    timestep_shift: float = field(default=3.0, metadata={"help": "Shift of the sampler's time grid."})
    cfg_interval_low: float = field(default=0.4, metadata={"help": "Text CFG applies for t in (low, high]."})
    cfg_interval_high: float = field(default=1.0, metadata={"help": "Upper end of the CFG interval."})
    cfg_renorm_type: str = field(default="global", metadata={"help": "CFG renormalisation: global, channel, none."})
    train_part: str = field(default="gen", metadata={
        "help": "Without --use_peft: what is fine-tuned. 'gen': the generation expert (6.54B); 'llm': the whole "
                "language model (the paper's run; 13.4B)."})
    lora_target: str = field(default="gen", metadata={
        "help": "With --use_peft and no --lora_target_modules: 'gen' (generation expert), 'und' or 'both'."})
    understanding_batch_size: int = field(default=8, metadata={"help": "Judge pairs per forward pass."})
    vit_max_size: int = field(default=980, metadata={"help": "Longest side of images shown to the judge."})
    vit_min_size: int = field(default=224, metadata={"help": "Shortest side of images shown to the judge."})


def parse_args(argv=None, config_cls=None, defaults=None, prog="train_bagel.py"):
    """`(script arguments, config, ModelConfig)` from the command line. `config_cls` / `defaults`: `SRUMConfig` and
    `BAGEL_DEFAULTS` unless given (`grpo_bagel.py` passes GRPO's)."""
    from trl import ModelConfig, TrlParser

    from srum_trl import SRUMConfig

    parser = TrlParser((BagelScriptArguments, config_cls or SRUMConfig, ModelConfig), prog=prog)
    parser.set_defaults(**(BAGEL_DEFAULTS if defaults is None else defaults))
    script, config, model_config = parser.parse_args_and_config(argv)
    if model_config.model_name_or_path is None:
        parser.error("--model_name_or_path (a BAGEL-7B-MoT folder) is required")
    return script, config, model_config


def main(argv=None, trainer_cls=None, config_cls=None, defaults=None, prog="train_bagel.py"):
    """Parse, load BAGEL, train, save. `trainer_cls` / `config_cls` / `defaults`: SRUM's unless given (the same
    script body runs `grpo_bagel.py`)."""
    import torch
    from accelerate import PartialState
    from trl import get_peft_config

    from srum_trl import SRUMTrainer
    from srum_trl.data.prompts import load_prompt_dataset
    from srum_trl.models.bagel import load_bagel, lora_targets, set_trainable

    script, config, model_config = parse_args(argv, config_cls, defaults, prog)
    trainer_cls = trainer_cls or SRUMTrainer

    state = PartialState()
    device = state.device if torch.cuda.is_available() else "cpu"
    backend = load_bagel(
        model_config.model_name_or_path,
        dtype=model_config.dtype,
        device=device,
        image_size=script.image_size,
        num_timesteps=script.num_timesteps,
        timestep_shift=script.timestep_shift,
        cfg_interval=(script.cfg_interval_low, script.cfg_interval_high),
        cfg_renorm_type=script.cfg_renorm_type,
        understanding_batch_size=script.understanding_batch_size,
        vit_max_size=script.vit_max_size,
        vit_min_size=script.vit_min_size,
    )
    peft_config = get_peft_config(model_config)
    if peft_config is not None:
        if peft_config.target_modules is None:
            peft_config.target_modules = lora_targets(script.lora_target)
    else:
        counts = set_trainable(backend.core, script.train_part)
        if state.is_main_process:
            print(f"full fine-tune of {script.train_part!r}: {counts['trainable'] / 1e9:.2f}B trainable parameters")

    train = load_prompt_dataset(script.prompts)
    if script.max_prompts:
        train = train.select(range(min(script.max_prompts, len(train))))
    eval_dataset = load_prompt_dataset(script.eval_prompts) if script.eval_prompts else None
    trainer = trainer_cls(backend, args=config, train_dataset=train, eval_dataset=eval_dataset,
                          peft_config=peft_config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)  # a path, or "true": the last checkpoint
    # LoRA: the adapter; full fine-tune: an official BAGEL folder (ema.safetensors, llm/vit configs, VAE, tokenizer)
    trainer.save_model(config.output_dir)
    if config.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
