"""Resuming and reproducing runs: a run resumed from any of its checkpoints logs what the uninterrupted run logged
(SRUM and GRPO, online rollouts, one and two micro-steps per rollout round, across epochs); seeds differ per process
and micro-step; the loss's random draws come from the generator the trainer passes."""

import math
import os
from unittest import mock

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl.trainer.utils import RepeatSampler

from srum_trl import GRPOUMMConfig, GRPOUMMTrainer, SRUMConfig, SRUMTrainer
from srum_trl.trainers.base import EpochRepeatSampler
from srum_trl.trainers.resume import derive_seed

from tests.conftest import WORDS

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]
pytestmark = pytest.mark.usefixtures("one_thread")
_NOT_COMPARED = ("timing/", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                 "total_flos")


def _trainer(kind, out, spg, **kw):
    from srum_trl.models.janus import build_tiny_janus

    model, processor = build_tiny_janus(WORDS, seed=0)  # the same weights in every run
    common = dict(output_dir=out, per_device_train_batch_size=2, steps_per_generation=spg, max_steps=3,
                  logging_steps=1, save_strategy="steps", save_steps=1, bf16=False, report_to=[], warmup_steps=0,
                  learning_rate=5e-2, guidance_scale=3.0, seed=0, dataloader_num_workers=0, **kw)
    if kind == "srum":
        args, cls, prompts = SRUMConfig(**common), SRUMTrainer, PROMPTS  # 2 steps per epoch
    else:
        args, cls, prompts = GRPOUMMConfig(num_generations=2, **common), GRPOUMMTrainer, PROMPTS[:2]
    return cls(model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=processor,
               peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))


def _steps(log_history) -> dict[int, dict]:
    out = {}
    for entry in log_history:
        if "loss" in entry:
            out[entry["step"]] = {k: v for k, v in entry.items() if not k.startswith(_NOT_COMPARED)}
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.mark.parametrize("kind, spg", [("srum", 1), ("srum", 2), ("grpo", 1), ("grpo", 2)])
def test_resumed_run_logs_what_the_uninterrupted_run_logged(tmp_path, kind, spg):
    full = _trainer(kind, str(tmp_path / "full"), spg)
    full.train()
    reference = _steps(full.state.log_history)
    assert sorted(reference) == [1, 2, 3] and "reward" in reference[1]
    assert len({reference[s]["reward"] for s in reference if "reward" in reference[s]}) > 1  # rounds differ
    final = {k: v.clone() for k, v in full.model.state_dict().items() if "lora_" in k}
    for checkpoint in (1, 2):  # inside a round (spg 2) or an epoch (spg 1); at the end of the first epoch (2)
        resumed = _trainer(kind, str(tmp_path / "full"), spg)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{checkpoint}"))
        logged = _steps(resumed.state.log_history)
        for step in range(checkpoint + 1, 4):  # step 3 is in the second epoch
            assert _same(logged[step], reference[step]), (checkpoint, step, logged[step], reference[step])
        for key, value in resumed.model.state_dict().items():
            if "lora_" in key:
                assert torch.equal(value, final[key]), (checkpoint, key)


