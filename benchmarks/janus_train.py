#!/usr/bin/env python
"""GPU benchmark of SRUM training steps at Janus-Pro-1B dimensions with random bf16 weights (no download): model
FLOPs utilisation (MFU) of a plain PyTorch loop against `SRUMTrainer.train()`, and the time of each phase of one
SRUM iteration (generate -> judge -> train).

Needs torch, transformers, trl, datasets, peft, accelerate; `srum_trl` is imported from this checkout, the model
builder and timing helpers from `benchmarks/janus_judge.py`.

    # one GPU (bf16, SDPA, 576 image tokens, 24-word prompts), batch 16
    python benchmarks/janus_train.py --out janus_train_1b.json

    # plumbing check on the CPU with tiny dimensions (seconds)
    python benchmarks/janus_train.py --smoke --out /tmp/janus_train_smoke.json

Rows of the MFU table (each on a freshly built model; `--warmup` steps untimed, then `--steps` timed steps):

* `baseline`: a plain loop: text embeddings of the prompt (ending with begin-of-image) + generation embeddings of
  the image tokens -> language model -> generation head on the 576 image positions, cross-entropy in float32
  weighted by (reward map + 0.5), `torch.optim.AdamW(fused=True)` over the whole generation path (text embeddings,
  language model, generation embeddings / aligner / head), no gradient checkpointing, no clipping. B rows per step.
  Inputs sit on the device beforehand; timed with `torch.cuda.synchronize` around the timed steps.
* `srum full (guided)`: `SRUMTrainer.train()` with library defaults (`loss_guidance="guided"`: cond + uncond rows,
  2B per step; fused AdamW, clipping at 1.0), full fine-tuning, on an offline rollout dataset (random image tokens,
  reward maps of a fixed reward function; nothing is generated or judged). Timed by a `TrainerCallback` from the end
  of step `--warmup` to the end of step `--warmup + --steps`.
* `srum full (conditional)`: the same with `loss_guidance="conditional"` (B rows per step: the baseline's work).
* `srum lora (guided)`: the same as the first with `peft_config=LoraConfig(r=16, lora_alpha=32)` on the backend's
  default targets (attention and MLP projections of the language model).

Model FLOPs of a step, with F = parameter x token products of the forward (non-embedding language-model parameters
x rows x length + generation head x rows x 576 + generation aligner x rows x 575 + LoRA parameters x rows x length)
and A = attention FLOPs of the forward (4 x layers x hidden x length^2 per row, the full square counted):
`6N` = 6 F + 3 A (the usual convention; for LoRA it counts the frozen weights' gradients that are not computed);
`4N+2Nt` = 4 F + 2 Ft + 3 A, Ft the trainable part of F (equal to `6N` for full fine-tuning; the work a LoRA step
needs). MFU = model FLOPs per second / a bf16 8192^3 matmul's FLOP/s measured in the same run; the nominal 989
TFLOP/s dense bf16 of an H100 / H200 SXM is printed beside it.

Iteration (`--iteration-images`, default 64; skipped with `--skip-iteration`): `SRUMTrainer` on prompts with
`steps_per_generation = images / batch` and `backend.decode_path = "fast"`: one round generates the images (CFG 5;
the fast decoder captures its CUDA graphs again at every call, as in training), judges them in logits mode (global
+ 2 x 2 crops), then trains `images / batch` steps. Phases come from the trainer's `timing/generate_s` and
`timing/judge_s`, timers on this backend object's `decode` and `_understanding_inputs`, and per-step times (the
first round of a run: no warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import janus_judge as jj  # noqa: E402  (model builder, timing and output helpers; also puts srum_trl on the path)

FLOPS_FORMULA = ("6N = 6 F + 3 A; 4N+2Nt = 4 F + 2 Ft + 3 A; F = sum over weights of params x tokens through them "
                 "(non-embedding LM x rows x length, generation head x rows x 576, aligner x rows x 575, LoRA x rows "
                 "x length), Ft = its trainable part, A = 4 x layers x hidden x length^2 x rows (full square)")
LAMBDA = 0.5  # SRUMConfig.constraint_weight default: loss weight = reward map + lambda


# -------------------------------------------------------------------------------------------------------- FLOPs
def step_flops(core, rows: int, length: int, n_img: int, lora_params: int = 0) -> dict:
    """Model FLOPs of one training step over `rows` sequences of `length` tokens (`n_img` scored positions)."""
    lm = core.model.language_model
    c = lm.config
    # base weights only (PEFT injects its LoRA weights into the same modules; they are counted in `lora_params`)
    layers = sum(p.numel() for n, p in lm.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    forward = rows * (layers * length + jj.n_params(core.model.generation_head) * n_img
                      + jj.n_params(core.model.generation_aligner) * (n_img - 1) + lora_params * length)
    trainable = rows * lora_params * length if lora_params else forward
    attention = rows * 4 * c.num_hidden_layers * c.hidden_size * length**2
    return dict(flops_6n=6 * forward + 3 * attention, flops_4n2t=4 * forward + 2 * trainable + 3 * attention,
                forward_param_tokens=forward, attention_forward_flops=attention)


def fixed_reward_map(prompt: str, image_size: int, grid):
    """A reward map from a fixed reward function: global and 2 x 2 region scores derived from the prompt's CRC."""
    from PIL import Image

    from srum_trl.rewards import GridProposer, Region, RewardMap

    def score(salt):
        return (zlib.crc32(f"{salt}:{prompt}".encode()) % 201 - 100) / 100

    boxes = GridProposer(2)(Image.new("RGB", (image_size, image_size)))
    return RewardMap.from_scores((image_size, image_size), grid, score("g"),
                                 [Region(tuple(b), score(k)) for k, b in enumerate(boxes)])


