"""Reading prompt files: plain text (one prompt per line), a JSON list, or JSONL of {"prompt", ...} records."""

from __future__ import annotations

import json
import os

from datasets import Dataset, load_from_disk


def load_prompts(path: str) -> list[str]:
    """Prompts of a file, in order. `.json`: a list of strings or of {"prompt": ...}; `.jsonl`: one record per
    line; anything else: one prompt per line. A trailing newline is fine; an empty line in the middle is an error
    (line numbers name output files, so prompts are never silently skipped)."""
    if not os.path.isfile(path):
        raise ValueError(f"Prompt file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list.")
    elif path.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = text.splitlines()
        while records and not records[-1].strip():
            records.pop()
    prompts = []
    for i, record in enumerate(records):
        prompt = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: entry {i} has no prompt text ({record!r}).")
        prompts.append(prompt.strip())
    if not prompts:
        raise ValueError(f"{path} holds no prompt.")
    return prompts


def load_prompt_dataset(path: str, allow_partial_rollouts: bool = False) -> Dataset:
    """A dataset with a "prompt" column from a prompt file, a `save_to_disk` folder or a rollout store (checked
    by [`load_rollouts`]; a partial store is refused unless `allow_partial_rollouts`)."""
    if os.path.isdir(path):
        from .rollouts import MANIFEST, _shard_indices, load_rollouts

        if os.path.exists(os.path.join(path, MANIFEST)) or _shard_indices(path):
            return load_rollouts(path, allow_partial=allow_partial_rollouts)
        return load_from_disk(path)
    return Dataset.from_dict({"prompt": load_prompts(path)})
