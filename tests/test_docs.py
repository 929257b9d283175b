"""Documentation stays complete: every SRUMConfig field is in docs/config.md with its docstring entry."""

import dataclasses
import os

from transformers import TrainingArguments

from srum_trl import SRUMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_config_field_is_documented():
    own = {f.name for f in dataclasses.fields(SRUMConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    table = open(os.path.join(ROOT, "docs", "config.md")).read()
    missing_table = [name for name in own if f"`{name}`" not in table]
    missing_doc = [name for name in own if f"        {name} (`" not in SRUMConfig.__doc__]
    assert not missing_table, f"run scripts/config_table.py: {missing_table} missing from docs/config.md"
    assert not missing_doc, f"SRUMConfig docstring lacks {missing_doc}"
