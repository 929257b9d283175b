"""Check the fast decode path on this machine before a long run: on the shipped ShapesWorld model with a LoRA
adapter attached, the per-token log-probabilities that the fast sampler records must equal a teacher-forced forward
of the same tokens. Exits 1 on a mismatch or an error.

    python scripts/check_fast_decode.py [--model srum_trl/shapes/assets/base]
"""

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="srum_trl/shapes/assets/base")
    parser.add_argument("--guidance", type=float, default=2.0)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from srum_trl.models import GenerationConfig, load_backend
    from srum_trl.shapes.world import sample_prompts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = load_backend(args.model, dtype="float32", backend_kwargs={"decode_path": "fast"})
    backend.model.to(device)
    targets = backend.default_lora_targets()
    model = get_peft_model(backend.model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    backend.model = model
    prompts = sample_prompts(32, "train", seed=0)
    try:
        rollout = backend.generate(prompts, GenerationConfig(guidance=args.guidance, batch_size=32), seed=0)
        with torch.no_grad():
            teacher = backend.token_logprobs(prompts, rollout)
    except Exception as error:  # report and fail
        print(f"FAILED: {error!r}")
        return 1
    diff = float((teacher.float().cpu() - rollout.logprobs.float().cpu()).abs().max())
    ok = diff < 1e-3
    print(f"{'PASSED' if ok else 'FAILED'}: fast decode on {device}, max |teacher-forced - sampled log-prob| = {diff:.2e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
