#!/usr/bin/env python
"""GPU benchmark of Janus image-token rollouts: transformers' `generate(generation_mode="image")`, our reference
sampler (`JanusBackend._sample`) and our fast decoder (`decode_path="fast"`, `srum_trl/models/janus/fast.py`), at
Janus-Pro-1B and Janus-Pro-7B dimensions with random bf16 weights (no download).

Needs only torch, transformers (+ tokenizers, Pillow, numpy, tqdm); `srum_trl` is imported from this checkout,
without its trainer dependencies (trl, datasets) when those are missing.

    # one GPU, both sizes, batch 16 and 64, CFG 5 (one size per command keeps each run short)
    python benchmarks/janus_rollouts.py --models 1b --out janus_rollouts_1b.json
    python benchmarks/janus_rollouts.py --models 7b --out janus_rollouts_7b.json

    # plumbing check on the CPU with tiny dimensions (a few seconds)
    python benchmarks/janus_rollouts.py --smoke --out /tmp/janus_rollouts_smoke.json

What is timed: the image-token decode of one batch (prompt prefill + all image tokens, CFG rows included), without
the VQ decode (the same for every path). `step_ms` = batch time / image tokens; `images_per_s` = batch / batch time.
The eager paths get a short warm-up (the same model with 4 image tokens); the fast path is called twice on the
same batch shape and the second call is timed (the first one, which compiles the step pieces for that shape
(dynamo's caches are reset before each fast path) and captures the CUDA graphs, is reported as `first_call_s`).

Memory floor of a decode step: the bytes that a step must read at least, over the device's copy bandwidth measured
in the same run: the weights that every step reads (language-model layers and final norm, generation head and
aligner; bf16) plus the K/V cache actually attended, rows x current length x layers x 2 x kv width x 2 bytes, with
rows = 2B (CFG) and current length = prompt + tokens so far, averaged over the steps. Bandwidth = (read + write
bytes) / time of a large device-to-device `copy_`. `floor_fraction` = floor / measured step (1.0 would be at the
floor). A compute floor (2 x decode parameters x rows FLOPs over a measured bf16 matmul rate) is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a photo of red green blue yellow black white cat dog car bus tree house person chair table cup bottle "
         "clock two three four left right above below next to on in the small large wooden metal glass painting "
         "of sunset city street mountain river and with near under behind front").split()

# Janus-Pro language / generation sizes (deepseek-ai/Janus-Pro-1B and -7B config.json: language_config,
# gen_vision_config image_token_size 16384, n_embed 8; 384 px images, 16 px patches -> 24 x 24 = 576 image tokens)
SIZES = {
    "1b": dict(hidden=2048, intermediate=5632, layers=24, heads=16, vocab=102400),
    "7b": dict(hidden=4096, intermediate=11008, layers=30, heads=32, vocab=102400),
    "smoke": dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=512),
}


def import_janus():
    """`srum_trl.models.janus` (+ `.fast`, `srum_trl.models.base`), without srum_trl's trainer dependencies."""
    sys.path.insert(0, ROOT)
    try:
        import srum_trl.models.janus as janus
    except ImportError as error:
        print(f"(srum_trl's full import failed: {error}; loading srum_trl.models.janus on its own)")
        for name in [m for m in sys.modules if m == "srum_trl" or m.startswith("srum_trl.")]:
            del sys.modules[name]
        for name, sub in (("srum_trl", "srum_trl"), ("srum_trl.models", os.path.join("srum_trl", "models"))):
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(ROOT, sub)]
            sys.modules[name] = module
        import importlib

        janus = importlib.import_module("srum_trl.models.janus")
    import importlib

    return janus, importlib.import_module("srum_trl.models.janus.fast"), importlib.import_module("srum_trl.models.base")