def offline_rollouts(backend, rows: int, words: int, guidance: float = 5.0):
    """An in-memory rollout dataset in the store's schema (image column left out: training never reads it)."""
    import torch
    from datasets import Dataset

    prompts = jj.prompts_for(rows, words, seed=7)
    generator = torch.Generator().manual_seed(0)
    codes = backend.config.vq_config.num_embeddings
    tokens = torch.randint(0, codes, (rows, backend.num_image_tokens), generator=generator)
    maps = [fixed_reward_map(p, backend.image_size, backend.token_grid) for p in prompts]
    return Dataset.from_dict({
        "prompt": prompts, "tokens": tokens.tolist(), "grid": [list(backend.token_grid)] * rows,
        "guidance": [guidance] * rows, "temperature": [1.0] * rows,
        "token_map": [m.token_map.tolist() for m in maps], "reward": [m.global_score for m in maps],
    })


# ----------------------------------------------------------------------------------------------------- baseline
def run_baseline(size, device, dtype, batch, warmup, steps, words) -> dict:
    import torch
    import torch.nn.functional as F

    model, _, backend = jj.build_janus(size, device, dtype)
    core = model.model
    params = [p for m in (core.language_model, core.generation_embeddings, core.generation_aligner,
                          core.generation_head) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.train()
    ids, mask = backend.tokenize_prompts(jj.prompts_for(batch, words, seed=7))  # prompt + begin-of-image
    data = offline_rollouts(backend, batch, words)
    tokens = torch.tensor(data["tokens"], device=device)
    weights = torch.tensor(data["token_map"], device=device).reshape(batch, -1) + LAMBDA
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    full_mask = torch.cat([mask, mask.new_ones(batch, tokens.shape[1] - 1)], dim=1)

    def step():
        text = core.language_model.embed_tokens(ids)
        image = model.prepare_embeddings_for_image_generation(tokens[:, :-1]).to(text.dtype)
        hidden = core.language_model(inputs_embeds=torch.cat([text, image], 1), attention_mask=full_mask,
                                     use_cache=False).last_hidden_state
        logits = core.generation_head(hidden[:, ids.shape[1] - 1:]).float()
        loss = (weights * F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    jj.release(device)
    for _ in range(warmup):
        step()
    jj.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    jj.sync(device)
    seconds = (time.perf_counter() - start) / steps
    length = full_mask.shape[1]
    row = dict(variant="baseline (plain loop, fused AdamW)", rows=batch, length=length, step_s=seconds,
               image_tokens=tokens.shape[1],
               trainable_params=sum(p.numel() for p in params), peak_gib=jj.peak_gib(device),
               **step_flops(model, batch, length, tokens.shape[1]))
    return row


# ------------------------------------------------------------------------------------------------------ trainer
def step_timer(start_step: int, stop_step: int, device, per_step: bool = False):
    """A TrainerCallback that times the steps after `start_step` up to `stop_step` (end of step to end of step),
    synchronising the device only at those two points unless `per_step` (then also each step's own time)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.durations, self._begin = {}, [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if per_step:
                jj.sync(device)
                self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if per_step or state.global_step in (start_step, stop_step):
                jj.sync(device)
                now = time.perf_counter()
                self.marks[state.global_step] = now
                if per_step:
                    self.durations.append(now - self._begin)

        def seconds_per_step(self):
            return (self.marks[stop_step] - self.marks[start_step]) / (stop_step - start_step)

    return StepTimer()


def step_profiler(start_step: int, steps: int, top: int = 25):
    """A TrainerCallback that runs `torch.profiler` over the `steps` steps after `start_step` (after the timed
    window, so the timing is not disturbed) and keeps the top operators by self device time, per step."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.table, self._prof = None, None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == start_step and steps > 0:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._prof = torch.profiler.profile(activities=activities)
                self._prof.__enter__()
            elif self._prof is not None and state.global_step == start_step + steps:
                jj.sync(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
                self._prof.__exit__(None, None, None)
                events = self._prof.key_averages()
                key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)
                total = sum(getattr(e, key, 0.0) for e in events)
                self.table = dict(device_ms_per_step=total / 1e3 / steps, by=key, ops=[
                    dict(name=e.key, ms_per_step=getattr(e, key, 0.0) / 1e3 / steps, calls_per_step=e.count / steps,
                         share=getattr(e, key, 0.0) / total if total else 0.0) for e in rows[:top]])
                self._prof = None

    return StepProfiler()


def srum_args(out_dir, batch, max_steps, cuda, **kwargs):
    from srum_trl import SRUMConfig

    # logging only after the last step (outside the timed window); no checkpoints; no progress bar
    return SRUMConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=max_steps,
                      logging_steps=max_steps, save_strategy="no", report_to=[], bf16=cuda, learning_rate=1e-5,
                      warmup_steps=0, seed=0, dataloader_num_workers=0, disable_tqdm=True, **kwargs)


def quiet(trainer):
    """Drop the callback that prints every log dict (the JSON keeps what matters)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def run_trainer(variant, size, device, dtype, batch, warmup, steps, words, loss_guidance, lora, profile=0) -> dict:
    from peft import LoraConfig

    from srum_trl import SRUMTrainer

    model, processor, backend = jj.build_janus(size, device, dtype)
    model.requires_grad_(True)  # full fine-tuning, as from_pretrained hands it over (LoRA freezes the base)
    dataset = offline_rollouts(backend, 4 * batch, words)
    timer = step_timer(warmup, warmup + steps, device)
    profiler = step_profiler(warmup + steps, profile)
    jj.release(device)
    with tempfile.TemporaryDirectory() as out_dir:
        args = srum_args(out_dir, batch, warmup + steps + profile, device.type == "cuda", loss_guidance=loss_guidance)
        trainer = quiet(SRUMTrainer(model, args=args, train_dataset=dataset, processing_class=processor,
                                    callbacks=[timer, profiler],
                                    peft_config=LoraConfig(r=16, lora_alpha=32) if lora else None))
        assert trainer.offline
        trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rows = 2 * batch if loss_guidance == "guided" else batch
    length = max(backend.prompt_lengths(dataset["prompt"][:batch])) + backend.num_image_tokens - 1
    row = dict(variant=variant, rows=rows, length=length, step_s=timer.seconds_per_step(), trainable_params=trainable,
               image_tokens=backend.num_image_tokens,
               peak_gib=jj.peak_gib(device), loss_guidance=loss_guidance, optim=str(args.optim),
               max_grad_norm=args.max_grad_norm, lora=dict(r=16, lora_alpha=32, target_modules=str(
                   trainer.model.peft_config["default"].target_modules)) if lora else None,
               **step_flops(model, rows, length, backend.num_image_tokens, trainable if lora else 0))
    if profiler.table is not None:
        row["profile"] = profiler.table
    trainer.accelerator.free_memory()
    return row


def run_iteration(size, device, dtype, batch, images, words, lora, rounds: int = 2) -> dict:
    """SRUM rounds through the trainer: each generates `images` (fast decoder), judges them and trains on them. The
    first round of the process pays the one-time costs (compilation, graph capture, CUDA initialisation); the later
    ones show a warmed round. Phases are timed per round."""
    from datasets import Dataset
    from peft import LoraConfig

    from srum_trl import SRUMTrainer

    model, processor, _ = jj.build_janus(size, device, dtype)
    model.requires_grad_(True)
    spg = images // batch
    timer = step_timer(0, spg * rounds, device, per_step=True)
    jj.release(device)
    with tempfile.TemporaryDirectory() as out_dir:
        args = srum_args(out_dir, batch, spg * rounds, device.type == "cuda", steps_per_generation=spg,
                         guidance_scale=5.0)
        trainer = quiet(SRUMTrainer(model, args=args, train_dataset=Dataset.from_dict({"prompt": jj.prompts_for(
            images * rounds, words, seed=3)}), processing_class=processor, callbacks=[timer],
            peft_config=LoraConfig(r=16, lora_alpha=32) if lora else None))
        backend = trainer.backend
        backend.decode_path = "fast"
        spent = []  # per round: seconds by phase

        def timed(name, fn, new_round=False):  # wrap a method of this object (the class stays as it is)
            def call(*a, **k):
                if new_round:
                    spent.append(dict(generate=0.0, decode=0.0, inputs=0.0, judge=0.0))
                start = time.perf_counter()
                out = fn(*a, **k)
                jj.sync(device)
                spent[-1][name] += time.perf_counter() - start
                return out
            return call

        backend.generate = timed("generate", backend.generate, new_round=True)
        backend.decode_pixels = timed("decode", backend.decode_pixels)
        backend.pixels_to_images = timed("decode", backend.pixels_to_images)
        backend._understanding_inputs = timed("inputs", backend._understanding_inputs)
        trainer._judge = timed("judge", trainer._judge)
        trainer.train()
    per_round = []
    for r, t in enumerate(spent):
        total = sum(timer.durations[r * spg:(r + 1) * spg])
        phases = [
            ("generate: image tokens (fast decoder, CFG 5)", t["generate"] - t["decode"]),
            ("generate: VQ decode to images", t["decode"]),
            ("judge: host preparation", t["inputs"]),
            ("judge: forwards, read-back, reward maps", t["judge"] - t["inputs"]),
            (f"train: {spg} steps x {batch} images (guided loss)", total - t["generate"] - t["judge"]),
        ]
        per_round.append(dict(total_s=total, phases=[dict(phase=name, seconds=s, share=s / total)
                                                     for name, s in phases]))
    trainer.accelerator.free_memory()
    return dict(images=images, batch=batch, steps=spg, lora=lora, rounds=per_round, step_s=timer.durations,
                peak_gib=jj.peak_gib(device), judge_questions=trainer.judge.stats["questions"] // len(spent),
                decode_compile=repr(backend.compile_decode))


def guarded(label, fn) -> dict:
    """`fn()`, or a row holding its error (out of memory, ...), so that the other rows still run and get written."""
    import traceback

    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        return dict(variant=label, error=f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")


# --------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b", choices=["1b", "7b"])
    parser.add_argument("--batch", type=int, default=16, help="images per training step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--prompt-words", type=int, default=24, help="words per prompt")
    parser.add_argument("--variants", default="baseline,full,full_cond,lora",
                        help="comma-separated: baseline, full (guided), full_cond (conditional), lora (guided)")
    parser.add_argument("--iteration-images", type=int, default=64, help="images of the SRUM iteration")
    parser.add_argument("--iteration-peft", default="lora", choices=["lora", "full"])
    parser.add_argument("--iteration-rounds", type=int, default=2,
                        help="rounds of the iteration (the first pays the one-time costs)")
    parser.add_argument("--skip-iteration", action="store_true", help="skip the generate -> judge -> train rounds")
    parser.add_argument("--profile", type=int, default=0,
                        help="after the timed steps, profile this many steps of each trainer variant (top operators)")
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU (plumbing check)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device, dtype, size = jj.device_setup(args, parser)
    batch, warmup, steps = (4, 2, 2) if args.smoke else (args.batch, args.warmup, args.steps)
    images = 8 if args.smoke else args.iteration_images
    if images % batch:
        parser.error(f"--iteration-images ({images}) must be a multiple of --batch ({batch})")
    peak = jj.matmul_rate(device, dtype, 8192 if device.type == "cuda" else 256, repeat=20)
    nominal = jj.NOMINAL_BF16_TFLOPS * 1e12
    info = jj.environment(device, dtype, model=size, batch=batch, warmup_steps=warmup, timed_steps=steps,
                          measured_matmul_tflops=peak / 1e12, nominal_bf16_tflops=jj.NOMINAL_BF16_TFLOPS,
                          flops_formula=FLOPS_FORMULA, smoke=args.smoke)
    print(f"{info['device']}: matmul {peak / 1e12:.1f} TFLOP/s measured (nominal dense bf16 {nominal / 1e12:.0f})",
          flush=True)

    variants = {"baseline": None, "full": ("srum full (guided)", "guided", False),
                "full_cond": ("srum full (conditional)", "conditional", False),
                "lora": ("srum lora r16 (guided)", "guided", True)}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(names) - set(variants):
        parser.error(f"unknown variant(s) {sorted(set(names) - set(variants))}")
    results = []
    for name in names:
        jj.release(device)
        if name == "baseline":
            row = guarded(name, lambda: run_baseline(size, device, dtype, batch, warmup, steps, args.prompt_words))
        else:
            label, guidance, lora = variants[name]
            row = guarded(label, lambda: run_trainer(label, size, device, dtype, batch, warmup, steps,
                                                     args.prompt_words, guidance, lora, args.profile))
        results.append(row)
        if "error" in row:
            continue
        row.update(batch=batch, tokens_per_s=row["rows"] * row["length"] / row["step_s"],
                   image_tokens_per_s=batch * row["image_tokens"] / row["step_s"],
                   tflops_6n=row["flops_6n"] / row["step_s"] / 1e12, mfu_6n=row["flops_6n"] / row["step_s"] / peak,
                   mfu_4n2t=row["flops_4n2t"] / row["step_s"] / peak,
                   mfu_6n_nominal=row["flops_6n"] / row["step_s"] / nominal)
        print(f"{row['variant']}: {1e3 * row['step_s']:.1f} ms/step, MFU {100 * row['mfu_6n']:.1f}%", flush=True)

    iteration = None
    if not args.skip_iteration:
        jj.release(device)
        iteration = guarded("iteration", lambda: run_iteration(size, device, dtype, batch, images, args.prompt_words,
                                                               args.iteration_peft == "lora", args.iteration_rounds))

    print()
    print(jj.markdown(("variant", "rows/step", "ms/step", "tok/s", "img tok/s", "TFLOP/s (6N)", "MFU (6N)",
                       "MFU (4N+2Nt)", "MFU vs 989", "peak GiB", "trainable"), [
        (r["variant"], r["rows"], f"{1e3 * r['step_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
         f"{r['image_tokens_per_s']:,.0f}", f"{r['tflops_6n']:.1f}", f"{100 * r['mfu_6n']:.1f}%",
         f"{100 * r['mfu_4n2t']:.1f}%", f"{100 * r['mfu_6n_nominal']:.1f}%",
         r["peak_gib"] if r["peak_gib"] is not None else "-", f"{r['trainable_params'] / 1e6:.1f}M")
        if "error" not in r else (r["variant"], r["error"]) + ("",) * 9 for r in results]))
    ours = [r for r in results if r["variant"].startswith("srum") and "error" not in r]
    print(f"\nMFU against the measured matmul peak ({peak / 1e12:.1f} TFLOP/s); targets: baseline ~46%, "
          "trainer >= 40%: " + ", ".join(f"{r['variant']} {'met' if r['mfu_6n'] >= 0.40 else 'NOT met'}" for r in ours))
    for r in results:
        if "profile" in r:
            prof = r["profile"]
            print(f"\nprofile of {r['variant']}: {prof['device_ms_per_step']:.1f} ms of operator time per step "
                  f"({prof['by']})")
            print(jj.markdown(("operator", "ms / step", "calls / step", "share"), [
                (op["name"][:70], f"{op['ms_per_step']:.2f}", f"{op['calls_per_step']:.0f}",
                 f"{100 * op['share']:.1f}%") for op in prof["ops"][:15]]))
    if iteration and "error" in iteration:
        print(f"\nSRUM iteration failed: {iteration['error']}")
    elif iteration:
        print(f"\nSRUM iteration: {iteration['images']} images per round, {iteration['steps']} steps of "
              f"{iteration['batch']}, {'LoRA' if iteration['lora'] else 'full'}, {iteration['judge_questions']} judge "
              f"questions per round, peak {iteration['peak_gib'] if iteration['peak_gib'] is not None else '-'} GiB")
        for r, rnd in enumerate(iteration["rounds"], 1):
            print(f"\nround {r}" + (" (first of the process: one-time costs included)" if r == 1 else ""))
            print(jj.markdown(("phase", "s", "share", "img/s"), [
                (p["phase"], f"{p['seconds']:.2f}", f"{100 * p['share']:.0f}%",
                 f"{iteration['images'] / p['seconds']:.1f}" if p["seconds"] > 0 else "-") for p in rnd["phases"]]
                + [("total", f"{rnd['total_s']:.2f}", "100%", f"{iteration['images'] / rnd['total_s']:.1f}")]))
    payload = dict(info=info, results=results, iteration=iteration)
    jj.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