def test_epoch_sampler_continues_trl_order_after_a_restart():
    trl = RepeatSampler(list(range(7)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5)
    epochs = [list(trl) for _ in range(3)]  # one sampler iterated epoch after epoch: the uninterrupted order
    assert epochs[0] != epochs[1]
    for epoch in range(3):
        restarted = EpochRepeatSampler(list(range(7)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5)
        restarted.set_epoch(epoch)
        assert list(restarted) == epochs[epoch]


def test_derived_seeds_are_distinct():
    seeds = {(s, p, t): derive_seed(3, p, t, s, 5) for s in ("rollout", "loss", "eval_rollout", "eval_loss")
             for p in range(5) for t in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert derive_seed(3, 0, 1, num_processes=2) != derive_seed(3, 1, 0, num_processes=2)
    assert derive_seed(3, 0, 0) != derive_seed(4, 0, 0)
    assert all(0 <= s < 2**32 for s in seeds.values())  # torch's CPU generator keeps 32 bits of a seed
    big = [derive_seed(0, p, t, "rollout", 1024) for p in (0, 1023) for t in (0, 2**20 - 1)]
    assert len(set(big)) == 4
    with pytest.raises(ValueError, match="process_index"):
        derive_seed(0, 2, 0, num_processes=2)


def _process(index):
    """Pretend to be process `index` (of several)."""
    from accelerate import Accelerator
    from transformers import TrainingArguments

    return mock.patch.multiple(Accelerator, process_index=mock.PropertyMock(return_value=index),
                               num_processes=mock.PropertyMock(return_value=4)), mock.patch.object(
        TrainingArguments, "process_index", new_callable=mock.PropertyMock, return_value=index)


class _Seen(Exception):
    pass


@pytest.mark.parametrize("kind", ["srum", "grpo"])
def test_rollout_and_loss_seeds_differ_per_process_and_micro_step(tmp_path, kind):
    trainer = _trainer(kind, str(tmp_path / "o"), 1)
    trainer.model.train()

    def generate(prompts, config, seed=None):
        raise _Seen(seed)

    trainer.backend.generate = generate
    rollout_seeds, loss_seeds = {}, {}
    for process in range(3):
        for step in range(4):
            first, second = _process(process)
            with first, second:
                trainer._step = step
                try:
                    if kind == "srum":
                        trainer._make_round([{"prompt": p} for p in PROMPTS[:2]], "train")
                    else:
                        trainer._generate_and_score([{"prompt": p} for p in PROMPTS[:2]], "train")
                except _Seen as seen:
                    rollout_seeds[process, step] = seen.args[0]
    assert len(rollout_seeds) == 12 and len(set(rollout_seeds.values())) == 12
    for process in range(3):
        for step in range(4):
            first, second = _process(process)
            with first, second:
                trainer._step = step
                loss_seeds[process, step] = trainer._generator("loss").initial_seed()
    assert len(set(loss_seeds.values()) | set(rollout_seeds.values())) == 24


def test_bagel_flow_loss_draws_from_the_generator():
    """Timestep, noise and dropout coin come from the generator: the same seed draws the same, two ranks' seeds
    draw differently; None keeps torch's global RNG."""
    from srum_trl.models import GenerationConfig
    from srum_trl.models.bagel import tiny_bagel_backend

    backend = tiny_bagel_backend(WORDS, seed=0)
    prompts = ["a red circle", "a blue square", "a red circle", "a blue square"]
    rollout = backend.generate(prompts, GenerationConfig(guidance=1.0, batch_size=4), seed=0)

    def losses(seed, dropout=0.0):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return backend.token_losses(prompts, rollout, "conditional", dropout, generator=generator)

    rank0, rank1 = derive_seed(0, 0, 5, "loss", 2), derive_seed(0, 1, 5, "loss", 2)
    assert torch.equal(losses(rank0), losses(rank0))
    assert not torch.allclose(losses(rank0), losses(rank1))
    torch.manual_seed(1)
    global_a = losses(None)
    torch.manual_seed(1)
    assert torch.equal(global_a, losses(None))
    torch.manual_seed(1)
    assert torch.equal(losses(rank0, dropout=0.5), losses(rank0, dropout=0.5))


def test_janus_dropout_coin_draws_from_the_generator(tiny_backend):
    from srum_trl.models import GenerationConfig

    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"] * 2
    rollout = tiny_backend.generate(prompts, GenerationConfig(guidance=1.0), seed=0)

    def losses(seed):
        with torch.no_grad():
            return tiny_backend.token_losses(prompts, rollout, "conditional", 0.5,
                                             generator=torch.Generator().manual_seed(seed)).mean(-1)

    full = tiny_backend.token_losses(prompts, rollout, "conditional", 0.0).mean(-1).detach()
    assert torch.equal(losses(1), losses(1))
    dropped = [~torch.isclose(losses(s), full) for s in (1, 2)]
    assert dropped[0].any() and not torch.equal(dropped[0], dropped[1])  # which prompts drop follows the seed


def test_trainer_passes_a_per_process_generator_to_the_loss(tmp_path):
    trainer = _trainer("srum", str(tmp_path / "o"), 1)
    trainer.model.train()
    seen = []

    def token_losses(prompts, rollout, guidance, dropout, generator=None):
        seen.append(generator.initial_seed())
        return torch.ones(len(prompts), 16, requires_grad=True)

    trainer.backend.token_losses = token_losses
    batch = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2]])
    for process in (0, 1):
        first, second = _process(process)
        with first, second:
            trainer.compute_loss(trainer.model, batch)
    assert seen == [derive_seed(0, 0, 0, "loss", 4), derive_seed(0, 1, 0, "loss", 4)]


def test_cli_runs_repeat_and_resume(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from srum_trl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def train(out, steps, *extra):
        main(["train", "--model_name_or_path", tiny_checkpoint, "--prompts", str(prompts), "--output_dir", out,
              "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--use_peft", "--lora_r", "4",
              "--report_to", "none", "--save_steps", "1", "--logging_steps", "1", "--guidance_scale", "3",
              "--learning_rate", "5e-2", "--warmup_steps", "0", *extra])
        return os.path.join(out, "adapter_model.safetensors")

    one, two = train(str(tmp_path / "a"), 3), train(str(tmp_path / "b"), 3)
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same adapter

    out = str(tmp_path / "c")
    train(out, 2)
    kept = os.path.getmtime(os.path.join(out, "checkpoint-1", "adapter_model.safetensors"))
    resumed = load_file(train(out, 3, "--resume_from_checkpoint", "true"))
    assert os.path.getmtime(os.path.join(out, "checkpoint-1", "adapter_model.safetensors")) == kept  # not redone
    assert all(torch.equal(resumed[k], a[k]) for k in a)