def build(janus, size: str, device, dtype, words=WORDS, seed: int = 0):
    """A random `JanusForConditionalGeneration` of the given size on `device` (eval mode, no gradients), its
    processor (a WordLevel tokenizer over `words`) and our backend with library defaults."""
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

    s = SIZES[size]
    tokenizer = janus.build_tokenizer(words)
    text = dict(model_type="llama", hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                vocab_size=s["vocab"], max_position_embeddings=16384, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if size == "smoke":  # 32 px images, 4 x 4 image tokens
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                      projection_dim=s["hidden"], num_image_tokens=16, mlp_ratio=2.0)
        vq = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2, 2],
                  num_res_blocks=1, projection_dim=s["hidden"], image_token_embed_dim=s["hidden"])
        image_size, n_tokens = 32, 16
    else:  # SigLIP-L 384 / 16 understanding tower (transformers' defaults), VQ with 16384 codes of dim 8
        vision = dict(image_size=384, patch_size=16, projection_dim=s["hidden"], num_image_tokens=576)
        vq = dict(embed_dim=8, num_embeddings=16384, projection_dim=s["hidden"], image_token_embed_dim=s["hidden"])
        image_size, n_tokens = 384, 576
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = JanusForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    janus.tiny.configure_generation(model, tokenizer)
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_image_tokens=n_tokens)
    backend = janus.JanusBackend(model, processor)
    assert backend.num_image_tokens == n_tokens, (backend.num_image_tokens, n_tokens)
    return model, processor, backend


def with_lora(janus, model, processor, backend, rank: int):
    """The model with a PEFT LoRA adapter (rank `rank`, alpha 2 x rank, B initialised to zero as in training) on
    the backend's default targets, and a backend over it. Returns the model with the adapter layers injected (what
    transformers' `generate` runs) and the new backend."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=backend.default_lora_targets())
    wrapped = get_peft_model(model, config)
    return wrapped.base_model.model, janus.JanusBackend(wrapped, processor)


def prompts_for(n: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def command_line() -> str:
    """The running command without machine paths: `python`, the script relative to the repository, its arguments
    (absolute paths reduced to file names)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    args = [os.path.basename(a) if os.path.isabs(a) else a for a in sys.argv[1:]]
    return " ".join(["python", script, *args])


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


@contextlib.contextmanager
def few_image_tokens(model, per_side: int = 2):
    """The model generates `per_side**2` image tokens inside this block (warm-ups of the eager paths)."""
    vision, vq = model.model.vision_model.config, model.config.vq_config
    saved = (vision.num_image_tokens, vq.num_patches, model.config.vision_config.num_image_tokens)
    vision.num_image_tokens = model.config.vision_config.num_image_tokens = per_side**2
    vq.num_patches = per_side
    try:
        yield
    finally:
        vision.num_image_tokens, vq.num_patches, model.config.vision_config.num_image_tokens = saved


# -------------------------------------------------------------------------------------------------- hardware
def copy_bandwidth(device, n_bytes: int, repeat: int = 20) -> float:
    """Device-to-device copy rate, (read + write bytes) / s."""
    import torch

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * n_bytes * repeat / seconds


