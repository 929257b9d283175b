"""GRPOUMMTrainer: the loss core, advantages and dense advantages by hand; ratio, KL, LoRA, SFT and a full run on the
tiny Janus model."""

import dataclasses
import math
import os

import pytest
import torch
import trl
from datasets import Dataset
from transformers import TrainingArguments

from srum_trl import GRPOUMMConfig, GRPOUMMTrainer, UMMJudgeRewardFunction
from srum_trl.models import GenerationConfig, load_backend
from srum_trl.trainers.grpo_loss import (
    combine_rewards,
    dense_advantages,
    group_advantages,
    grpo_loss,
    normalise_token_map,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]
LN = math.log


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=2,
                logging_steps=1, bf16=False, report_to=[], learning_rate=1e-3, guidance_scale=3.0,
                save_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return GRPOUMMConfig(**base)


def _dataset():
    return Dataset.from_dict({"prompt": PROMPTS})


def _rows(prompts=("a red circle", "a blue square"), g=2):
    return [{"prompt": p} for p in prompts for _ in range(g)]


# ------------------------------------------------------------------------------------------------------- config
def test_is_a_trl_trainer_with_trl_defaults(tmp_path):
    assert issubclass(GRPOUMMTrainer, trl.trainer.base_trainer._BaseTrainer)
    assert issubclass(GRPOUMMConfig, trl.trainer.base_config._BaseConfig)
    c = GRPOUMMConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, bf16=False)
    assert (c.num_generations, c.loss_type, c.beta, c.epsilon, c.epsilon_high) == (8, "dapo", 0.0, 0.2, 0.2)
    assert (c.scale_rewards, c.importance_sampling_level) == ("group", "token")
    assert (c.num_iterations, c.learning_rate) == (1, 1e-6)
    assert (c.steps_per_generation, c.generation_batch_size) == (2, 16)  # TRL: gradient_accumulation_steps
    assert c.mode == "grpo" and c.advantage_mode == "scalar" and c.gradient_checkpointing in (None, False)
    assert GRPOUMMConfig(output_dir=str(tmp_path), scale_rewards=False).scale_rewards == "none"


@pytest.mark.parametrize(
    "kw, message",
    [({"loss_type": "cispo"}, "loss_type"), ({"scale_rewards": "x"}, "scale_rewards"),
     ({"advantage_mode": "x"}, "advantage_mode"), ({"importance_sampling_level": "x"}, "importance_sampling_level"),
     ({"num_generations": 1}, "num_generations"), ({"num_generations": 3}, "divisible by num_generations"),
     ({"mode": "sft", "beta": 0.1}, "beta"), ({"generation_batch_size": 8, "steps_per_generation": 2}, "at most one")],
)
def test_config_rejects_bad_values(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOUMMConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, **kw)


# ------------------------------------------------------------------------------------------------- pure loss
# logp - old = [[ln 1.5, ln 0.5], [ln 1.1, ln 0.7]], A = [1, -1], epsilon 0.2:
#   seq 0 (A=1):  -min(1.5, 1.2) = -1.2;  -min(0.5, 0.8) = -0.5
#   seq 1 (A=-1): -min(-1.1, -1.1) = 1.1; -min(-0.7, -0.8) = 0.8 (masked out)
OLD = torch.zeros(2, 2)
LOGP = torch.tensor([[LN(1.5), LN(0.5)], [LN(1.1), LN(0.7)]])
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    "loss_type, kw, expected",
    [("grpo", {}, ((-1.2 - 0.5) / 2 + 1.1) / 2),
     ("bnpo", {}, (-1.2 - 0.5 + 1.1) / 3),
     ("dr_grpo", {"max_completion_length": 4}, (-1.2 - 0.5 + 1.1) / (2 * 4)),
     ("dapo", {"num_items": 5}, (-1.2 - 0.5 + 1.1) / 5),
     ("dapo", {}, (-1.2 - 0.5 + 1.1) / 3)],
)
def test_loss_types_match_hand_computation(loss_type, kw, expected):
    out = grpo_loss(LOGP, OLD, ADV, MASK, loss_type=loss_type, **kw)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.metrics == pytest.approx({"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 1 / 3,
                                         "clip_ratio/region_mean": 1 / 3})
    unmasked = grpo_loss(LOGP, OLD, ADV, loss_type=loss_type, **kw).metrics
    assert unmasked == pytest.approx({"clip_ratio/low_mean": 0.25, "clip_ratio/high_mean": 0.25,
                                      "clip_ratio/region_mean": 0.5})


