"""Documented defaults against the SRUM reference's values, typed here from the reference itself.

Reference: github.com/WayneJin0918/SRUM, `train/pretrain_unified_navit.py` (its TrainingArguments defaults: beta1 0.9,
beta2 0.95, eps 1e-15, warmup_steps 100, lr_scheduler "constant", max_grad_norm 1.0, weight_decay=0 in the AdamW call,
text_cond_dropout_prob 0.1) and its launchers `scripts/train_reg_{comp,cul,ns,st}.sh` (`--lr 2e-5`,
`--lambda_constraint 0.5`). BAGEL's own `train/pretrain_unified_navit.py` has the same AdamW betas and eps.
"""

import importlib.util
import os
import sys

import pytest
import torch
from datasets import Dataset

from srum_trl import SRUMConfig, SRUMTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCE = {
    "learning_rate": 2e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-15,
    "weight_decay": 0.0,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 100,
    "max_grad_norm": 1.0,
    "constraint_weight": 0.5,
}
REFERENCE_TEXT_DROPOUT = 0.1  # with the conditional loss, the reference's only loss


def _value(config, name):
    value = getattr(config, name)
    return getattr(value, "value", value)  # enums (lr_scheduler_type) compare by their string


def test_srum_config_defaults_are_the_reference(tmp_path):
    config = SRUMConfig(output_dir=str(tmp_path), report_to="none")
    assert {name: _value(config, name) for name in REFERENCE} == REFERENCE
    assert config.reward_baseline == "none"  # the paper's weight R + lambda
    conditional = SRUMConfig(output_dir=str(tmp_path), report_to="none", loss_guidance="conditional")
    assert conditional.text_dropout == REFERENCE_TEXT_DROPOUT
    for name in ("adam_epsilon", "adam_beta1", "adam_beta2"):  # documented in the docstring and in docs/config.md
        assert f"{REFERENCE[name]:g}" in SRUMConfig.__doc__.replace("(0.9, 0.95)", "0.9 0.95")


def test_the_optimizer_and_schedule_get_the_reference_values(tiny_janus, tmp_path):
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=SRUMConfig(output_dir=str(tmp_path), report_to="none", max_steps=300,
                                                 per_device_train_batch_size=2),
                          train_dataset=Dataset.from_dict({"prompt": ["a red circle", "a blue square"]}),
                          processing_class=processor)
    trainer.create_optimizer_and_scheduler(num_training_steps=300)
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert group["eps"] == 1e-15 and group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.0
    factors = [trainer.lr_scheduler.lr_lambdas[0](step) for step in (0, 50, 100, 250)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 1.0])  # linear warmup over 100 steps, then constant


def test_train_bagel_paper_settings_are_the_reference(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_bagel", os.path.join(ROOT, "examples", "train_bagel.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_bagel", module)  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    _, config, _ = module.parse_args(["--model_name_or_path", "BAGEL-7B-MoT", "--prompts", "p.jsonl",
                                      "--output_dir", str(tmp_path), "--report_to", "none"])
    assert {name: _value(config, name) for name in REFERENCE} == REFERENCE
    assert config.loss_guidance == "conditional" and config.text_dropout == REFERENCE_TEXT_DROPOUT
    assert config.reward_baseline == "none" and config.guidance_scale == 4.0