def matmul_rate(device, dtype, n: int, repeat: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def step_floor(model, rows: int, prompt_len: int, n_tokens: int, bandwidth: float, flops: float) -> dict:
    """Memory and compute floors of one decode step, averaged over the image tokens."""
    core = model
    lm = core.model.language_model
    per_step = [p for name, p in lm.named_parameters() if not name.startswith("embed_tokens")]
    per_step += list(core.model.generation_head.parameters()) + list(core.model.generation_aligner.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in per_step)
    decode_params = sum(p.numel() for p in per_step)
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_width = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    elem = next(lm.parameters()).element_size()
    per_token_kv = cfg.num_hidden_layers * 2 * kv_width * elem  # bytes of one row-token in the cache
    # the forward that produces token i (i = 1 .. N-1) attends prompt + i tokens; token 0 comes from the prefill
    lengths = [prompt_len + i for i in range(1, n_tokens)]
    kv_bytes = [rows * length * per_token_kv for length in lengths]
    mean_kv = sum(kv_bytes) / len(kv_bytes)
    memory_s = (weight_bytes + mean_kv) / bandwidth
    compute_s = 2 * decode_params * rows / flops
    return dict(weight_bytes=weight_bytes, mean_kv_bytes=mean_kv, max_kv_bytes=max(kv_bytes),
                memory_floor_step_ms=1e3 * memory_s, compute_floor_step_ms=1e3 * compute_s)


# ------------------------------------------------------------------------------------------------------ paths
def run_transformers(model, processor, prompts, guidance, device):
    import torch

    enc = processor(text=prompts, generation_mode="image", return_tensors="pt", padding=True).to(device)

    def call():
        with torch.no_grad():
            return model.generate(**enc, generation_mode="image", do_sample=True, guidance_scale=guidance)

    with few_image_tokens(model):
        call()
    tokens, seconds = timed_call(call, device)
    return tokens, dict(total_s=seconds)


def run_reference(backend, prompts, config, device):
    import torch

    with torch.no_grad(), few_image_tokens(backend.core):
        backend._sample(prompts, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        (tokens, margin, logprobs), seconds = timed_call(
            lambda: backend._sample(prompts, config, torch.Generator().manual_seed(0)), device)
    return tokens, dict(total_s=seconds)


def run_fast(fast, backend, prompts, config, device, **options):
    import torch

    sampler = fast.FastJanusSampler(backend, **options)
    _, first = timed_call(lambda: sampler(prompts, config, torch.Generator().manual_seed(0)), device)
    (tokens, margin, logprobs), seconds = timed_call(
        lambda: sampler(prompts, config, torch.Generator().manual_seed(1)), device)
    decoder = sampler.decoder
    info = dict(total_s=seconds, first_call_s=first, cuda_graphs=decoder.graphs.enabled,
                graphs_captured=decoder.graphs.captures, kv_buffer_bytes=decoder.cache.nbytes())
    return (tokens, margin, logprobs), info


def check_fast(base, backend, prompts, config, result) -> dict:
    """Teacher-forced log-probs of the fast path's tokens (reference forward, no cache) vs its own bookkeeping."""
    import torch

    tokens, margin, logprobs = result
    rollout = base.Rollout(prompts=list(prompts), images=[], tokens=tokens, grid=backend.token_grid,
                           guidance=config.guidance, temperature=config.temperature)
    with torch.no_grad():
        forced = backend.token_logprobs(prompts, rollout).float()
    diff = (forced - logprobs.float()).abs()
    return dict(max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(),
                logprob_std=logprobs.float().std().item(), logprob_mean=logprobs.float().mean().item(),
                finite=bool(torch.isfinite(logprobs).all().item()))


def equivalence_check(janus, fast, base, device) -> dict:
    """Fast vs reference on a tiny float32 model (sharpened so that tokens depend on the computation) on `device`:
    with the reference's CPU random numbers ("host" sampling, CUDA graphs on CUDA) the tokens must be equal; the
    device sampler must equal it when greedy and match teacher-forced log-probs when sampling. The library's
    default decoder is checked (on CUDA its step pieces are compiled), and the uncompiled one in one setting."""
    import torch

    model, processor = janus.build_tiny_janus(WORDS, seed=0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
        model.model.generation_head.vision_head.weight.mul_(40)
    backend = janus.JanusBackend(model.to(device).eval(), processor)
    prompts = ["a red cat", "two small dogs next to a wooden table", "a glass bottle on a metal chair in the city"]
    rows, ok = [], True
    with torch.no_grad():
        for guidance in (1.0, 3.0):
            for temperature in (1.0, 0.7):
                for top_k in (None, 5):
                    config = base.GenerationConfig(guidance=guidance, temperature=temperature, top_k=top_k)
                    ref = backend._sample(prompts, config, torch.Generator().manual_seed(5))
                    sampler = fast.FastJanusSampler(backend, sampling="host")
                    got = sampler(prompts, config, torch.Generator().manual_seed(5))
                    same = torch.equal(ref[0].cpu(), got[0].cpu())
                    lp = (ref[2] - got[2]).abs().max().item()
                    margin = (ref[1] - got[1]).abs().max().item() if guidance != 1.0 else 0.0
                    ok &= same and lp < 1e-4 and margin < 1e-4
                    rows.append(dict(guidance=guidance, temperature=temperature, top_k=top_k, tokens_equal=same,
                                     max_logprob_diff=lp, max_margin_diff=margin,
                                     graphs=sampler.decoder.graphs.captures, compiled=bool(sampler.decoder.compile)))
        # the uncompiled step pieces (the default compiles them on CUDA), one setting
        config = base.GenerationConfig(guidance=3.0, temperature=0.7, top_k=None)
        ref = backend._sample(prompts, config, torch.Generator().manual_seed(5))
        sampler = fast.FastJanusSampler(backend, sampling="host", compile=False)
        got = sampler(prompts, config, torch.Generator().manual_seed(5))
        same = torch.equal(ref[0].cpu(), got[0].cpu())
        lp = (ref[2] - got[2]).abs().max().item()
        ok &= same and lp < 1e-4
        rows.append(dict(guidance=3.0, temperature=0.7, top_k=None, tokens_equal=same, max_logprob_diff=lp,
                         compiled=False))
        greedy = base.GenerationConfig(guidance=3.0, top_k=1)
        ref_greedy = backend._sample(prompts, greedy, torch.Generator().manual_seed(0))[0]
        device_sampler = fast.FastJanusSampler(backend, sampling="device")
        fast_greedy = device_sampler(prompts, greedy, torch.Generator().manual_seed(0))
        greedy_equal = torch.equal(ref_greedy.cpu(), fast_greedy[0].cpu())
        config = base.GenerationConfig(guidance=3.0, temperature=1.3)
        tokens, margin, logprobs = fast.FastJanusSampler(backend, sampling="device")(
            prompts, config, torch.Generator().manual_seed(1))
        rollout = base.Rollout(prompts=prompts, images=[], tokens=tokens, grid=backend.token_grid, guidance=3.0,
                               temperature=1.3)
        forced = (backend.token_logprobs(prompts, rollout) - logprobs).abs().max().item()
    torch._dynamo.reset()  # the timed runs compile for their own shapes
    ok &= greedy_equal and forced < 1e-4
    return dict(passed=bool(ok), host_sampling=rows, device_greedy_equal=greedy_equal,
                device_teacher_forced_max_diff=forced)


def release(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def guarded(fn):
    """`fn()`, or `(None, {"error": ...})` when it fails (out of memory, ...): the other paths still run."""
    import traceback

    import torch

    try:
        return fn()
    except torch.OutOfMemoryError as error:
        return None, dict(error=f"out of memory: {str(error).splitlines()[0]}")
    except Exception as error:  # noqa: BLE001 - report and go on with the next path
        traceback.print_exc()
        return None, dict(error=f"{type(error).__name__}: {error}")


# -------------------------------------------------------------------------------------------------------- main
FAST_OPTIONS = dict(fast=dict(), fast_nocompile=dict(compile=False),
                    fast_autotune=dict(compile=dict(mode="max-autotune-no-cudagraphs")),
                    fast_host=dict(sampling="host"), fast_eager=dict(cuda_graphs=False),
                    fast_unmerged=dict(merge_adapters=False), fast_fused=dict(fuse_projections=True),
                    fast_unfused=dict(fuse_projections=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,7b", help="comma-separated: 1b, 7b")
    parser.add_argument("--batches", default="16,64", help="comma-separated prompts per batch")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompt-words", type=int, default=24, help="words per prompt (+ BOS and BOI tokens)")
    parser.add_argument("--paths", default="transformers,reference,fast",
                        help="comma-separated: transformers, reference, fast (library defaults: on CUDA its step "
                             "pieces go through torch.compile), fast_nocompile (compile=False), fast_autotune (with "
                             "inductor's max-autotune GEMMs), fast_host (with the reference's CPU sampling), "
                             "fast_eager (without CUDA graphs), fast_fused (q/k/v and gate/up fused over weight "
                             "copies, also without adapters), fast_unfused (never fused), fast_unmerged (with --lora: "
                             "the adapters run as PEFT's layers instead of merged)")
    parser.add_argument("--lora", type=int, default=0,
                        help="wrap the model in a PEFT LoRA adapter of this rank on the language model's projections "
                             "(the trainers' default targets), as during training; 0: no adapter")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the equivalence check (tiny float32 model) and the teacher-forced check")
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU (plumbing check)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch
    import transformers

    janus, fast, base = import_janus()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke on the CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    models = ["smoke"] if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [2, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(FAST_OPTIONS) - {"transformers", "reference"}
    if unknown or any(m not in SIZES for m in models):
        parser.error(f"unknown path(s) {sorted(unknown)} or model(s) {models}")

    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    flops = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 256)
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, transformers=transformers.__version__, dtype=str(dtype),
                guidance=args.guidance, copy_bandwidth_gbs=bandwidth / 1e9, matmul_tflops=flops / 1e12,
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), smoke=args.smoke)
    print(f"{info['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write), "
          f"matmul {flops / 1e12:.1f} TFLOP/s")
    results = []
    if not args.no_check:
        equivalence = equivalence_check(janus, fast, base, device)
        info["equivalence"] = equivalence
        print(f"equivalence check on a tiny float32 model ({device.type}): "
              f"{'PASSED' if equivalence['passed'] else 'FAILED'}", flush=True)
        if not equivalence["passed"]:
            print(json.dumps(equivalence, indent=1))
    for size in models:
        release(device)
        model, processor, backend = build(janus, size, device, dtype)
        if args.lora:
            model, backend = with_lora(janus, model, processor, backend, args.lora)
        n_tokens = backend.num_image_tokens
        for batch in batches:
            prompts = prompts_for(batch, args.prompt_words, seed=batch)
            config = base.GenerationConfig(guidance=args.guidance, temperature=1.0, top_k=None, batch_size=batch)
            prompt_len = max(backend.prompt_lengths(prompts))
            rows = 2 * batch if args.guidance != 1.0 else batch
            floor = step_floor(model, rows, prompt_len, n_tokens, bandwidth, flops)
            for path in paths:
                release(device)
                if path == "transformers":
                    out, row = guarded(lambda: run_transformers(model, processor, prompts, args.guidance, device))
                elif path == "reference":
                    out, row = guarded(lambda: run_reference(backend, prompts, config, device))
                else:
                    torch._dynamo.reset()  # compiled for this batch shape alone (first_call_s includes it)
                    out, row = guarded(lambda: run_fast(fast, backend, prompts, config, device, **FAST_OPTIONS[path]))
                row.update(model=size, batch=batch, path=path, rows=rows, prompt_tokens=prompt_len, lora=args.lora,
                           image_tokens=n_tokens, peak_gib=peak_gib(device), **floor)
                if out is not None and path in ("fast", "fast_nocompile") and not args.no_check and batch == batches[0]:
                    check, info_check = guarded(lambda: (check_fast(base, backend, prompts, config, out), {}))
                    row["check"] = check if check is not None else info_check
                if "total_s" in row:
                    row["step_ms"] = 1e3 * row["total_s"] / n_tokens
                    row["images_per_s"] = batch / row["total_s"]
                    row["floor_fraction"] = floor["memory_floor_step_ms"] / row["step_ms"]
                results.append(row)
                out = None  # free the tokens before the next path
                print(format_row(row), flush=True)
        model = processor = backend = None  # free the weights before the next size
    add_ratios(results)
    print()
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=2)
        print(f"wrote {args.out}")
    return dict(info=info, results=results)


def format_row(row) -> str:
    if "error" in row:
        return f"{row['model']} b{row['batch']} {row['path']}: {row['error']}"
    extra = f", first call {row['first_call_s']:.2f} s" if "first_call_s" in row else ""
    check = row.get("check", {})
    check = f", check |dlogp| max {check['max_abs_diff']:.3g}" if "max_abs_diff" in check else ""
    return (f"{row['model']} b{row['batch']} {row['path']}: {row['step_ms']:.2f} ms/step, "
            f"{row['images_per_s']:.2f} img/s, floor {row['memory_floor_step_ms']:.2f} ms{extra}{check}")


def add_ratios(results) -> None:
    """`speedup_vs_<path>`: how many times faster than each other path of the same model and batch."""
    for row in results:
        if "step_ms" not in row:
            continue
        for other in results:
            same = (other["model"], other["batch"]) == (row["model"], row["batch"])
            if other is not row and same and "step_ms" in other:
                row[f"speedup_vs_{other['path']}"] = other["step_ms"] / row["step_ms"]


def table(results) -> str:
    header = ("model", "batch", "path", "ms/step", "img/s", "floor ms", "x floor", "floor frac", "vs transformers",
              "vs reference", "peak GiB")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in results:
        if "step_ms" not in r:
            lines.append(" | ".join([r["model"], str(r["batch"]), r["path"], r.get("error", "?")] + [""] * 7))
            continue
        lines.append(" | ".join([
            r["model"], str(r["batch"]), r["path"], f"{r['step_ms']:.2f}", f"{r['images_per_s']:.2f}",
            f"{r['memory_floor_step_ms']:.2f}", f"{r['step_ms'] / r['memory_floor_step_ms']:.1f}",
            f"{r['floor_fraction']:.3f}",
            f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else "-",
            f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-",
            str(r["peak_gib"]) if r["peak_gib"] is not None else "-",
        ]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
