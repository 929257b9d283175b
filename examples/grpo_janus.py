"""GRPO (UniRL-style) or self-SFT on a Janus / Janus-Pro checkpoint, judged by the model itself. Every
GRPOUMMConfig field and TRL's model/LoRA flags are accepted.

    accelerate launch examples/grpo_janus.py --model_name_or_path path/to/Janus-Pro-1B \
        --prompts prompts.jsonl --output_dir janus-grpo --use_peft --lora_r 16 --bf16 true \
        --num_generations 8 --per_device_train_batch_size 8 --learning_rate 1e-5 --advantage_mode dense

    # self-SFT on the best image of each group (UniRL's SFT)
    python examples/grpo_janus.py --model_name_or_path ... --prompts prompts.txt --output_dir janus-sft \
        --mode sft --sft_best_of_n true --use_peft

`--prompts` is a text file (one prompt per line), a JSON list, JSONL of {"prompt": ...} records, or a `datasets`
folder with a "prompt" column. See docs/grpo.md.
"""

import os
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ScriptArgs:
    """Data of the GRPO script."""

    prompts: str = field(metadata={"help": "Prompt file or datasets folder with a 'prompt' column."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Prompt file for evaluation."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})


def main(argv=None):
    from trl import ModelConfig, TrlParser, get_peft_config

    from srum_trl import GRPOUMMConfig, GRPOUMMTrainer
    from srum_trl.data.prompts import load_prompt_dataset

    parser = TrlParser((ScriptArgs, GRPOUMMConfig, ModelConfig), prog="grpo_janus.py")
    script, config, model_config = parser.parse_args_and_config(argv)
    if model_config.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    init = dict(config.model_init_kwargs or {})
    init.setdefault("attn_implementation", model_config.attn_implementation or "sdpa")
    if model_config.dtype not in (None, "auto"):
        init.setdefault("dtype", model_config.dtype)
    config.model_init_kwargs = init
    train = load_prompt_dataset(script.prompts)
    if script.max_prompts:
        train = train.select(range(min(script.max_prompts, len(train))))
    eval_dataset = load_prompt_dataset(script.eval_prompts) if script.eval_prompts else None
    peft_config = get_peft_config(model_config)  # target_modules None: the backend's default LoRA targets
    trainer = GRPOUMMTrainer(model_config.model_name_or_path, args=config, train_dataset=train,
                             eval_dataset=eval_dataset, peft_config=peft_config)
    trainer.train()
    trainer.save_model(config.output_dir)
    if config.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
