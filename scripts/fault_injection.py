"""Kill runs with SIGKILL at random points, resume them, and compare with the uninterrupted runs.

Three experiments, each on the command line as a user would run it (`python -m srum_trl.cli ...`, CPU, float32):

- rollout: `srum-trl rollout` into a store, killed while it generates and judges, then run again (it resumes the
  store); the store's rows must equal those of an uninterrupted run.
- train: `srum-trl train` (SRUM, LoRA, on-the-fly rollouts, `steps_per_generation 2`, a checkpoint every step, three
  epochs), killed at random points (inside rounds, during checkpoint writes), then resumed with
  `--resume_from_checkpoint true` (or started afresh with `--overwrite_output_dir true` when no checkpoint was
  complete); the logged losses and rewards of every step and the final adapter must equal the uninterrupted run's.
- grpo: the same with `srum-trl grpo` (`num_generations 2`).

A kill lands after the k-th checkpoint (or shard) appears, k one to three more than the run found when it started
(so never during start-up), plus a random delay shorter than one step (or shard) of the uninterrupted run:
kills fall inside rollout rounds, inside optimizer steps and inside checkpoint writes. Prints a table and writes JSON.

    python scripts/fault_injection.py --model shapes --kills 4 --steps 10 --prompts 16 --seeds 0,1,2 \
        --json docs/results/fault_injection_shapes.json
    python scripts/fault_injection.py --model tiny   # a random tiny Janus model instead of the ShapesWorld base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_COMPARED = ("timing/", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                 "total_flos")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="'shapes' (the shipped ShapesWorld base), 'tiny', or a folder.")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs per interrupted run (at most; a run may finish).")
    p.add_argument("--steps", type=int, default=6, help="Optimizer steps of the training runs.")
    p.add_argument("--prompts", type=int, default=8, help="Prompts of the rollout store.")
    p.add_argument("--seeds", default="0", help="Seeds of the kill schedules, comma-separated: one killed run per "
                   "seed and experiment (the runs themselves use seed 0).")
    p.add_argument("--experiments", default="rollout,train,grpo")
    p.add_argument("--work", default=None, help="Working folder (default: a temporary one, removed afterwards).")
    p.add_argument("--json", default=None, help="Write the result here.")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def model_folder(name: str, work: str) -> str:
    if name == "shapes":
        from srum_trl.shapes.assets import base_model_path

        return base_model_path()
    if name == "tiny":
        from srum_trl.models import JanusBackend
        from srum_trl.models.janus import build_tiny_janus

        path = os.path.join(work, "tiny-janus")
        words = "a red green blue circle square triangle and does this image show is there here yes no".split()
        JanusBackend(*build_tiny_janus(words, seed=0)).save_pretrained(path)
        return path
    return name


def prompt_file(name: str, work: str, n: int) -> str:
    if name == "shapes":
        from srum_trl.shapes.world import train_prompts

        prompts = train_prompts()[:n]
    else:
        colours, shapes = ("red", "green", "blue"), ("circle", "square", "triangle")
        prompts = [f"a {c} {s}" for c in colours for s in shapes][:n]
    path = os.path.join(work, "prompts.txt")
    with open(path, "w") as f:
        f.write("\n".join(prompts) + "\n")
    return path


def commands(model: str, prompts: str, steps: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "srum_trl.cli"]
    common = ["--model_name_or_path", model, "--prompts", prompts, "--max_prompts", "4", "--max_steps", str(steps),
              "--per_device_train_batch_size", "2", "--steps_per_generation", "2", "--use_peft", "--lora_r", "4",
              "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "1",
              "--report_to", "none", "--guidance_scale", "2", "--seed", "0", "--dtype", "float32",
              "--dataloader_num_workers", "0"]
    return {
        "rollout": cli + ["rollout", "--model", model, "--prompts", prompts, "--shard_size", "2", "--seed", "0",
                          "--guidance_scale", "2", "--batch_size", "2"],
        "train": cli + ["train"] + common,
        "grpo": cli + ["grpo"] + common + ["--num_generations", "2"],
    }


def run(cmd: list[str], log: str, kill_after=None, progress=None, rng=None, max_delay=0.0) -> dict:
    """Run `cmd` to its end, or SIGKILL it a random delay (below `max_delay`) after `progress()` reaches
    `kill_after`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        event = {"killed": False}
        if kill_after is not None:
            while proc.poll() is None and progress() < kill_after:
                time.sleep(0.02)
            if proc.poll() is None:
                delay = rng.uniform(0.0, max_delay)
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    event = {"killed": True, "after": kill_after, "delay_s": round(delay, 3)}
        proc.wait()
    event["returncode"] = proc.returncode
    return event


def _checkpoints(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def _complete(out: str, name: str) -> bool:
    try:
        with open(os.path.join(out, name, "trainer_state.json")) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def _step_time(folder: str, names: list[str]) -> float:
    """The median time between consecutive checkpoints (or shards) of a finished run."""
    times = sorted(os.path.getmtime(os.path.join(folder, n)) for n in names)
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2] if gaps else 1.0


def _shard_names(out: str) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("shard-") and not n.endswith(".tmp"))


def _shards(out: str) -> int:
    return len([n for n in os.listdir(out) if n.startswith("shard-") and not n.endswith(".tmp")]) if os.path.isdir(
        out) else 0


def _rows(store: str) -> list[dict]:
    import numpy as np

    from srum_trl.data import load_rollouts

    rows = []
    for row in load_rollouts(store):
        row = dict(row)
        if "image" in row:
            row["image"] = np.asarray(row["image"]).tobytes()
        rows.append(row)
    return rows


