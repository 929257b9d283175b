"""SRUMTrainer end to end on the tiny Janus model: full fine-tune, LoRA, offline rollouts, loss, bad input."""

import math
import os

import numpy as np
import pytest
import torch
import trl
from datasets import Dataset

from srum_trl import SRUMConfig, SRUMTrainer, UMMJudgeRewardFunction
from srum_trl.models import GenerationConfig, Rollout, load_backend
from srum_trl.warn import SRUMTrlWarning

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                bf16=False, report_to=[], warmup_steps=0, learning_rate=1e-3, guidance_scale=3.0, save_strategy="no",
                seed=0, dataloader_num_workers=0)
    base.update(kw)
    return SRUMConfig(**base)


def _dataset(n=4):
    return Dataset.from_dict({"prompt": (PROMPTS * n)[: max(n, 1) * 2]})


def test_is_a_trl_trainer():
    assert issubclass(SRUMTrainer, trl.trainer.base_trainer._BaseTrainer)
    assert issubclass(SRUMConfig, trl.trainer.base_config._BaseConfig)


def test_config_defaults_follow_the_paper(tmp_path):
    c = SRUMConfig(output_dir=str(tmp_path))
    assert (c.learning_rate, c.adam_beta1, c.adam_beta2, c.weight_decay) == (2e-5, 0.9, 0.95, 0.0)
    assert (c.lr_scheduler_type, c.warmup_steps, c.max_grad_norm, c.constraint_weight) == ("constant_with_warmup", 100, 1.0, 0.5)
    assert c.loss_guidance == "guided" and c.text_dropout == 0.0
    assert SRUMConfig(output_dir=str(tmp_path), loss_guidance="conditional").text_dropout == 0.1


@pytest.mark.parametrize(
    "kw, message",
    [({"loss_guidance": "both"}, "loss_guidance"), ({"reward_baseline": "mean"}, "reward_baseline"),
     ({"judge_mode": "x"}, "judge_mode"),
     ({"text_dropout": 1.5}, "text_dropout"), ({"steps_per_generation": 0}, "steps_per_generation"),
     ({"constraint_weight": -1}, "constraint_weight"), ({"use_global_reward": False, "use_local_reward": False}, "nothing"),
     ({"text_dropout": 0.1}, "only applies to loss_guidance='conditional'")],
)
def test_config_rejects_bad_values(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        SRUMConfig(output_dir=str(tmp_path), **kw)


def test_weighted_loss_matches_hand_computation(tiny_janus, tmp_path):
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(tmp_path, constraint_weight=0.5), train_dataset=_dataset(),
                          processing_class=processor)
    fixed = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    trainer.backend.token_losses = lambda prompts, rollout, guidance, dropout, generator=None: fixed
    rollout = Rollout(["a", "b"], [None, None], torch.zeros(2, 2, dtype=torch.long), (1, 2))
    weights = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    loss = trainer.compute_loss(trainer.model, {"rollout": rollout, "weights": weights})
    # ((0+.5)*1 + (1+.5)*2 + (.5+.5)*3 + (.5+.5)*4) / 4 = 10.5 / 4
    assert loss.item() == pytest.approx(2.625)


@pytest.mark.parametrize("baseline", ["none", "batch"])
def test_reward_baseline_centres_the_round(tiny_janus, tmp_path, baseline):
    from srum_trl.rewards import RewardMap

    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(tmp_path, reward_baseline=baseline, constraint_weight=0.0),
                          train_dataset=_dataset(), processing_class=processor)
    rollout = Rollout(["a", "b"], [None, None], torch.zeros(2, 2, dtype=torch.long), (1, 2))
    token_maps = [[[0.2, 0.6]], [[1.0, 0.2]]]  # round mean 0.5
    maps = [RewardMap(None, [], None, torch.tensor(m).numpy()) for m in token_maps]
    trainer.backend.generate = lambda prompts, config, seed=None: rollout
    trainer._judge = lambda rollout, mode: (maps, [0.0, 0.0])
    weights = trainer._make_round([{"prompt": "a"}, {"prompt": "b"}], "train")["weights"]
    expected = [[-0.3, 0.1], [0.5, -0.3]] if baseline == "batch" else [[0.2, 0.6], [1.0, 0.2]]
    assert weights.reshape(-1).tolist() == pytest.approx(sum(expected, []))
    assert trainer._metrics["train"]["srum/token_weight"][-1] == pytest.approx(0.5)
    # with lambda 0 the loss of equal per-token losses is then 0 with the baseline: no pull towards the samples
    trainer.backend.token_losses = lambda prompts, rollout, guidance, dropout, generator=None: torch.full((2, 2), 3.0)
    loss = trainer.compute_loss(trainer.model, {"rollout": rollout, "weights": weights})
    assert loss.item() == pytest.approx(0.0 if baseline == "batch" else 3.0 * 0.5)


