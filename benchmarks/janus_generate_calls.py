#!/usr/bin/env python
"""Consecutive `JanusBackend.generate` calls with the fast decoder, with and without `keep_fast_decoder`.

A self-rewarding round calls `generate` once per round. Without `keep_fast_decoder` every call builds the fast
decoder again and captures its CUDA graphs again; with it, calls after the first replay the graphs. This script
times three consecutive calls of each kind (whole `generate`, VQ decode to PIL images included) at Janus-Pro-1B
dimensions with random bf16 weights, and checks that for each seed the kept decoder draws the tokens of a fresh
one.

    python benchmarks/janus_generate_calls.py --out janus_generate_calls.json     # one GPU
    python benchmarks/janus_generate_calls.py --smoke --out /tmp/calls.json        # CPU plumbing check
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from janus_rollouts import build, command_line, import_janus, prompts_for, timed_call  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="1b", choices=["1b", "7b"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    janus, _, base = import_janus()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    size = "smoke" if args.smoke else args.model
    batch = 4 if args.smoke else args.batch
    model, processor, _ = build(janus, size, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompts = prompts_for(batch, 24)
    config = base.GenerationConfig(guidance=args.guidance, batch_size=batch)
    rows, tokens = [], {}
    for keep in (False, True):
        backend = janus.JanusBackend(model, processor, decode_path="fast", keep_fast_decoder=keep)
        for call in range(args.calls):
            rollout, seconds = timed_call(lambda b=backend, c=call: b.generate(prompts, config, seed=c), device)
            tokens[(keep, call)] = rollout.tokens
            rows.append({"keep_fast_decoder": keep, "call": call + 1, "seconds": round(seconds, 3),
                         "images_per_s": round(batch / seconds, 2)})
            print(f"keep_fast_decoder={keep} call {call + 1}: {seconds:.3f} s ({batch / seconds:.2f} img/s)",
                  flush=True)
        del backend
    same = all(torch.equal(tokens[(True, c)], tokens[(False, c)]) for c in range(args.calls))
    # the same question between two fresh decoders: is a fresh decoder itself reproducible call to call?
    fresh = janus.JanusBackend(model, processor, decode_path="fast")
    repeat = [fresh.generate(prompts, config, seed=1).tokens for _ in range(2)]
    fresh_same = torch.equal(repeat[0], repeat[1]) and (args.calls < 2 or torch.equal(repeat[0], tokens[(False, 1)]))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": size, "batch": batch, "guidance": args.guidance, "rows": rows,
        "same_tokens_per_seed": same, "fresh_decoders_reproduce_each_other": fresh_same, "command": command_line(),
    }
    print("| keep_fast_decoder | call | seconds | images/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep_fast_decoder']} | {r['call']} | {r['seconds']} | {r['images_per_s']} |")
    print(f"same tokens for each seed with and without keeping: {same}")
    print(f"fresh decoders reproduce each other (seed 1, three calls): {fresh_same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