def _logged(out: str, steps: int) -> dict[int, dict]:
    with open(os.path.join(out, f"checkpoint-{steps}", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return {e["step"]: {k: v for k, v in e.items() if not k.startswith(_NOT_COMPARED)} for e in history if "loss" in e}


def _adapter(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter_model.safetensors"))


def _differences(a: dict, b: dict) -> list[str]:
    diffs = []
    for step in sorted(set(a) | set(b)):
        x, y = a.get(step), b.get(step)
        if x is None or y is None or x.keys() != y.keys():
            diffs.append(f"step {step}: keys differ")
            continue
        for k in x:
            same = x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k]))
            if not same:
                diffs.append(f"step {step} {k}: {x[k]} vs {y[k]}")
    return diffs


def killed_run(name: str, cmd: list[str], ref: str, out: str, log: str, args, rng, step_s: float) -> dict:
    """Run into `out`, killing and resuming, until a run finishes; compare with the uninterrupted run in `ref`."""
    flag = "--out" if name == "rollout" else "--output_dir"
    total = args.prompts // 2 if name == "rollout" else args.steps
    progress = (lambda: _shards(out)) if name == "rollout" else (lambda: len(_checkpoints(out)))
    events = []
    while True:
        extra = []
        if name == "rollout" and events:
            events[-1]["left"] = {"shards": _shards(out),
                                  "partial": sorted(n for n in os.listdir(out) if n.endswith(".tmp"))}
        if name != "rollout" and _checkpoints(out):
            complete = [c for c in _checkpoints(out) if _complete(out, c)]
            extra = ["--resume_from_checkpoint", "true"] if complete else ["--overwrite_output_dir", "true"]
            events[-1]["checkpoints_left"] = {"complete": complete,
                                              "incomplete": [c for c in _checkpoints(out) if c not in complete]}
        start = progress()
        killing = sum(e["killed"] for e in events) < args.kills and start + 1 <= total - 1
        target = min(total - 1, start + rng.randint(1, 3)) if killing else None
        event = run(cmd + [flag, out] + extra, log, target, progress, rng, step_s)
        event["resumed_with"] = extra
        events.append(event)
        if not event["killed"]:
            break
    result = {"kills": sum(e["killed"] for e in events), "runs": len(events), "events": events}
    if events[-1]["returncode"] != 0:
        return {**result, "passed": False, "differences": [f"the last run failed (exit {events[-1]['returncode']})"]}
    if name == "rollout":
        a, b = _rows(ref), _rows(out)
        result["rows_compared"] = len(a)
        result["differences"] = [f"row {i}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(a) != len(b):
            result["differences"].append(f"{len(a)} vs {len(b)} rows")
    else:
        logged_ref, logged_out = _logged(ref, args.steps), _logged(out, args.steps)
        result["steps_compared"] = len(logged_ref)
        result["differences"] = _differences(logged_ref, logged_out)
        x, y = _adapter(ref), _adapter(out)
        result["adapter_tensors"] = len(x)
        result["adapter_equal"] = x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)
        if not result["adapter_equal"]:
            result["differences"].append("final adapter differs")
    result["passed"] = not result["differences"]
    return result


def experiment(name: str, cmd: list[str], work: str, args, model: str, prompts: str) -> dict:
    """The uninterrupted run, then one killed-and-resumed run per kill seed, each compared with it."""
    log = os.path.join(work, f"{name}.log")
    ref = os.path.join(work, f"{name}-reference")
    t0 = time.perf_counter()
    first = run(cmd + ["--out" if name == "rollout" else "--output_dir", ref], log)
    reference_s = time.perf_counter() - t0
    if first["returncode"] != 0:
        raise SystemExit(f"the uninterrupted {name} run failed; see {log}")
    step_s = _step_time(ref, _shard_names(ref) if name == "rollout" else _checkpoints(ref))
    shown = [{model: f"<{args.model} model>", prompts: "<prompts.txt>"}.get(a, a) for a in cmd[3:]]
    result = {"experiment": name, "command": " ".join(["srum-trl"] + shown),
              "uninterrupted_s": round(reference_s, 1), "step_s": round(step_s, 3)}
    if name != "rollout":
        result["keys_compared"] = sorted({k for v in _logged(ref, args.steps).values() for k in v})
    result["schedules"] = []
    for seed in args.seeds:
        out = os.path.join(work, f"{name}-killed-{seed}")
        result["schedules"].append({"seed": seed, **killed_run(name, cmd, ref, out, log, args,
                                                               random.Random(f"{name}-{seed}"), step_s)})
    result["passed"] = all(r["passed"] for r in result["schedules"])
    return result


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    work = args.work or tempfile.mkdtemp(prefix="fault-injection-")
    os.makedirs(work, exist_ok=True)
    try:
        model, prompts = model_folder(args.model, work), prompt_file(args.model, work, args.prompts)
        cmds = commands(model, prompts, args.steps)
        results = [experiment(name, cmds[name], work, args, model, prompts) for name in args.experiments.split(",")]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'experiment':<10} {'seed':>4} {'kills':>5} {'runs':>4} {'compared':>8} {'identical':>9}")
    for r in results:
        for k in r["schedules"]:
            compared = k.get("rows_compared", k.get("steps_compared", 0))
            print(f"{r['experiment']:<10} {k['seed']:>4} {k['kills']:>5} {k['runs']:>4} {compared:>8} "
                  f"{str(k['passed']):>9}")
            for d in k["differences"][:5]:
                print(f"    {d}")
    summary = {"model": args.model, "seeds": args.seeds, "kills_per_run": args.kills, "steps": args.steps,
               "prompts": args.prompts, "passed": all(r["passed"] for r in results), "experiments": results,
               "command": "python scripts/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