def test_prompt_baseline_compares_images_of_one_prompt(tiny_janus, tmp_path):
    from srum_trl.rewards import RewardMap
    from srum_trl.trainers.credit import prompt_baselines

    assert prompt_baselines(["x", "y", "x", "y", "z"], [0.2, 1.0, 0.4, float("nan"), 0.7]) == pytest.approx(
        [0.3, 1.0, 0.3, 1.0, 0.7])
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(tmp_path, reward_baseline="prompt", num_generations=2,
                                              per_device_train_batch_size=4, constraint_weight=0.0),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))  # each prompt twice, side by side
    prompts = [row["prompt"] for row in batch]
    assert len(prompts) == 4 and prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    rollout = Rollout(prompts, [None] * 4, torch.zeros(4, 2, dtype=torch.long), (1, 2))
    maps = [RewardMap(None, [], None, torch.tensor(m).numpy())
            for m in ([[0.2, 0.6]], [[0.6, 0.6]], [[1.0, 0.2]], [[0.0, 0.0]])]  # group means 0.5 and 0.3
    trainer.backend.generate = lambda prompts, config, seed=None: rollout
    trainer._judge = lambda rollout, mode: (maps, [0.0] * 4)
    weights = trainer._make_round(batch, "train")["weights"]
    assert weights.reshape(-1).tolist() == pytest.approx([-0.3, 0.1, 0.1, 0.1, 0.7, -0.1, -0.3, -0.3])


@pytest.mark.parametrize("kw, message", [({"num_generations": 3}, "divisible by num_generations"),
                                         ({"num_generations": 0}, "num_generations must be")])
def test_num_generations_checked(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kw)


def test_prompt_baseline_needs_several_images_per_prompt(tiny_janus, tmp_path):
    model, processor = tiny_janus
    with pytest.raises(ValueError, match="num_generations >= 2"):
        SRUMTrainer(model, args=_config(tmp_path, reward_baseline="prompt"), train_dataset=_dataset(),
                    processing_class=processor)


def test_full_finetune_changes_generation_weights(tiny_janus, tmp_path):
    model, processor = tiny_janus
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SRUMTrainer(model, args=_config(tmp_path, save_reward_maps=1), train_dataset=_dataset(),
                          processing_class=processor)
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("generation_head" in k for k in changed) and any("language_model" in k for k in changed)
    assert not any("vqmodel" in k for k in changed)  # the VQ is not in the loss
    logs = trainer.state.log_history[0]
    for key in ("loss", "reward", "reward_std", "rewards/umm_judge/mean", "srum/global_score", "srum/local_score",
                "srum/token_weight", "srum/token_loss", "guidance_margin"):
        assert key in logs, key
    assert os.listdir(os.path.join(str(tmp_path / "out"), "reward_maps"))


def test_lora_changes_only_adapters_and_reloads(tiny_janus, tmp_path):
    from peft import LoraConfig

    model, processor = tiny_janus
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base_dir = str(tmp_path / "base")
    load_backend(model, processor=processor).save_pretrained(base_dir)
    trainer = SRUMTrainer(model, args=_config(tmp_path, learning_rate=5e-2), train_dataset=_dataset(),
                          processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8))
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
    trained = trainer.model.state_dict()
    for key, value in trained.items():
        if "lora_" not in key:
            base_key = key.replace("base_model.model.", "").replace("base_layer.", "")
            assert torch.equal(value, base[base_key]), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())
    adapter_dir = str(tmp_path / "adapter")
    trainer.save_model(adapter_dir)
    assert os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors"))
    reloaded = load_backend(base_dir, adapter=adapter_dir)
    config = GenerationConfig(guidance=3.0)
    ours = trainer.backend.generate(PROMPTS, config, seed=3).tokens
    assert torch.equal(reloaded.generate(PROMPTS, config, seed=3).tokens, ours)


