"""The rollout store: shards, resume after a kill with nothing lost or duplicated, the manifest that refuses other
settings, damaged shards, partial stores, prompt groups; prompt files."""

import json
import os

import pytest
import torch

from srum_trl import UMMJudgeRewardFunction
from srum_trl.data import build_rollouts, load_rollouts, reward_map_from_row
from srum_trl.data.prompts import load_prompt_dataset, load_prompts
from srum_trl.models import GenerationConfig
from srum_trl.warn import SRUMTrlWarning

PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")] + ["a red triangle"]
CONFIG = GenerationConfig(guidance=3.0)


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


def _build(backend, out, prompts=PROMPTS[:4], config=CONFIG, judge=None, **kw):
    kw.setdefault("shard_size", 2)
    return build_rollouts(backend, prompts, judge or UMMJudgeRewardFunction(), str(out), config, progress=False, **kw)


def test_resume_after_kill_loses_and_duplicates_nothing(tiny_backend, tmp_path):
    prompts = PROMPTS[:3]
    ref = _build(tiny_backend, tmp_path / "ref", prompts, seed=5)
    out = str(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_backend, out, prompts, judge=_KillAfter(2), seed=5)
    assert sorted(n for n in os.listdir(out) if n.startswith("shard")) == ["shard-00000"]
    with pytest.raises(ValueError, match=r"partial: 1 of its 2 shards .*missing shard-00001\)"):
        load_rollouts(out)  # training on it would silently use 2 of the 3 prompts
    with pytest.warns(SRUMTrlWarning, match="partial"):
        assert len(load_rollouts(out, allow_partial=True)) == 2
    resumed = _build(tiny_backend, out, prompts, seed=5)
    assert resumed["prompt"] == prompts  # shards of 2 and 1 -- in order, none twice
    assert list(resumed["tokens"]) == list(ref["tokens"])  # the same images as an uninterrupted run
    assert list(resumed["reward"]) == pytest.approx(list(ref["reward"]))
    row = resumed[0]
    assert row["image"].size == (32, 32) and len(row["token_map"]) == 4 and len(row["regions"]) == 4
    m = reward_map_from_row(row)
    assert m.global_score == pytest.approx(row["global_score"])


def test_the_manifest_records_what_made_the_store_and_refuses_other_settings(tiny_backend, tmp_path):
    out = tmp_path / "store"
    _build(tiny_backend, out, PROMPTS[:2], source={"model": "some/folder", "adapter": None})
    manifest = json.load(open(out / "rollout_config.json"))
    assert manifest["model"]["family"] == "JanusBackend" and manifest["model"]["dtype"] == "float32"
    assert manifest["model"]["image_size"] == 32 and manifest["model"]["token_grid"] == [4, 4]
    assert (manifest["guidance"], manifest["temperature"], manifest["top_k"], manifest["seed"]) == (3.0, 1.0, None, 0)
    assert manifest["num_generations"] == 1 and manifest["source"]["model"] == "some/folder"
    for change, message in [
        ({"config": GenerationConfig(guidance=2.0)}, "guidance: 3.0 in the folder, 2.0 now"),
        ({"config": GenerationConfig(guidance=3.0, temperature=0.7)}, "temperature"),
        ({"config": GenerationConfig(guidance=3.0, top_k=5)}, "top_k"),
        ({"seed": 1}, "seed"),
        ({"num_generations": 2}, "num_generations"),
        ({"judge": UMMJudgeRewardFunction(map_rule="signed")}, "judge.map_rule"),
        ({"prompts": PROMPTS[1:3]}, "prompts_sha256"),
    ]:
        with pytest.raises(ValueError, match=f"other settings(.|\n)*{message}"):
            _build(tiny_backend, out, **{"prompts": PROMPTS[:2], **change})
    assert json.load(open(out / "rollout_config.json")) == manifest  # untouched