def test_kl_epsilon_high_sequence_level_and_dense_advantages():
    ref = LOGP + torch.tensor([[0.0, LN(2.0)], [0.0, 0.0]])  # k3 = exp(d) - d - 1 = 1 - ln 2 at (0, 1)
    out = grpo_loss(LOGP, OLD, ADV, MASK, ref, beta=0.1, loss_type="grpo")
    kl = 1 - LN(2.0)
    assert out.loss.item() == pytest.approx(((-1.2 - 0.5 + 0.1 * kl) / 2 + 1.1) / 2, abs=1e-6)
    assert out.metrics["kl"] == pytest.approx(kl / 3)
    # epsilon_high 0.6: 1.5 is no longer clipped above
    out = grpo_loss(LOGP, OLD, ADV, MASK, epsilon_high=0.6, loss_type="bnpo")
    assert out.loss.item() == pytest.approx((-1.5 - 0.5 + 1.1) / 3, abs=1e-6)
    # sequence level: ratio = exp(masked mean log-ratio) = sqrt(0.75) and 1.1, one per image
    out = grpo_loss(LOGP, OLD, ADV, MASK, importance_sampling_level="sequence", loss_type="grpo")
    assert out.ratio.squeeze(1).tolist() == pytest.approx([math.sqrt(0.75), 1.1])
    assert out.loss.item() == pytest.approx((-math.sqrt(0.75) + 1.1) / 2, abs=1e-6)
    # per-token advantages [B, T]
    out = grpo_loss(LOGP, OLD, torch.tensor([[2.0, 0.0], [-1.0, -1.0]]), MASK, loss_type="bnpo")
    assert out.loss.item() == pytest.approx((-2 * 1.2 + 0.0 + 1.1) / 3, abs=1e-6)


def test_gradient_flows_only_through_unclipped_tokens_by_hand():
    # the same four tokens (ratios 1.5, 0.5 | 1.1, 0.7; A = 1, -1; epsilon 0.2), loss "bnpo" over all 4 tokens:
    # d(-min(r A, clip(r) A)) / d logp = -A r where the unclipped term is the minimum, 0 where the clipped one is:
    #   (1.5, A=1): clipped at 1.2 -> 0;  (0.5, A=1): unclipped -> -0.5;  (1.1, A=-1): unclipped -> +1.1;
    #   (0.7, A=-1): clipped at 0.8 -> 0; each divided by the 4 tokens
    logp = LOGP.clone().requires_grad_(True)
    out = grpo_loss(logp, OLD, ADV, loss_type="bnpo")
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5], [1.1, 0.0]]) / 4)
    assert out.ratio.flatten().tolist() == pytest.approx([1.5, 0.5, 1.1, 0.7])
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)


# ---------------------------------------------------------------------------------------------- advantages
def test_group_normalisation_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, zero = group_advantages(rewards, 3, "group")  # group stds 1 and 0
    assert adv.tolist() == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0])
    assert zero.tolist() == [False] * 3 + [True] * 3
    adv, _ = group_advantages(rewards, 3, "batch")  # batch std sqrt(15.5 / 5)
    assert adv.tolist() == pytest.approx([x / (math.sqrt(3.1) + 1e-4) for x in (-1, 0, 1, 0, 0, 0)])
    adv, zero = group_advantages(rewards, 3, "none")
    assert adv.tolist() == pytest.approx([-1, 0, 1, 0, 0, 0]) and zero.float().mean() == 0.5


def test_nan_rewards_are_masked_per_function():
    per_func = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [2.0, 4.0], [0.0, 1.0]])
    rewards = combine_rewards(per_func, torch.tensor([1.0, 0.5]))
    assert rewards[[0, 2, 3]].tolist() == [1.0, 4.0, 0.5] and math.isnan(rewards[1])
    adv, _ = group_advantages(rewards, 2, "group")
    std = math.sqrt(2 * 1.75**2)
    assert adv.tolist() == pytest.approx([0.0, 0.0, 1.75 / (std + 1e-4), -1.75 / (std + 1e-4)])