def test_steps_per_generation_reuses_one_round(tiny_janus, tmp_path):
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(tmp_path, max_steps=4, steps_per_generation=2),
                          train_dataset=_dataset(), processing_class=processor)
    calls = []
    original = trainer.backend.generate
    trainer.backend.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or original(prompts, *a, **k)
    trainer.train()
    assert calls == [4, 4]  # two rounds of 2 steps x 2 prompts


def test_plain_reward_functions_replace_the_global_score(tiny_janus, tmp_path):
    model, processor = tiny_janus
    seen = []

    def oracle(prompts, completions, **kwargs):
        seen.append(len(completions))
        return [1.0 if "red" in p else float("nan") for p in prompts]

    judge = UMMJudgeRewardFunction(use_local=False)
    trainer = SRUMTrainer(model, reward_funcs=[judge, oracle], args=_config(tmp_path, max_steps=1),
                          train_dataset=_dataset(), processing_class=processor)
    rollout = trainer.backend.generate(["a red circle", "a blue square"], GenerationConfig(guidance=3.0), seed=0)
    maps, rewards = trainer._judge(rollout, "train")
    assert rewards[0] == 1.0 and math.isnan(rewards[1])  # no score is a missing score, not a neutral 0
    assert maps[0].token_map == pytest.approx(torch.full((4, 4), 0.5).numpy())  # uniform 0.5 * (1 + 1) / 2
    assert np.isnan(maps[1].token_map).all()
    assert trainer._metrics["train"]["rewards/oracle/missing_frac"] == [0.5]

    def broken(prompts, completions, **kwargs):
        return [float("inf")] * len(prompts)

    trainer.reward_funcs = [broken]
    with pytest.raises(ValueError, match="finite"):
        trainer._judge(rollout, "train")
    trainer.reward_funcs = [lambda prompts, completions, **kw: [0.5]]
    with pytest.raises(ValueError, match="returned 1 values for 2 images"):
        trainer._judge(rollout, "train")


def test_a_reward_function_without_any_score_is_visible_and_left_out_of_the_loss(tiny_janus, tmp_path):
    model, processor = tiny_janus

    def nothing(prompts, completions, **kwargs):
        return [None] * len(prompts)

    trainer = SRUMTrainer(model, reward_funcs=[nothing], args=_config(tmp_path, max_steps=1),
                          train_dataset=_dataset(), processing_class=processor)
    trainer.model.train()
    with pytest.warns(SRUMTrlWarning, match="'nothing' returned no score .* any of the 2 images"):
        round_ = trainer._make_round([{"prompt": "a red circle"}, {"prompt": "a blue square"}], "train")
    metrics = trainer._metrics["train"]
    assert metrics["rewards/nothing/missing_frac"] == [1.0] and metrics["srum/unscored_frac"] == [1.0]
    assert math.isnan(metrics["reward"][0])
    loss = trainer.compute_loss(trainer.model, round_)
    assert loss.item() == 0.0  # weight 0 for images without a verdict (a score of 0 would weigh them 0.25 + lambda)
    # one scored, one not: the loss is the scored image's weighted mean over all tokens of the batch
    weights = torch.stack([torch.full((16,), 0.5), torch.full((16,), float("nan"))])
    per_token = trainer.backend.token_losses(round_["rollout"].prompts, round_["rollout"], "guided", 0.0).detach()
    loss = trainer.compute_loss(trainer.model, {"rollout": round_["rollout"], "weights": weights})
    assert loss.item() == pytest.approx(float((0.5 + 0.5) * per_token[0].sum() / per_token.numel()), rel=1e-5)