def test_store_refuses_another_adapter_or_dtype(tiny_backend, tmp_path):
    from peft import LoraConfig, get_peft_model

    out = tmp_path / "store"
    _build(tiny_backend, out, PROMPTS[:2], source={"adapter": None})
    model = tiny_backend.model
    tiny_backend.model = get_peft_model(model, LoraConfig(r=2, target_modules=tiny_backend.default_lora_targets()))
    with torch.no_grad():
        for name, param in tiny_backend.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    with pytest.raises(ValueError, match="model.weights"):  # today's rows would be mixed with the adapter's
        _build(tiny_backend, out, PROMPTS[:2], source={"adapter": "my-adapter"})
    tiny_backend.model = model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="model.dtype: 'float32' in the folder, 'bfloat16' now"):
        _build(tiny_backend, out, PROMPTS[:2])
    with pytest.raises(ValueError, match="shard_size"):
        _build(tiny_backend, tmp_path / "other", PROMPTS, shard_size=0)


def test_a_deleted_or_cut_manifest_is_not_recreated(tiny_backend, tmp_path):
    out = tmp_path / "store"
    _build(tiny_backend, out)
    manifest = out / "rollout_config.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    for call in (lambda: _build(tiny_backend, out), lambda: load_rollouts(str(out))):
        with pytest.raises(ValueError, match=f"{manifest} is not valid JSON"):
            call()
    os.remove(manifest)
    with pytest.raises(ValueError, match="holds rollout shards but no rollout_config.json"):
        _build(tiny_backend, out, config=GenerationConfig(guidance=2.0))  # would have been written from these flags
    assert not manifest.exists()
    for load in (load_rollouts, load_prompt_dataset):
        with pytest.raises(ValueError, match="no rollout_config.json"):
            load(str(out))


def test_a_damaged_shard_is_named_and_made_again(tiny_backend, tmp_path):
    out = tmp_path / "store"
    tokens = list(_build(tiny_backend, out, PROMPTS[:2], shard_size=1)["tokens"])  # read now: the dataset maps files
    arrow = next((out / "shard-00001").glob("*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="shard-00001 cannot be read"):
        load_rollouts(str(out))
    with pytest.warns(SRUMTrlWarning, match="shard-00001 cannot be read.*made again"):
        again = _build(tiny_backend, out, PROMPTS[:2], shard_size=1)
    assert list(again["tokens"]) == tokens and again["prompt"] == PROMPTS[:2]


def test_load_checks_counts_against_the_manifest(tiny_backend, tmp_path):
    out = tmp_path / "store"
    _build(tiny_backend, out, PROMPTS[:3])  # shards of 2 and 1 rows
    os.rename(out / "shard-00000", tmp_path / "first")
    os.rename(out / "shard-00001", out / "shard-00000")
    with pytest.raises(ValueError, match="shard-00000 holds 1 rows instead of 2"):
        load_rollouts(str(out))
    os.rename(out / "shard-00000", out / "shard-00001")
    os.rename(tmp_path / "first", out / "shard-00002")
    with pytest.raises(ValueError, match="shard-00002, beyond the 2 shards"):
        load_rollouts(str(out))


def test_groups_of_images_per_prompt(tiny_backend, tmp_path):
    store = _build(tiny_backend, tmp_path / "store", PROMPTS[:3], num_generations=2)
    assert store["prompt"] == [p for p in PROMPTS[:3] for _ in range(2)]
    assert store["group"] == [0, 0, 1, 1, 2, 2]
    tokens = store["tokens"]
    assert all(tokens[2 * g] != tokens[2 * g + 1] for g in range(3))  # two samples of one prompt, not one twice


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\na blue square\n\n")
    assert load_prompts(str(txt)) == ["a red circle", "a blue square"]
    (tmp_path / "p.json").write_text('["a red circle", {"prompt": "a blue square", "category": "x"}]')
    assert load_prompts(str(tmp_path / "p.json")) == ["a red circle", "a blue square"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n')
    assert load_prompt_dataset(str(tmp_path / "p.jsonl"))["prompt"] == ["a red circle", "a blue square"]
    (tmp_path / "gap.txt").write_text("a red circle\n\na blue square\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        load_prompts(str(tmp_path / "gap.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