def test_dense_advantages_by_hand():
    m = torch.tensor([[1.0, 0.5], [0.5, 0.0]]).reshape(1, 4).repeat(3, 1)  # a fixed 2x2 map, mean 0.5
    dense = dense_advantages(torch.tensor([2.0, -1.0, 0.0]), m)
    assert dense[0].tolist() == [4.0, 2.0, 2.0, 0.0]  # credit where the judge liked: A * m / mean(m)
    assert dense[1].tolist() == [0.0, -1.0, -1.0, -2.0]  # blame where it disliked: A * (1 - m) / mean(1 - m)
    assert dense[2].tolist() == [0.0] * 4
    assert dense.mean(-1).tolist() == pytest.approx([2.0, -1.0, 0.0])  # the image's advantage is preserved
    scalar = torch.tensor([2.0, -1.0, 0.0])[:, None].expand(3, 4)
    assert not torch.equal(dense, scalar)
    assert torch.equal(dense_advantages(torch.tensor([3.0]), torch.zeros(1, 4)), torch.full((1, 4), 3.0))
    assert torch.equal(dense_advantages(torch.tensor([3.0, -1.0]), torch.full((2, 4), 0.3)),
                       torch.tensor([[3.0] * 4, [-1.0] * 4]))
    signed = normalise_token_map(torch.tensor([-1.0, 0.0, 0.0, 1.0]), "signed")
    assert signed.tolist() == [0.0, 0.5, 0.5, 1.0]


# ------------------------------------------------------------------------------------------- on tiny Janus
def test_first_iteration_ratio_is_one_and_old_logps_are_the_sampling_ones(tiny_janus, tmp_path):
    model, processor = tiny_janus
    trainer = GRPOUMMTrainer(model, reward_funcs=[lambda prompts, completions, **kw: [0.0, 1.0] * 2],
                             args=_config(tmp_path, per_device_train_batch_size=2, steps_per_generation=2),
                             train_dataset=_dataset(), processing_class=processor)
    trainer.model.train()
    inputs = trainer._prepare_inputs(_rows())
    rollout = inputs["rollout"]
    assert inputs["old_logps"] is not None  # steps_per_generation 2 > gradient_accumulation_steps 1: recomputed
    assert torch.allclose(inputs["old_logps"], rollout.logprobs, atol=1e-5)  # the policy is what sampled
    logps = trainer.backend.token_logprobs(rollout.prompts, rollout)
    out = grpo_loss(logps, inputs["old_logps"], inputs["advantages"])
    assert torch.allclose(out.ratio, torch.ones_like(out.ratio), atol=1e-5)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert trainer._metrics["train"]["clip_ratio/region_mean"] == [0.0]
    # rewards 0 and 1 in each group: A = +-0.5 / (std + 1e-4), std = sqrt(0.5)
    assert inputs["advantages"].abs().tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4)] * 2)


