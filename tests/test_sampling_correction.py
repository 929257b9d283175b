"""The log-prob mismatch between the sampler and the training forward, and TRL's truncated importance-sampling
correction of it, against hand computations."""

import math

import pytest
import torch
from datasets import Dataset

from srum_trl import GRPOUMMConfig, GRPOUMMTrainer, SRUMConfig, SRUMTrainer
from srum_trl.trainers.common import importance_sampling_ratio, logp_difference
from srum_trl.trainers.grpo_loss import grpo_loss

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]
# recorded = recomputed + DELTA, so exp(recomputed - recorded) = exp(-DELTA): 1, e^-0.5, e^2 (clipped at 3)
DELTA = torch.tensor([0.0, 0.5, -2.0] * 6)[:16]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_ratio_modes_by_hand():
    train = torch.tensor([[0.0, -1.0, -3.0], [-2.0, -2.0, float("nan")]])
    sampled = torch.tensor([[0.0, -2.0, -1.0], [-1.0, float("nan"), -2.0]])
    # differences: [[0, 1, -2], [-1, nan->0, nan->0]]
    e = math.e
    token = importance_sampling_ratio(train, sampled, "token_truncate", clip_max=2.0)
    assert token.flatten().tolist() == pytest.approx([1.0, 2.0, e**-2, e**-1, 1.0, 1.0])
    masked = importance_sampling_ratio(train, sampled, "token_mask", clip_min=0.2, clip_max=2.0)
    assert masked.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, e**-1, 1.0, 1.0])
    seq = importance_sampling_ratio(train, sampled, "sequence_truncate", clip_min=0.5, clip_max=3.0)
    assert seq.flatten().tolist() == pytest.approx([0.5, 0.5])  # both rows sum to -1: exp(-1) = 0.37 -> 0.5
    assert importance_sampling_ratio(train, sampled, "sequence_truncate").flatten().tolist() == pytest.approx(
        [e**-1, e**-1])
    seq_mask = importance_sampling_ratio(train, sampled, "sequence_mask", clip_min=0.5, clip_max=3.0)
    assert seq_mask.flatten().tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="importance_sampling_mode"):
        importance_sampling_ratio(train, sampled, "tokens")
    assert logp_difference(train, sampled) == pytest.approx((1.0, 2.0))  # |0|,|1|,|-2|,|-1| -> mean 1, max 2


def test_grpo_loss_weights_the_surrogate_before_the_kl():
    logps = torch.tensor([[-1.0, -2.0]])
    ratio = torch.tensor([[0.5, 2.0]])
    out = grpo_loss(logps, logps, torch.tensor([1.0]), loss_type="bnpo", importance_sampling_ratio=ratio)
    assert out.loss.item() == pytest.approx(-(0.5 + 2.0) / 2)  # -A * w per token, ratio to old = 1
    ref = logps + 0.1
    out = grpo_loss(logps, logps, torch.tensor([1.0]), ref_per_token_logps=ref, beta=1.0, loss_type="bnpo",
                    importance_sampling_ratio=ratio)
    kl = math.exp(0.1) - 0.1 - 1
    assert out.loss.item() == pytest.approx((-(0.5 + 2.0) + 2 * kl) / 2)


def _config(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                bf16=False, report_to=[], warmup_steps=0, guidance_scale=3.0, save_strategy="no", seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return cls(**base)


def _shifted(backend):
    """`backend.generate` whose recorded log-probs are moved by DELTA."""
    original = backend.generate

    def generate(prompts, config, seed=None):
        rollout = original(prompts, config, seed=seed)
        rollout.logprobs = rollout.logprobs + DELTA
        return rollout

    return generate


def _expected_ratio(n):
    return torch.exp(-DELTA).clamp(max=3.0).expand(n, -1)


@pytest.mark.parametrize("correct", [False, True])
def test_srum_logs_the_mismatch_and_corrects_it(tiny_janus, tmp_path, correct):
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(SRUMConfig, tmp_path, importance_sampling_correction=correct),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=processor)
    trainer.backend.generate = _shifted(trainer.backend)
    trainer.model.train()
    inputs = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2]])
    loss = trainer.compute_loss(trainer.model, inputs)
    metrics = trainer._metrics["train"]
    assert metrics["sampling/sampling_logp_difference/mean"] == [pytest.approx(DELTA.abs().mean().item(), abs=1e-5)]
    assert metrics["sampling/sampling_logp_difference/max"] == [pytest.approx(2.0, abs=1e-5)]
    with torch.no_grad():
        per_token = trainer.backend.token_losses(inputs["rollout"].prompts, inputs["rollout"])
    weight = inputs["weights"] + 0.5
    if correct:
        ratio = _expected_ratio(2)
        assert inputs["is_ratio"] == pytest.approx(ratio, abs=1e-5)
        assert metrics["sampling/importance_sampling_ratio/max"] == [pytest.approx(3.0)]
        assert metrics["sampling/importance_sampling_ratio/min"] == [pytest.approx(math.exp(-0.5), abs=1e-5)]
        assert metrics["sampling/importance_sampling_ratio/mean"] == [pytest.approx(ratio.mean().item(), abs=1e-5)]
        weight = weight * ratio
    else:
        assert "is_ratio" not in inputs and "sampling/importance_sampling_ratio/mean" not in metrics
    assert loss.item() == pytest.approx((weight * per_token).mean().item(), rel=1e-5)


@pytest.mark.parametrize("spg, correct", [(1, False), (2, False), (1, True)])
def test_grpo_logs_the_mismatch_and_corrects_it(tiny_janus, tmp_path, spg, correct):
    model, processor = tiny_janus
    args = _config(GRPOUMMConfig, tmp_path, num_generations=2, steps_per_generation=spg,
                   importance_sampling_correction=correct)
    trainer = GRPOUMMTrainer(model, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                             processing_class=processor)
    trainer.backend.generate = _shifted(trainer.backend)
    trainer.model.train()
    rows = [{"prompt": p} for p in PROMPTS[: spg] for _ in range(2)]
    inputs = trainer._prepare_inputs(rows)
    trainer.compute_loss(trainer.model, inputs)
    metrics = trainer._metrics["train"]
    # spg 2 (and the correction) recompute the round's log-probs when it is made; spg 1 takes them from the
    # training forward of the round's first micro-step: either way, one value per round
    assert metrics["sampling/sampling_logp_difference/mean"] == [pytest.approx(DELTA.abs().mean().item(), abs=1e-5)]
    assert metrics["sampling/sampling_logp_difference/max"] == [pytest.approx(2.0, abs=1e-5)]
    if correct:
        assert inputs["is_ratio"] == pytest.approx(_expected_ratio(2), abs=1e-5)
        assert metrics["sampling/importance_sampling_ratio/max"] == [pytest.approx(3.0)]
    else:
        assert inputs["is_ratio"] is None


def test_correction_needs_sampler_logprobs(tmp_path):
    from srum_trl.models.bagel import tiny_bagel_backend

    from tests.conftest import WORDS

    with pytest.raises(ValueError, match="importance_sampling_correction"):
        SRUMTrainer(tiny_bagel_backend(WORDS, seed=0), args=_config(SRUMConfig, tmp_path,
                    importance_sampling_correction=True), train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match="importance_sampling_clip_min"):
        _config(SRUMConfig, tmp_path, importance_sampling_clip_min=3.0)
    with pytest.raises(ValueError, match="mode='grpo'"):
        _config(GRPOUMMConfig, tmp_path, mode="sft", importance_sampling_correction=True, num_generations=2)
