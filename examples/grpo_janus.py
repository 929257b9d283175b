"""GRPO (UniRL-style) or self-SFT on a Janus / Janus-Pro checkpoint, judged by the model itself. Every
GRPOUMMConfig field and TRL's model/LoRA flags are accepted.

    accelerate launch examples/grpo_janus.py --model_name_or_path path/to/Janus-Pro-1B \
        --prompts prompts.jsonl --output_dir janus-grpo --use_peft --lora_r 16 --bf16 true \
        --num_generations 8 --per_device_train_batch_size 8 --learning_rate 1e-5 --advantage_mode dense

    # self-SFT on the best image of each group (UniRL's SFT)
    python examples/grpo_janus.py --model_name_or_path ... --prompts prompts.txt --output_dir janus-sft \
        --mode sft --sft_best_of_n true --use_peft

`--prompts` is a text file (one prompt per line), a JSON list, JSONL of {"prompt": ...} records, or a `datasets`
folder with a "prompt" column. Same as `srum-trl grpo ...`; see docs/grpo.md.
"""

from srum_trl.cli import cmd_grpo

if __name__ == "__main__":
    import sys

    cmd_grpo(sys.argv[1:])