def test_offline_rollout_dataset(tiny_janus, tmp_path):
    from datasets import concatenate_datasets

    from srum_trl.data import build_rollouts

    model, processor = tiny_janus
    backend = load_backend(model, processor=processor)
    store = build_rollouts(backend, PROMPTS, UMMJudgeRewardFunction(), str(tmp_path / "store"),
                           GenerationConfig(guidance=3.0), seed=0, shard_size=4, progress=False)
    trainer = SRUMTrainer(backend, args=_config(tmp_path, max_steps=2), train_dataset=store)
    generated = []
    trainer.backend.generate = lambda *a, **k: generated.append(1)
    trainer.train()
    assert not generated and trainer.state.global_step == 2
    # every row's token grid is checked, not only the first: a foreign row in the middle is named before training
    foreign = store.select([1]).map(lambda row: {"grid": [2, 8]})
    mixed = concatenate_datasets([store.select([0, 1, 2]), foreign, store.select([3])])
    with pytest.raises(ValueError, match=r"row 3 holds a rollout on a \(2, 8\) token grid"):
        SRUMTrainer(backend, args=_config(tmp_path), train_dataset=mixed)
    short = store.map(lambda row, i: {"tokens": row["tokens"][:8] if i == 2 else row["tokens"]}, with_indices=True)
    with pytest.raises(ValueError, match="row 2 holds 8 tokens"):
        SRUMTrainer(backend, args=_config(tmp_path), train_dataset=short)
    # the store holds one image per prompt: the per-prompt baseline would zero every weight
    with pytest.raises(ValueError, match="one image per prompt .*--num_generations"):
        SRUMTrainer(backend, args=_config(tmp_path, reward_baseline="prompt", num_generations=2), train_dataset=store)


def test_offline_prompt_baseline_draws_whole_groups(tiny_janus, tmp_path):
    from srum_trl.data import build_rollouts

    model, processor = tiny_janus
    backend = load_backend(model, processor=processor)
    store = build_rollouts(backend, PROMPTS, UMMJudgeRewardFunction(), str(tmp_path / "store"),
                           GenerationConfig(guidance=3.0), seed=0, shard_size=4, progress=False, num_generations=2)
    with pytest.raises(ValueError, match="2 image\\(s\\) per prompt but num_generations=1"):
        SRUMTrainer(backend, args=_config(tmp_path), train_dataset=store)
    args = _config(tmp_path, reward_baseline="prompt", num_generations=2, constraint_weight=0.0,
                   per_device_train_batch_size=2, steps_per_generation=2)
    trainer = SRUMTrainer(backend, args=args, train_dataset=store)
    order = list(trainer._get_train_sampler())
    rounds = [order[i : i + 4] for i in range(0, len(order), 4)]
    groups = store["group"]
    for rows in rounds:  # each round: two whole groups (both images of a prompt), never a lone image
        assert sorted(groups[r] for r in rows) in ([a, a, b, b] for a in range(4) for b in range(a + 1, 4))
    assert sorted(set(order)) == list(range(8))  # every image is used
    trainer.model.train()
    weights = trainer._make_round([store[r] for r in rounds[0]], "train")["weights"]
    means = weights.mean(dim=1)
    # centred per prompt: within each group the two images' mean weights are +d and -d (not 0: they differ)
    by_group = {}
    for r, m in zip(rounds[0], means.tolist()):
        by_group.setdefault(groups[r], []).append(m)
    for pair in by_group.values():
        assert sum(pair) == pytest.approx(0.0, abs=1e-6) and abs(pair[0]) > 1e-4


@pytest.mark.parametrize(
    "data, message",
    [({"text": ["a red circle"]}, "no 'prompt' column"), ({"prompt": ["a red circle", ""]}, r"\['prompt'\]\[1\]"),
     ({"prompt": []}, "empty")],
)
def test_bad_datasets(tiny_janus, tmp_path, data, message):
    model, processor = tiny_janus
    with pytest.raises(ValueError, match=message):
        SRUMTrainer(model, args=_config(tmp_path), train_dataset=Dataset.from_dict(data), processing_class=processor)


def test_dataset_smaller_than_a_round(tiny_janus, tmp_path):
    model, processor = tiny_janus
    with pytest.raises(ValueError, match="fewer than one round"):
        SRUMTrainer(model, args=_config(tmp_path, per_device_train_batch_size=4, steps_per_generation=2),
                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=processor)


def test_too_long_prompt_fails_before_training(tiny_janus, tmp_path):
    model, processor = tiny_janus
    ds = Dataset.from_dict({"prompt": [" ".join(["red"] * 300)] * 2})
    with pytest.raises(ValueError, match=r"train_dataset\['prompt'\]\[0\] is 302 tokens long"):
        SRUMTrainer(model, args=_config(tmp_path), train_dataset=ds, processing_class=processor)  # not after steps


