"""Reading prompt files: plain text (one prompt per line), a JSON list, or JSONL of {"prompt", ...} records."""

from __future__ import annotations

import json
import os

from datasets import Dataset, load_from_disk


def _read_text(path: str) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are named by line and column."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {column}: byte {data[error.start:error.start + 1]!r} is not "
                         "UTF-8. Save the file as UTF-8.") from None


def _without_trailing_blanks(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def load_prompts(path: str) -> list[str]:
    """Prompts of a file, in order. `.json`: a list of strings or of {"prompt": ...}; `.jsonl`: one record per
    line; anything else: one prompt per line. Trailing blank lines are fine; a blank line in the middle is an error,
    in `.jsonl` as in text files (line numbers name output files, so prompts are never silently skipped). Bytes that
    are not UTF-8 and malformed JSON are named by file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"Prompt file {path!r} does not exist.")
    text = _read_text(path)
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON "
                             f"({error.msg}).") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list.")
        where = [f"entry {i}" for i in range(len(records))]
    else:
        lines = _without_trailing_blanks(text.splitlines())
        where = [f"line {i + 1}" for i in range(len(lines))]
        for i, line in enumerate(lines):
            if not line.strip():
                raise ValueError(f"{path}: line {i + 1} is blank; every line up to the last must hold a prompt "
                                 "(line numbers name the output files). Remove the blank line.")
        if path.endswith(".jsonl"):
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {i + 1}, column {error.colno}: not a JSON record "
                                     f"({error.msg}).") from None
        else:
            records = lines
    prompts = []
    for record, at in zip(records, where):
        prompt = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: {at} has no prompt text ({record!r}); a record needs a non-empty \"prompt\".")
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
