"""Print the markdown table of SRUMConfig's own fields (docs/config.md is made from it).

    python scripts/config_table.py > docs/_config_table.md
"""

import dataclasses
import re

from transformers import TrainingArguments

from srum_trl import SRUMConfig


def field_docs(cls) -> dict[str, str]:
    """Field descriptions from the class docstring's `name (type, ...):` blocks."""
    docs, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"^\s{8}(\w+) \(`", line)
        if match:
            current = match.group(1)
            docs[current] = ""
        elif current and line.startswith(" " * 12):
            docs[current] += " " + line.strip()
        elif line.strip() == "":
            current = None
    return {k: v.strip() for k, v in docs.items()}


def main():
    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    docs = field_docs(SRUMConfig)
    print("| field | default | description |")
    print("|---|---|---|")
    for f in dataclasses.fields(SRUMConfig):
        own = f.name not in base
        changed = not own and f.default != base[f.name]
        if not (own or changed):
            continue
        text = docs.get(f.name) or f.metadata.get("help", "")
        marker = "" if own else " (TrainingArguments default changed)"
        print(f"| `{f.name}` | `{f.default!r}` | {text}{marker} |")


if __name__ == "__main__":
    main()