def test_crash_keeps_the_progress(tiny_janus, tmp_path):
    model, processor = tiny_janus
    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("judge server went away")
        return [0.5] * len(prompts)

    trainer = SRUMTrainer(model, reward_funcs=[UMMJudgeRewardFunction(use_local=False), flaky],
                          args=_config(tmp_path, max_steps=3), train_dataset=_dataset(), processing_class=processor)
    with pytest.raises(RuntimeError, match="went away"):
        trainer.train()
    assert os.path.exists(tmp_path / "out" / "interrupted-step-1" / "model.safetensors")


def test_model_card(tiny_janus, tmp_path):
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(tmp_path), train_dataset=_dataset(), processing_class=processor)
    trainer.create_model_card(model_name="tiny-srum")
    card = open(tmp_path / "out" / "README.md").read()
    assert "SRUM" in card and "2510.12784" in card and "srum-trl" in card


def test_loss_runs_through_the_trainer_wrapper(tiny_janus, tmp_path):
    """Under DDP / FSDP the loss must be computed as the wrapper's forward, or gradients are never synchronised."""
    model, processor = tiny_janus
    trainer = SRUMTrainer(model, args=_config(tmp_path), train_dataset=_dataset(), processing_class=processor)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: forward delegates to the module
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    rollout = trainer.backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=0)
    weights = torch.full((2, 16), 0.5)
    direct = trainer.compute_loss(trainer.model, {"rollout": rollout, "weights": weights})
    wrapper = Wrapper(trainer.model)
    routed = trainer.compute_loss(wrapper, {"rollout": rollout, "weights": weights})
    assert wrapper.calls == 1
    assert routed.item() == pytest.approx(direct.item(), rel=1e-6)
    routed.backward()
    assert trainer.backend.core.model.generation_head.vision_head.weight.grad is not None
    assert "forward" not in vars(trainer.backend.core)  # the class forward is back


def test_config_judge_fields_ignored_with_an_explicit_judge_warns(tiny_janus, tmp_path):
    model, processor = tiny_janus
    with pytest.warns(UserWarning, match="map_rule"):
        SRUMTrainer(model, reward_funcs=UMMJudgeRewardFunction(), args=_config(tmp_path, map_rule="signed"),
                    train_dataset=_dataset(), processing_class=processor)


def test_lora_input_cast_skipped_under_autocast_with_the_same_loss(tiny_janus, tmp_path):
    """Under autocast, LoRA layers see their bf16 input as is (no float32 copy that autocast would undo): the same
    per-token losses as with PEFT's cast, bit for bit; outside autocast the cast stays on."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, processor = tiny_janus
    model.to(torch.bfloat16)  # bf16 base; PEFT keeps the adapters in float32
    trainer = SRUMTrainer(model, args=_config(tmp_path), train_dataset=_dataset(), processing_class=processor,
                          peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(p.dtype == torch.float32 for n, p in trainer.model.named_parameters() if "lora_" in n)
    rollout = trainer.backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=0)

    def losses():
        states.append({getattr(m, "cast_input_dtype_enabled", True) for m in layers})
        return trainer.backend.token_losses(rollout.prompts, rollout, "guided", 0.0)

    states = []
    plain = trainer._as_forward(losses)  # bf16=False: no autocast, the cast stays on
    trainer.accelerator.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    fast = trainer._as_forward(losses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = losses()  # autocast with PEFT's cast
    assert states == [{True}, {False}, {True}]
    assert {getattr(m, "cast_input_dtype_enabled", True) for m in layers} == {True}  # restored
    assert torch.equal(fast, reference) and plain.dtype == torch.float32


def test_evaluate_with_prompt_groups(tiny_janus, tmp_path):
    model, processor = tiny_janus
    args = _config(tmp_path, reward_baseline="prompt", num_generations=2, per_device_train_batch_size=2,
                   per_device_eval_batch_size=4)
    eval_set = Dataset.from_dict({"prompt": PROMPTS[:2]})
    trainer = SRUMTrainer(model, args=args, train_dataset=_dataset(), eval_dataset=eval_set,
                          processing_class=processor)
    batch = next(iter(trainer.get_eval_dataloader()))
    assert [row["prompt"] for row in batch] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2  # dataset order, in groups
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_reward" in metrics
    with pytest.raises(ValueError, match="per_device_eval_batch_size"):
        SRUMTrainer(model, args=_config(tmp_path, num_generations=2, per_device_eval_batch_size=3),
                    train_dataset=_dataset(), eval_dataset=eval_set, processing_class=processor)
