"""What a checkpoint must hold, beyond transformers' own files, for a resumed run to continue the uninterrupted one
exactly, and the choice of the checkpoint to resume from.

transformers saves the weights, optimizer, scheduler, RNG states and `trainer_state.json`. A self-rewarding trainer
also carries, per process:

- the micro-step counter, which seeds the rollouts and the loss noise (see [`derive_seed`]);
- the rollout round being consumed: with `steps_per_generation > 1` a checkpoint can fall inside a round, whose
  rollouts were sampled by the weights of the round's start, which no checkpoint holds;
- what was measured since the last log (the trainers' metric lists, the running loss), so that the next logged values
  cover the same steps as in the uninterrupted run.

They go to `trainer_extra_state_{process}.safetensors` in the checkpoint (tensors as tensors, the rest as JSON in
the file's metadata): written next to transformers' `rng_state*.pth` and read back where transformers restores those.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from ..models import Rollout

STATE_FILE = "trainer_extra_state_{}.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MASK64 = (1 << 64) - 1
_STREAMS = ("rollout", "loss", "eval_rollout", "eval_loss")


def _splitmix64(value: int) -> int:
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, process_index: int, step: int, stream: str = "rollout", num_processes: int = 1) -> int:
    """The seed of one random draw of a run with seed `seed`: a different one for every stream ("rollout", "loss",
    "eval_rollout", "eval_loss"), process and micro-step.

    torch's CPU generator keeps only the low 32 bits of a seed, so the seed is a 32-bit number: the stream (2 bits),
    the process (as many bits as `num_processes` needs) and the step (the remaining bits, 30 - those; the step wraps
    around only after 2**27 micro-steps on 8 processes) fill disjoint bits, XOR-ed with a hash of `seed`. For one run
    seed no two (stream, process, step) share a seed; other run seeds move every stream.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"derive_seed: process_index {process_index} outside 0..{num_processes - 1}.")
    process_bits = max(1, (num_processes - 1).bit_length())
    step_bits = 30 - process_bits
    if step_bits < 8:
        raise ValueError(f"derive_seed: {num_processes} processes leave too few bits for the step.")
    packed = (_STREAMS.index(stream) << 30) | (process_index << step_bits) | (step % (1 << step_bits))
    return packed ^ (_splitmix64(int(seed)) & 0xFFFFFFFF)


# --------------------------------------------------------------------------------------------- extra state
def _pack(value, key: str, tensors: dict):
    """JSON-able description of `value`; its tensors go to `tensors` under keys derived from `key`."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, Rollout):
        fields = {}
        for f in dataclasses.fields(Rollout):
            if f.name in ("images", "pixels"):  # the pictures: only judging reads them, and judging is done
                continue
            fields[f.name] = _pack(getattr(value, f.name), f"{key}.{f.name}", tensors)
        return {"rollout": fields}
    if isinstance(value, dict):
        return {"dict": {k: _pack(v, f"{key}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, Rollout, dict)) for v in value):
        return {"list": [_pack(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    return {"json": list(value) if isinstance(value, tuple) else value}


def _unpack(desc, tensors: dict):
    if "tensor" in desc:
        return tensors[desc["tensor"]]
    if "rollout" in desc:
        fields = {name: _unpack(d, tensors) for name, d in desc["rollout"].items()}
        fields["grid"] = tuple(fields["grid"])
        return Rollout(images=[None] * len(fields["prompts"]), **fields)
    if "dict" in desc:
        return {k: _unpack(v, tensors) for k, v in desc["dict"].items()}
    if "list" in desc:
        return [_unpack(v, tensors) for v in desc["list"]]
    return desc["json"]


def save_extra_state(folder: str, process_index: int, state: dict) -> None:
    """Write `state` (JSON values, tensors, [`Rollout`]s, nested in dicts and lists) for one process."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    desc = _pack(state, "state", tensors)
    path = os.path.join(folder, STATE_FILE.format(process_index))
    save_file(tensors, path + ".tmp", metadata={"state": json.dumps(desc)})
    os.replace(path + ".tmp", path)


def load_extra_state(folder: str, process_index: int) -> dict | None:
    """The state [`save_extra_state`] wrote for this process, or None when the checkpoint has none."""
    from safetensors import safe_open

    path = os.path.join(folder, STATE_FILE.format(process_index))
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            desc = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is unreadable ({error}); the checkpoint is damaged: resume from an earlier "
                         "one.") from error
    return _unpack(desc, tensors)


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_is_complete(folder: str) -> bool:
    """Whether `folder` is a finished checkpoint: transformers writes `trainer_state.json` last, so a run killed
    while saving leaves a folder without it (or with it empty)."""
    path = os.path.join(folder, "trainer_state.json")
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_resume(resume_from_checkpoint, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: None (start afresh), a path, or True / "true" / "last" for the last
    complete checkpoint in `output_dir`. Raises a `ValueError` naming the problem for a missing or incomplete one."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str) and not os.path.exists(resume_from_checkpoint):
        if resume_from_checkpoint.lower() in ("true", "last"):
            resume_from_checkpoint = True
        else:
            raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r}: no such folder.")
    if resume_from_checkpoint is True:
        found = checkpoints(output_dir)
        complete = [c for c in found if checkpoint_is_complete(c)]
        if not complete:
            raise ValueError(f"resume_from_checkpoint: no complete checkpoint in output_dir {output_dir!r}"
                             + (f" (incomplete: {[os.path.basename(c) for c in found]})." if found else "."))
        return complete[-1]
    path = str(resume_from_checkpoint)
    if not checkpoint_is_complete(path):
        earlier = [c for c in checkpoints(os.path.dirname(os.path.normpath(path))) if checkpoint_is_complete(c)]
        hint = f" Resume from {earlier[-1]!r} instead." if earlier else ""
        raise ValueError(f"resume_from_checkpoint={path!r} is not a complete checkpoint (no readable "
                         f"trainer_state.json: the run was stopped while saving it?).{hint}")
    return path


def check_output_dir(output_dir: str, overwrite_output_dir: bool) -> None:
    """Refuse to start a new run in an `output_dir` that holds checkpoints of an earlier one: they would be mixed
    with the new ones and, with `save_total_limit`, deleted."""
    found = checkpoints(output_dir)
    if found and not overwrite_output_dir:
        names = ", ".join(os.path.basename(c) for c in found[-3:])
        raise ValueError(
            f"output_dir {output_dir!r} already holds checkpoints of an earlier run ({names}); a new run there would "
            "mix its checkpoints with them and, with save_total_limit, delete them. Resume it with "
            "--resume_from_checkpoint true (trainer.train(resume_from_checkpoint=True)), choose another output_dir, "
            "or pass --overwrite_output_dir true to train there anyway."
        )
