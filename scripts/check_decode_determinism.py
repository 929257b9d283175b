"""Does the same seed give the same image tokens twice? Generates one batch several times with one seed at
Janus-Pro-1B dimensions (random weights) through each decode path, each call with a fresh decoder, and reports how
many tokens differ between calls, where the first difference appears, and the seconds per call (the first call of a
path pays its warm-up). Prints a table and writes JSON.

    python scripts/check_decode_determinism.py --out determinism.json                  # bf16, library defaults
    python scripts/check_decode_determinism.py --deterministic --out determinism.json  # deterministic kernels

`--deterministic` sets `CUBLAS_WORKSPACE_CONFIG=:4096:8` before CUDA starts and
`torch.use_deterministic_algorithms(True, warn_only=True)`. `--smoke` runs tiny dimensions on the CPU.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def difference(a, b) -> dict:
    differ = a != b
    steps = [int(row.nonzero()[0]) for row in differ if row.any()]
    return dict(tokens_differing=int(differ.sum()), rows_differing=int(differ.any(dim=1).sum()),
                first_differing_step=min(steps) if steps else None)


def compare(runs) -> dict:
    """Differences of every call's tokens `[B, T]` against the first call's, and between all later pairs (is only
    the first call of the process different?)."""
    out = [difference(runs[0], tokens) for tokens in runs[1:]]
    later = {f"{i + 1}-{j + 1}": difference(runs[i], runs[j])["tokens_differing"]
             for i in range(1, len(runs)) for j in range(i + 1, len(runs))}
    return dict(calls=len(runs), identical=all(d["tokens_differing"] == 0 for d in out), vs_first=out,
                later_pairs_tokens_differing=later)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--paths", default="fast,reference", help="comma-separated: fast, reference")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--sdpa", default="default", choices=["default", "math", "efficient", "flash", "cudnn"],
                        help="restrict scaled_dot_product_attention to one backend during generation")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call

    import torch

    import janus_rollouts as jr
    from srum_trl.models import GenerationConfig, janus

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    size = "1b" if cuda else "smoke"
    model, processor, backend = jr.build(janus, size, device, dtype)
    prompts = jr.prompts_for(args.batch, 24)
    config = GenerationConfig(guidance=args.guidance, batch_size=args.batch)
    results = {}
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for path in [p.strip() for p in args.paths.split(",") if p.strip()]:
        backend.decode_path = path
        runs, seconds = [], []
        with sdpa_kernel(kernels[args.sdpa]) if args.sdpa in kernels else nullcontext():
            for _ in range(args.calls):
                jr.sync(device)
                start = time.perf_counter()
                runs.append(backend.generate(prompts, config, seed=0).tokens)
                jr.sync(device)
                seconds.append(time.perf_counter() - start)
        results[path] = dict(compare(runs), call_seconds=seconds)
    info = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                dtype=str(dtype), model=size, batch=args.batch, guidance=args.guidance,
                deterministic=args.deterministic, sdpa=args.sdpa, image_tokens=backend.num_image_tokens)
    print(f"{info['device']}, {size}, {dtype}, batch {args.batch}, deterministic={args.deterministic}, "
          f"sdpa={args.sdpa}")
    print("| path | calls | identical | tokens differing (vs call 1) | rows differing | first differing step | "
          "tokens differing between later calls | seconds per call |")
    print("|---|---|---|---|---|---|---|---|")
    for path, r in results.items():
        print(f"| {path} | {r['calls']} | {r['identical']} | "
              f"{', '.join(str(d['tokens_differing']) for d in r['vs_first'])} | "
              f"{', '.join(str(d['rows_differing']) for d in r['vs_first'])} | "
              f"{', '.join(str(d['first_differing_step']) for d in r['vs_first'])} | "
              f"{', '.join(f'{k}: {v}' for k, v in r['later_pairs_tokens_differing'].items()) or '-'} | "
              f"{', '.join(f'{t:.2f}' for t in r['call_seconds'])} |")
    payload = dict(info=info, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
