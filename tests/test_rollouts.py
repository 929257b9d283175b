"""The rollout store: shards, resume after a kill with nothing lost or duplicated, settings checks."""

import os

import pytest

from srum_trl import UMMJudgeRewardFunction
from srum_trl.data import build_rollouts, load_rollouts, reward_map_from_row
from srum_trl.data.prompts import load_prompt_dataset, load_prompts
from srum_trl.models import GenerationConfig

PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")] + ["a red triangle"]


class _KillAfter(UMMJudgeRewardFunction):
    """A judge that dies on its n-th call, like a run killed in the middle of a shard."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n, self.calls = n, 0

    def judge(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("killed")
        return super().judge(*args, **kwargs)


def test_resume_after_kill_loses_and_duplicates_nothing(tiny_backend, tmp_path):
    config = GenerationConfig(guidance=3.0)
    ref = build_rollouts(tiny_backend, PROMPTS, UMMJudgeRewardFunction(), str(tmp_path / "ref"), config,
                         seed=5, shard_size=3, progress=False)
    out = str(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        build_rollouts(tiny_backend, PROMPTS, _KillAfter(2), out, config, seed=5, shard_size=3, progress=False)
    assert sorted(n for n in os.listdir(out) if n.startswith("shard")) == ["shard-00000"]
    assert len(load_rollouts(out)) == 3
    resumed = build_rollouts(tiny_backend, PROMPTS, UMMJudgeRewardFunction(), out, config, seed=5, shard_size=3,
                             progress=False)
    assert resumed["prompt"] == PROMPTS  # 7 prompts: shards of 3, 3, 1 -- in order, none twice
    assert resumed["tokens"] == ref["tokens"]  # the same images as an uninterrupted run
    assert resumed["reward"] == pytest.approx(ref["reward"])
    row = resumed[0]
    assert row["image"].size == (32, 32) and len(row["token_map"]) == 4 and len(row["regions"]) == 4
    m = reward_map_from_row(row)
    assert m.global_score == pytest.approx(row["global_score"])


def test_store_refuses_other_settings(tiny_backend, tmp_path):
    out = str(tmp_path / "store")
    build_rollouts(tiny_backend, PROMPTS[:2], UMMJudgeRewardFunction(), out, GenerationConfig(guidance=3.0),
                   shard_size=2, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_rollouts(tiny_backend, PROMPTS[:2], UMMJudgeRewardFunction(), out, GenerationConfig(guidance=2.0),
                       shard_size=2, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        build_rollouts(tiny_backend, PROMPTS, UMMJudgeRewardFunction(), out, shard_size=0)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\na blue square\n\n")
    assert load_prompts(str(txt)) == ["a red circle", "a blue square"]
    (tmp_path / "p.json").write_text('["a red circle", {"prompt": "a blue square", "category": "x"}]')
    assert load_prompts(str(tmp_path / "p.json")) == ["a red circle", "a blue square"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n')
    assert load_prompt_dataset(str(tmp_path / "p.jsonl"))["prompt"] == ["a red circle", "a blue square"]
    (tmp_path / "gap.txt").write_text("a red circle\n\na blue square\n")
    with pytest.raises(ValueError, match="entry 1 has no prompt"):
        load_prompts(str(tmp_path / "gap.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
