"""Nothing a user made is lost or leaked: an output_dir holding checkpoints is not reused silently, incomplete
checkpoints are not resumed from, the rescue save of a failed run is written only when it holds progress and only
where it cannot hang, access tokens never reach a file, and both configs decide bf16 by one rule."""

import json
import logging
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from srum_trl import GRPOUMMConfig, SRUMConfig, SRUMTrainer

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tiny_janus, out, callbacks=None, **kw):
    from srum_trl.models.janus import build_tiny_janus

    from tests.conftest import WORDS

    model, processor = build_tiny_janus(WORDS, seed=0)  # a fresh model: PEFT wraps it in place
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, logging_steps=1, bf16=False,
                report_to=[], warmup_steps=0, learning_rate=1e-2, guidance_scale=3.0, save_strategy="steps",
                save_steps=1, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return SRUMTrainer(model, args=SRUMConfig(**base), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                       processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8), callbacks=callbacks)


def test_output_dir_with_checkpoints_is_refused(tiny_janus, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_janus, out).train()
    assert {"checkpoint-1", "checkpoint-2"} <= set(os.listdir(out))
    before = {p: os.path.getmtime(out / p / "trainer_state.json") for p in ("checkpoint-1", "checkpoint-2")}
    again = _trainer(tiny_janus, out, save_total_limit=1)
    with pytest.raises(ValueError, match="overwrite_output_dir.*|resume_from_checkpoint") as info:
        again.train()
    assert "overwrite_output_dir" in str(info.value) and "resume_from_checkpoint" in str(info.value)
    assert {p: os.path.getmtime(out / p / "trainer_state.json") for p in before} == before  # untouched
    _trainer(tiny_janus, out, max_steps=3).train(resume_from_checkpoint=True)  # resuming is allowed
    assert os.path.isdir(out / "checkpoint-3")
    _trainer(tiny_janus, out, overwrite_output_dir=True).train()  # so is asking for it


def test_resume_skips_an_incomplete_checkpoint(tiny_janus, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_janus, out).train()
    (out / "checkpoint-2" / "trainer_state.json").write_text("")  # killed while saving checkpoint-2
    with pytest.raises(ValueError, match="not a complete checkpoint.*checkpoint-1"):
        _trainer(tiny_janus, out).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    trainer = _trainer(tiny_janus, out)
    trainer.train(resume_from_checkpoint=True)
    assert trainer._train_start_step == 1  # resumed from checkpoint-1, the last complete one
    with pytest.raises(ValueError, match="no such folder"):
        _trainer(tiny_janus, out).train(resume_from_checkpoint=str(tmp_path / "nope"))


class _FailAt(TrainerCallback):
    def __init__(self, step, trainer_ref, sharded=False):
        self.step, self.trainer_ref, self.sharded = step, trainer_ref, sharded

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.sharded:  # as under FSDP, where saving gathers the shards of every process
                self.trainer_ref[0].is_fsdp_enabled = True
            raise RuntimeError("injected failure")


def test_rescue_save_keeps_progress(tiny_janus, tmp_path):
    ref = []
    trainer = _trainer(tiny_janus, tmp_path / "run", callbacks=[_FailAt(1, ref)], save_strategy="no")
    ref.append(trainer)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train()
    assert os.path.exists(tmp_path / "run" / "interrupted-step-1" / "adapter_model.safetensors")


def test_rescue_save_is_skipped_when_sharded(tiny_janus, tmp_path, caplog):
    ref = []
    trainer = _trainer(tiny_janus, tmp_path / "run", callbacks=[_FailAt(1, ref, sharded=True)], save_strategy="no")
    ref.append(trainer)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="injected"):
        trainer.train()
    assert not os.path.exists(tmp_path / "run" / "interrupted-step-1")
    assert "is not written" in caplog.text


def test_no_rescue_save_when_a_damaged_checkpoint_fails_to_load(tiny_janus, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_janus, out).train()
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(Exception):
        _trainer(tiny_janus, out, max_steps=3).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not [p for p in os.listdir(out) if p.startswith("interrupted")]


def test_tokens_never_reach_a_file(tiny_checkpoint, tmp_path):
    from srum_trl.cli import run_training

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    hub, init = "hf_SECRETHUBTOKEN4711", "hf_SECRETINITTOKEN0815"
    trainer = run_training(SRUMTrainer, SRUMConfig, [
                    "--model_name_or_path", tiny_checkpoint, "--prompts", str(prompts), "--output_dir", str(out),
                    "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_peft", "--lora_r", "4",
                    "--report_to", "none", "--save_steps", "1", "--guidance_scale", "3", "--hub_token", hub,
                    "--model_init_kwargs", json.dumps({"token": init})], "srum-trl train")
    files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
    assert any(f.endswith("training_args.bin") for f in files) and any("checkpoint-1" in f for f in files)
    for path in files:
        data = open(path, "rb").read()
        assert hub.encode() not in data and init.encode() not in data, path
    args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert args.hub_token is None and "token" not in args.model_init_kwargs and args.max_steps == 2
    assert trainer.args.hub_token == hub  # kept in memory, for push_to_hub
    assert "token" not in json.dumps(trainer.args.to_dict()["model_init_kwargs"])


@pytest.mark.parametrize("use_cpu", [True, False])
def test_one_bf16_rule_for_both_configs(tmp_path, use_cpu):
    expected = bool(not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    srum = SRUMConfig(output_dir=str(tmp_path), use_cpu=use_cpu)
    grpo = GRPOUMMConfig(output_dir=str(tmp_path), use_cpu=use_cpu, num_generations=2,
                         per_device_train_batch_size=2)
    assert srum.bf16 is expected and grpo.bf16 is expected
    assert SRUMConfig(output_dir=str(tmp_path), use_cpu=use_cpu, bf16=False).bf16 is False
