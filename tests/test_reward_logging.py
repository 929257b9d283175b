"""Rewards inside the trainers: SRUM's weighted mean of plain rewards (`reward_weights`), the dataset's columns passed
to reward functions, and reward-map pictures sent to a real local trackio run (no network)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from datasets import Dataset

from srum_trl import SRUMConfig, SRUMTrainer, UMMJudgeRewardFunction
from srum_trl.models import GenerationConfig
from srum_trl.trainers.common import weighted_nanmean


def test_weighted_nanmean_by_hand():
    assert weighted_nanmean([1.0, -1.0], [3.0, 1.0]) == pytest.approx(0.5)             # (3 - 1) / 4
    assert weighted_nanmean([1.0, float("nan")], [3.0, 1.0]) == pytest.approx(1.0)     # NaN left out, weights too
    assert math.isnan(weighted_nanmean([float("nan")], [1.0]))
    assert math.isnan(weighted_nanmean([1.0], [0.0]))


def test_srum_reward_weights_and_dataset_columns(tiny_janus, tmp_path):
    model, processor = tiny_janus
    seen = {}

    def by_column(prompts, completions, target=None, trainer_state=None, **kwargs):
        seen["target"], seen["state"] = target, trainer_state
        return [1.0 if t == "yes" else -1.0 for t in target]

    def half(prompts, completions, **kwargs):
        return [0.5] * len(prompts)

    data = Dataset.from_dict({"prompt": ["a red circle", "a blue square"] * 2, "target": ["yes", "no"] * 2})
    args = SRUMConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_steps=1, bf16=False,
                      report_to=[], save_strategy="no", guidance_scale=3.0, reward_weights=[3.0, 1.0])
    trainer = SRUMTrainer(model, reward_funcs=[UMMJudgeRewardFunction(use_local=False), by_column, half], args=args,
                          train_dataset=data, processing_class=processor)
    rollout = trainer.backend.generate(["a red circle", "a blue square"], GenerationConfig(guidance=3.0), seed=0)
    _, rewards = trainer._judge(rollout, "train", {"target": ["yes", "no"]})
    assert rewards == pytest.approx([(3 * 1 + 0.5) / 4, (3 * -1 + 0.5) / 4])
    assert seen["target"] == ["yes", "no"] and seen["state"] is trainer.state
    trainer.train()  # the columns reach the reward functions from the dataloader too
    assert seen["target"] in (["yes", "no"], ["no", "yes"], ["yes", "yes"], ["no", "no"])
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 plain reward functions"):
        SRUMTrainer(model, reward_funcs=[by_column, half], train_dataset=data, processing_class=processor,
                    args=SRUMConfig(output_dir=str(tmp_path / "p"), report_to=[], bf16=False, reward_weights=[1.0]))


_TRACKIO_RUN = """
import json, os, sys
from datasets import Dataset
from srum_trl import SRUMConfig, SRUMTrainer
from srum_trl.models.janus import build_tiny_janus

model, processor = build_tiny_janus("a red blue circle square does this image show yes no".split(), seed=0)
args = SRUMConfig(output_dir=sys.argv[1], per_device_train_batch_size=2, max_steps=2, logging_steps=1, bf16=False,
                  report_to=["trackio"], project="srum-test", run_name="tiny", save_strategy="no",
                  guidance_scale=3.0, save_reward_maps=2, trackio_static_space_id=False)
trainer = SRUMTrainer(model, args=args, processing_class=processor,
                      train_dataset=Dataset.from_dict({"prompt": ["a red circle", "a blue square"] * 2}))
trainer.train()
import trackio
runs = trackio.Api().runs("srum-test")
print(json.dumps({"runs": [r.name for r in runs]}))
"""


def test_trackio_run_gets_metrics_and_reward_map_images(tmp_path):
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_TRACKIO_RUN))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["runs"] == ["tiny"]
    # two logging steps x two pictures: PNGs in output_dir and images in trackio's media folder
    assert len(os.listdir(tmp_path / "out" / "reward_maps")) == 4
    media = [f for _, _, files in os.walk(tmp_path / "trackio" / "media") for f in files]
    assert len(media) == 4 and all(f.endswith((".png", ".jpg", ".jpeg", ".webp")) for f in media)
    import sqlite3

    dbs = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "trackio") for f in files if f.endswith(".db")]
    assert dbs
    rows = sqlite3.connect(dbs[0]).execute("select metrics from metrics").fetchall()
    logged = [json.loads(r[0]) for r in rows]
    assert any("train/reward" in m for m in logged)
    assert sum(1 for m in logged for k in m if k.startswith("reward_maps/")) == 4


def test_another_vlm_judges_srum_and_grpo_with_its_region_maps(tiny_janus, tmp_path):
    """A VLMJudgeReward (a tiny random LLaVA) is SRUM's judge, maps included, and GRPO's dense-advantage judge."""
    from srum_trl import GRPOUMMConfig, GRPOUMMTrainer
    from srum_trl.rewards import VLMJudgeReward

    from tiny_hf import tiny_llava

    model, processor = tiny_janus
    judge = VLMJudgeReward(tiny_llava(tmp_path / "llava"), region_proposer="grid", device="cpu")
    data = Dataset.from_dict({"prompt": ["a red circle", "a blue square"] * 2})
    args = SRUMConfig(output_dir=str(tmp_path / "s"), per_device_train_batch_size=2, max_steps=1, bf16=False,
                      report_to=[], save_strategy="no", guidance_scale=3.0, save_reward_maps=1, logging_steps=1)
    trainer = SRUMTrainer(model, reward_funcs=judge, args=args, train_dataset=data, processing_class=processor)
    assert trainer.judge is judge and judge.backend is not trainer.backend  # binding keeps the other model
    trainer.train()
    rollout, maps = trainer._last_round
    assert [m.token_map.shape for m in maps] == [tuple(rollout.grid)] * 2 and all(len(m.regions) == 4 for m in maps)
    assert os.listdir(tmp_path / "s" / "reward_maps")
    grpo = GRPOUMMTrainer(model, reward_funcs=[judge], processing_class=processor, train_dataset=data,
                          args=GRPOUMMConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=2,
                                             num_generations=2, max_steps=1, bf16=False, report_to=[],
                                             save_strategy="no", guidance_scale=3.0, advantage_mode="dense",
                                             save_reward_maps=1, logging_steps=1))
    grpo.train()
    assert os.listdir(tmp_path / "g" / "reward_maps")
