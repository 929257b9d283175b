"""SRUM on a Janus / Janus-Pro checkpoint. Every SRUMConfig field and TRL's model/LoRA flags are accepted.

    accelerate launch examples/train_janus.py --model_name_or_path path/to/Janus-Pro-1B \
        --prompts prompts.jsonl --output_dir janus-srum --use_peft --lora_r 16 --bf16 true

`--prompts` is a text file (one prompt per line), a JSON list, JSONL of {"prompt": ...} records, a `datasets`
folder with a "prompt" column, or a rollout store written by `srum-trl rollout` (offline training).
"""

from srum_trl.cli import cmd_train

if __name__ == "__main__":
    import sys

    cmd_train(sys.argv[1:])