def test_dense_mode_uses_the_judge_maps(tiny_janus, tmp_path):
    model, processor = tiny_janus
    judge = UMMJudgeRewardFunction(map_rule="signed")
    trainer = GRPOUMMTrainer(model, reward_funcs=[judge], args=_config(tmp_path, advantage_mode="dense"),
                             train_dataset=_dataset(), processing_class=processor)
    rollout = trainer.backend.generate(PROMPTS, GenerationConfig(guidance=3.0), seed=0)
    rewards, maps = trainer._score(rollout, [{"prompt": p} for p in PROMPTS])  # the judge's signed maps on [0, 1]
    expected = [(torch.from_numpy(m.token_map).reshape(-1) + 1) / 2 for m in judge.judge(rollout.images, PROMPTS)]
    assert rewards.shape == (4, 1) and torch.allclose(maps, torch.stack(expected))
    fixed_map = torch.tensor([1.0, 0.5, 0.5, 0.0]).repeat_interleave(4)
    trainer._score = lambda rollout, batch: (torch.tensor([[0.0], [1.0], [3.0], [1.0]]), fixed_map.repeat(4, 1))
    trainer.model.train()
    adv = trainer._prepare_inputs(_rows())["advantages"]
    assert adv.shape == (4, 16)
    # group (0, 1): A = +-0.5 / (sqrt(0.5) + 1e-4); group (3, 1): A = +-1 / (sqrt(2) + 1e-4)
    assert sorted(adv.mean(-1).tolist()) == pytest.approx(
        sorted([s * 0.5 / (math.sqrt(0.5) + 1e-4) for s in (-1, 1)] + [s / (math.sqrt(2) + 1e-4) for s in (-1, 1)]),
        abs=1e-5)
    for row in adv:  # rows are shuffled: each is its image's advantage spread by the map
        expected = dense_advantages(row.mean(-1, keepdim=True), fixed_map[None])[0]
        assert torch.allclose(row, expected, atol=1e-5) and not torch.allclose(row, row.mean().expand(16))
    with pytest.raises(ValueError, match="dense"):
        GRPOUMMTrainer(model, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
                       args=_config(tmp_path, advantage_mode="dense"), train_dataset=_dataset(),
                       processing_class=processor)


class _TextJudgeBackend:
    """A judge backend that answers text questions from a script (no language model)."""

    token_grid = (4, 4)

    def __init__(self, answers):
        self.answers, self.model = list(answers), torch.nn.Linear(1, 1)

    def answer(self, images, questions, max_new_tokens=64, temperature=0.0):
        return [self.answers.pop(0) for _ in questions]


def test_unparsed_text_judge_answers_are_masked_and_counted(tiny_janus, tmp_path):
    model, processor = tiny_janus
    judge = UMMJudgeRewardFunction(_TextJudgeBackend(["Score: 0.5", "Score: -0.5", "I cannot tell", "Score: 1.0"]),
                                   mode="text", use_local=False, max_retries=0)
    trainer = GRPOUMMTrainer(model, reward_funcs=[judge], args=_config(tmp_path), train_dataset=_dataset(),
                             processing_class=processor)
    trainer.model.train()
    out = trainer._generate_and_score(_rows(), "train")
    # group 1: rewards +-0.5, A = +-0.5 / (sqrt(0.5) + 1e-4); group 2: the unread answer is left out of the group's
    # statistics (a 0.0 would have given it A = -0.707 and the other image +0.707): both get 0
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert out["advantages"].tolist() == pytest.approx([a, -a, 0.0, 0.0], abs=1e-6)
    assert trainer._metrics["train"]["judge/unparsed"] == [1]
    assert trainer._metrics["train"]["rewards/umm_judge/mean"][0] == pytest.approx((0.5 - 0.5 + 1.0) / 3)


def test_full_run_logs_trl_metric_names(tiny_janus, tmp_path):
    model, processor = tiny_janus
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def oracle(prompts, completions, trainer_state=None, **kwargs):
        seen.append(len(completions))
        return [1.0 if "red" in p else None for p in prompts]  # None: not scored, masked

    calls = []
    trainer = GRPOUMMTrainer(model, reward_funcs=[UMMJudgeRewardFunction(use_local=False), oracle],
                             args=_config(tmp_path, reward_weights=[1.0, 0.5]), train_dataset=_dataset(),
                             processing_class=processor)
    original = trainer.backend.generate
    trainer.backend.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or original(prompts, *a, **k)
    trainer.train()
    assert calls == [4, 4] and seen == [4, 4]
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}
    assert any("generation_head" in k for k in changed) and not any("vqmodel" in k for k in changed)
    logs = trainer.state.log_history[0]
    for key in ("loss", "reward", "reward_std", "rewards/umm_judge/mean", "rewards/umm_judge/std",
                "rewards/oracle/mean", "rewards/oracle/std", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "frac_reward_zero_std", "completions/mean_length", "guidance_margin"):
        assert key in logs, key
    assert "kl" not in logs  # beta = 0
    assert logs["completions/mean_length"] == 16.0  # 4x4 image tokens
    oracle_means = [h["rewards/oracle/mean"] for h in trainer.state.log_history if "rewards/oracle/mean" in h]
    assert all(math.isnan(v) or v == 1.0 for v in oracle_means)  # None rewards are skipped, not counted as 0


