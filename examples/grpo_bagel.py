"""Flow GRPO on BAGEL-7B-MoT (the native BAGEL backend), judged by the model itself; docs/grpo.md ("Flow-matching
backends").

    # LoRA on the generation expert, one GPU: rounds of 8 images of one prompt, a 2-step SDE window
    accelerate launch examples/grpo_bagel.py --model_name_or_path path/to/BAGEL-7B-MoT \
        --prompts prompts.jsonl --output_dir bagel-grpo --use_peft --lora_r 16 --lora_alpha 32 --max_steps 300

    # dense advantages from the judge's reward map; no CFG in rollouts and loss (half the forwards)
    accelerate launch examples/grpo_bagel.py --model_name_or_path path/to/BAGEL-7B-MoT \
        --prompts prompts.jsonl --output_dir bagel-grpo-dense --use_peft --advantage_mode dense --guidance_scale 1

    # every step stochastic, 7 of them trained per round (Flow-GRPO's training on fewer steps), KL to the base
    accelerate launch examples/grpo_bagel.py ... --sde_steps random --sde_num_train_steps 7 --beta 0.01

On the flow ShapesWorld base, training a random half of the steps (`--sde_steps random`) learned more than the
2-step window in the same time and is the setting that improved the base significantly; the window costs less per
round at this size (docs/grpo.md, "Evidence on ShapesWorld").

Every GRPOUMMConfig field, the BAGEL settings of `train_bagel.py` (`--image_size`, `--num_timesteps`,
`--timestep_shift`, `--cfg_interval_low/high`, `--lora_target`, ...) and TRL's ModelConfig (LoRA) flags are
accepted. The defaults below follow Flow-GRPO's BAGEL configuration where it has one (512 px, 15 grid points = 14
sampler steps during training, a 2-step SDE window in the first half of the steps, text CFG 4.0 in rollouts and
loss, beta 0) and TRL's otherwise; `noise_level` keeps the config's 0.7 (Flow-GRPO's BAGEL runs use 1.3). The
learning rate is a starting point, not a tuned value. `srum-trl grpo --model_name_or_path path/to/BAGEL-7B-MoT ...`
runs the same trainer with the library's generic defaults.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_bagel import main as train_main  # noqa: E402  (the shared script body)

GRPO_BAGEL_DEFAULTS = dict(
    guidance_scale=4.0,  # BAGEL's text CFG, in rollouts and loss alike
    image_size=512,
    num_timesteps=15,  # 14 sampler steps per training rollout (evaluate with the backend's 50)
    num_generations=8,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,  # one round of 8 images per optimizer step on one GPU
    learning_rate=1e-5,
    gradient_checkpointing=True,
    dtype="bfloat16",
    logging_steps=1,
)


def main(argv=None):
    from srum_trl import GRPOUMMConfig, GRPOUMMTrainer

    return train_main(argv, GRPOUMMTrainer, GRPOUMMConfig, GRPO_BAGEL_DEFAULTS, prog="grpo_bagel.py")


if __name__ == "__main__":
    main()