def test_lora_kl_starts_at_zero_changes_only_adapters_and_reloads(tiny_janus, tmp_path):
    from peft import LoraConfig

    model, processor = tiny_janus
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base_dir = str(tmp_path / "base")
    load_backend(model, processor=processor).save_pretrained(base_dir)
    with pytest.raises(ValueError, match="reference model"):
        GRPOUMMTrainer(model, args=_config(tmp_path, beta=0.1), train_dataset=_dataset(), processing_class=processor)
    trainer = GRPOUMMTrainer(model, reward_funcs=[lambda prompts, completions, **kw: [0.0, 1.0] * 2],
                             args=_config(tmp_path, beta=0.1, learning_rate=5e-2), train_dataset=_dataset(),
                             processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8))
    trainer.model.train()
    inputs = trainer._prepare_inputs(_rows())
    trainer._buffer = None
    logps = trainer.backend.token_logprobs(inputs["rollout"].prompts, inputs["rollout"]).detach()
    assert torch.allclose(inputs["ref_logps"], logps, atol=1e-6)  # fresh LoRA (B = 0): policy == reference
    out = grpo_loss(logps, logps, inputs["advantages"], None, inputs["ref_logps"], beta=0.1)
    assert out.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
    trained = trainer.model.state_dict()
    for key, value in trained.items():
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace("base_model.model.", "").replace("base_layer.", "")]), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())
    assert trainer.state.log_history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert trainer.state.log_history[1]["kl"] > 0  # the adapters moved away from the reference
    adapter_dir = str(tmp_path / "adapter")
    trainer.save_model(adapter_dir)
    reloaded = load_backend(base_dir, adapter=adapter_dir)
    config = GenerationConfig(guidance=3.0)
    assert torch.equal(reloaded.generate(PROMPTS, config, seed=3).tokens,
                       trainer.backend.generate(PROMPTS, config, seed=3).tokens)


def test_self_sft_best_of_n(tiny_janus, tmp_path):
    model, processor = tiny_janus
    scores = iter([[0.1, 0.9, 0.7, 0.2], [0.5, 0.4, 0.3, 0.3]])
    trainer = GRPOUMMTrainer(model, reward_funcs=[lambda prompts, completions, **kw: next(scores)],
                             args=_config(tmp_path, mode="sft", sft_best_of_n=True), train_dataset=_dataset(),
                             processing_class=processor)
    trainer.model.train()
    round_ = trainer._generate_and_score(_rows(), "train")
    assert round_["sft_weights"].tolist() == [0.0, 1.0, 1.0, 0.0]  # the best of each group of 2
    [batch] = trainer._split(round_)
    assert sorted(batch["rollout"].tokens.tolist()) == sorted(round_["rollout"].tokens[[1, 2]].tolist())
    loss = trainer.compute_loss(trainer.model, batch)
    expected = trainer.backend.token_losses(batch["rollout"].prompts, batch["rollout"]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    trainer._step = 1  # the next round comes from train()
    trainer.args.max_steps = 1
    trainer.train()
    assert "sft/token_loss" in trainer.state.log_history[0] and "advantages" not in batch


def test_every_config_field_is_documented():
    own = {f.name for f in dataclasses.fields(GRPOUMMConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    table = open(os.path.join(root, "docs", "grpo.md")).read()
    assert not [n for n in own if f"`{n}`" not in table], "docs/grpo.md misses fields"
    assert not [n for n in own if f"        {n} (`" not in GRPOUMMConfig.__doc__], "docstring misses fields"
    assert all(f.metadata.get("help") for f in dataclasses.fields(GRPOUMMConfig) if f.name in own)


def test_grpo_command_runs(tiny_checkpoint, tmp_path):
    from srum_trl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = str(tmp_path / "run")
    main(["grpo", "--model_name_or_path", tiny_checkpoint, "--prompts", str(prompts), "--output_dir", out,
                  "--num_generations", "2", "--per_device_train_batch_size", "4", "--max_steps", "1",
                  "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--guidance_scale", "3",
                  "--dtype", "float32", "--use_peft", "--lora_r", "2", "--beta", "0.1"])
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
