"""Flow GRPO: the SDE step, its Gaussian log-density and KL by hand and statistically (Gaussian data, whose velocity
is known in closed form), the loss over [rows, steps, tokens] by hand, and GRPOUMMTrainer on a tiny BAGEL."""

import json
import math
import os

import pytest
import torch
from datasets import Dataset

from srum_trl import GRPOUMMConfig, GRPOUMMTrainer, UMMJudgeRewardFunction
from srum_trl.models import GenerationConfig
from srum_trl.models.bagel import tiny_bagel_backend
from srum_trl.models.bagel.tiny import TINY_BACKEND_SETTINGS
from srum_trl.models.flow_sde import SDEConfig, noise_std, plan_sde_steps, sde_step, step_kl, step_logprob
from srum_trl.trainers.flow_grpo import flow_grpo_loss

WORDS = "a red green blue circle square triangle and does this image show is there here yes no describe".split()
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- the SDE by hand
def test_step_logprob_by_hand():
    x, mean = torch.tensor([[0.3, -1.0]]), torch.tensor([[0.1, -0.5]])
    expected = (-(0.2**2) / (2 * 0.25) - math.log(0.5) - LOG_SQRT_2PI) + (-(0.5**2) / (2 * 0.25) - math.log(0.5)
                                                                        - LOG_SQRT_2PI)
    assert step_logprob(x, mean, torch.tensor(0.5)).tolist() == pytest.approx([expected], abs=1e-6)
    # per-row std [R, 1]: each row its own Gaussian
    two = step_logprob(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([[1.0], [2.0]]))
    assert two.tolist() == pytest.approx([-LOG_SQRT_2PI, -math.log(2.0) - LOG_SQRT_2PI], abs=1e-6)


def test_sde_step_by_hand():
    # t = 0.6 -> 0.5, a = 0.7: sigma^2 = 0.49 * 0.6 / 0.4 = 0.735, h = 0.1,
    # mean = x - h [v + sigma^2 / (2 t) (x + (1 - t) v)] = 0.5 - 0.1 [-1.2 + 0.6125 * 0.02] = 0.618775
    mean, std = sde_step(torch.tensor([[0.5]]), torch.tensor([[-1.2]]), 0.6, 0.5, 0.7)
    assert mean.item() == pytest.approx(0.618775, abs=1e-6) and std.item() == pytest.approx(math.sqrt(0.0735))
    # a = 0: the Euler step x - h v, std 0
    mean, std = sde_step(torch.tensor([[0.5]]), torch.tensor([[-1.2]]), 0.6, 0.5, 0.0)
    assert mean.item() == pytest.approx(0.62) and std.item() == 0.0
    # t = 1 with t_cap 0.8: 1 - t floored at 0.2, sigma^2 = 0.49 / 0.2 = 2.45, h = 0.2 -> std = 0.7,
    # mean = 0.5 - 0.2 [1.0 + 2.45 / 2 * 0.5] = 0.1775
    mean, std = sde_step(torch.tensor([[0.5]]), torch.tensor([[1.0]]), 1.0, 0.8, 0.7, t_cap=0.8)
    assert mean.item() == pytest.approx(0.1775, abs=1e-6) and std.item() == pytest.approx(0.7, abs=1e-6)
    assert noise_std(0.5, 0.7).item() == pytest.approx(0.7)
    # per-row times [R]
    mean, std = sde_step(torch.ones(2, 3, 1), torch.zeros(2, 3, 1), torch.tensor([0.6, 0.5]), torch.tensor([0.5, 0.4]),
                         0.7)
    assert std.shape == (2, 1, 1) and std[1].item() == pytest.approx(0.7 * math.sqrt(0.1), abs=1e-6)


def _marginals_script():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("flow_sde_marginals",
                                                  os.path.join(root, "scripts", "flow_sde_marginals.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sde_has_the_marginals_of_the_ode_on_gaussian_data():
    """Statistical: with the exact velocity of Gaussian data, SDE samples (a = 0.7) and ODE samples have the exact
    marginals N((1 - t) m, (1 - t)^2 s0^2 + t^2) at t = 0.5, 0.2 and 0, within sampling and discretisation error
    (100 steps), while Euler plus noise without the score correction does not. (The capped first step over-disperses
    by a^4 / 4 in variance whatever the step count; the SDE's restoring drift removes it along the way: 1.4% in std
    at t = 0.5, 0.03% at t = 0.)"""
    script = _marginals_script()
    n, steps = 200_000, 100
    ts, sde = script.simulate(steps, 0.7, n, seed=0)
    _, ode = script.simulate(steps, 0.0, n, seed=1)
    _, wrong = script.simulate(steps, 0.7, n, seed=2, score_correction=False)
    for i in (50, 80, steps):
        t = float(ts[i])
        mean, std = (1 - t) * 1.5, math.sqrt((1 - t) ** 2 * 0.5**2 + t**2)  # the exact marginal of N(1.5, 0.5^2) data
        for states in (sde, ode):
            x = states[i]
            assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n) + 0.01, (i, x.mean().item(), mean)
            assert abs(x.std().item() / std - 1) < 0.02, (i, x.std().item(), std)
        assert abs(sde[i].std().item() - ode[i].std().item()) / std < 0.02
    assert wrong[steps].std().item() > 1.5 * 0.5  # the test can fail: a wrong SDE is far off


def test_exact_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q, std = torch.randn(64, generator=g), torch.randn(64, generator=g) * 0.2, torch.tensor(0.8)
    exact = step_kl(mean_p, mean_q, std).item()
    assert exact == pytest.approx(((mean_p - mean_q) ** 2).sum().item() / (2 * 0.64), rel=1e-6)
    x = mean_p + std * torch.randn(50_000, 64, generator=g)  # samples of p
    log_ratio = step_logprob(x, mean_p, std) - step_logprob(x, mean_q, std)
    se = log_ratio.std().item() / math.sqrt(len(log_ratio))
    assert abs(log_ratio.mean().item() - exact) < 4 * se
    assert step_kl(mean_p, mean_p, std).item() == 0.0


def test_plan_sde_steps():
    for seed in range(20):
        stochastic, trained = plan_sde_steps(SDEConfig(seed=seed), 15)  # window 2 in the first half (0 .. 6)
        assert stochastic == trained and len(trained) == 2 and trained[1] == trained[0] + 1 and trained[1] <= 6
    starts = {plan_sde_steps(SDEConfig(seed=s, window_size=3, window_range=(2, 8)), 15)[1][0] for s in range(50)}
    assert starts == {2, 3, 4, 5}  # every start that keeps the window inside steps 2 .. 7
    assert plan_sde_steps(SDEConfig(seed=4), 15) == plan_sde_steps(SDEConfig(seed=4), 15)
    stochastic, trained = plan_sde_steps(SDEConfig(steps="random", seed=1), 9)
    assert stochastic == list(range(9)) and len(trained) == 5 and trained == sorted(set(trained))
    assert plan_sde_steps(SDEConfig(steps="all"), 4) == ([0, 1, 2, 3], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="sde_window_range"):
        plan_sde_steps(SDEConfig(window_size=3, window_range=(0, 2)), 10)
    with pytest.raises(ValueError, match="sde_num_train_steps"):
        plan_sde_steps(SDEConfig(steps="random", num_train_steps=11), 10)
    for kw, name in (({"steps": "some"}, "sde_steps"), ({"noise_level": 0.0}, "noise_level"),
                     ({"window_size": 0}, "sde_window_size")):
        with pytest.raises(ValueError, match=name):
            SDEConfig(**kw)


# --------------------------------------------------------------------------------------- the loss by hand
# one image, 2 steps x 2 tokens, log-ratios [[ln 1.5, ln 0.5], [ln 1.1, ln 0.7]], A = 1, epsilon 0.2:
#   token losses -min(r, clip(r)) = [[-1.2, -0.5], [-1.1, -0.7]]
LOGP = torch.log(torch.tensor([[[1.5, 0.5], [1.1, 0.7]]]))


def test_flow_loss_token_and_step_levels_by_hand():
    out = flow_grpo_loss(LOGP, torch.zeros(1, 2, 2), torch.tensor([1.0]), steps=[3, 4], loss_type="bnpo")
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 - 0.7) / 4, abs=1e-6)
    assert out.metrics["clip_ratio/region_mean/step_3"] == 0.5 and out.metrics["clip_ratio/region_mean/step_4"] == 0.0
    assert out.metrics["clip_ratio/region_mean"] == 0.25
    # dr_grpo: sum / (images x steps x tokens); grpo: per-image mean
    assert flow_grpo_loss(LOGP, torch.zeros(1, 2, 2), torch.tensor([1.0]), loss_type="dr_grpo").loss.item() == \
        pytest.approx(-3.5 / 4, abs=1e-6)
    # "step": one ratio per step, exp(mean log-ratio of its tokens) = sqrt(0.75), sqrt(0.77), inside the clip range
    out = flow_grpo_loss(LOGP, torch.zeros(1, 2, 2), torch.tensor([1.0]), importance_sampling_level="step",
                         loss_type="grpo")
    assert out.ratio.squeeze(-1).tolist() == pytest.approx([math.sqrt(0.75), math.sqrt(0.77)], abs=1e-6)
    assert out.loss.item() == pytest.approx(-(math.sqrt(0.75) + math.sqrt(0.77)) / 2, abs=1e-6)
    # "sequence": one ratio per image, exp(mean of its 4 log-ratios) = 0.5775 ** 0.25, inside the clip range
    out = flow_grpo_loss(LOGP, torch.zeros(1, 2, 2), torch.tensor([1.0]), importance_sampling_level="sequence",
                         steps=[3, 4])
    assert out.loss.item() == pytest.approx(-(0.5775**0.25), abs=1e-6)
    assert out.metrics["clip_ratio/region_mean/step_3"] == 0.0
    # "step" with dr_grpo gives the same normaliser as "token" (images x steps x tokens)
    token = flow_grpo_loss(LOGP, LOGP, torch.tensor([1.0]), loss_type="dr_grpo").loss
    step = flow_grpo_loss(LOGP, LOGP, torch.tensor([1.0]), loss_type="dr_grpo", importance_sampling_level="step").loss
    assert token.item() == pytest.approx(-1.0) and step.item() == pytest.approx(-1.0)


def test_flow_loss_exact_kl_and_dense_weighting():
    logps = torch.randn(2, 3, 4, requires_grad=True)
    dense = torch.tensor([[2.0, 0.0, 1.0, 1.0], [-1.0, -3.0, 0.0, 0.0]])
    out = flow_grpo_loss(logps, logps.detach(), dense, steps=[0, 1, 2], loss_type="dapo")
    out.loss.backward()
    # ratio 1: d loss / d logp[b, s, t] = -A[b, t] / (images x steps x tokens), the same on every step
    assert torch.allclose(logps.grad, -dense[:, None, :].expand(2, 3, 4) / 24)
    kl = torch.rand(2, 3, 4)
    base = flow_grpo_loss(logps, logps.detach(), dense, loss_type="bnpo").loss
    out = flow_grpo_loss(logps, logps.detach(), dense, exact_kl=kl, beta=0.1, loss_type="bnpo", steps=[5, 6, 7])
    assert out.loss.item() == pytest.approx(base.item() + 0.1 * kl.mean().item(), abs=1e-6)
    assert out.metrics["kl"] == pytest.approx(kl.mean().item(), abs=1e-6)
    assert out.metrics["kl/step_6"] == pytest.approx(kl[:, 1].mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- on tiny BAGEL
@pytest.fixture
def bagel():
    return tiny_bagel_backend(WORDS, seed=0, num_timesteps=7)


def test_sde_sampler_records_what_training_recomputes(bagel):
    config = GenerationConfig(guidance=3.0, sde=SDEConfig(steps="all", seed=0))
    rollout = bagel.generate(PROMPTS, config, seed=5)
    trajectory = rollout.trajectory
    assert trajectory.steps.tolist() == list(range(6)) and trajectory.logprobs.shape == (4, 6, 16)
    assert trajectory.latents.shape == trajectory.next_latents.shape == (4, 6, 16, 64)
    assert torch.equal(trajectory.latents[:, 1:], trajectory.next_latents[:, :-1])  # consecutive states
    steps = bagel.step_logprobs(rollout.prompts, rollout)
    assert torch.allclose(steps.logprobs, trajectory.logprobs, atol=1e-4)  # the recorded log-densities
    # the drawn states are the means plus std-scaled standard normal noise (4 images x 16 tokens x 64 numbers a step)
    z = (trajectory.next_latents - steps.means.detach()) / steps.std.view(1, -1, 1, 1)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03
    assert torch.allclose(steps.logprobs, step_logprob(trajectory.next_latents, steps.means,
                                                       steps.std.view(1, -1, 1, 1)))
    assert torch.equal(bagel.generate(PROMPTS, config, seed=5).trajectory.next_latents, trajectory.next_latents)
    # scored with another velocity (no CFG), the same steps are less likely: the guidance is part of the policy
    rollout.guidance = 1.0
    assert not torch.allclose(bagel.step_logprobs(rollout.prompts, rollout).logprobs, trajectory.logprobs, atol=1e-2)
    # a window: deterministic steps before it are the ODE sampler's, so the state entering it is the ODE's
    window = bagel.generate(PROMPTS, GenerationConfig(guidance=3.0, sde=SDEConfig(window_range=(4, 6))), seed=5)
    ode = bagel.generate(PROMPTS, GenerationConfig(guidance=3.0, sde=SDEConfig(steps="all", noise_level=1e-30)),
                         seed=5)
    assert window.trajectory.steps.tolist() == [4, 5]
    assert torch.allclose(window.trajectory.latents[:, 0], ode.trajectory.latents[:, 4], atol=1e-5)
    deterministic = bagel.generate(PROMPTS, GenerationConfig(guidance=3.0), seed=5)
    assert deterministic.trajectory is None and torch.allclose(deterministic.tokens, ode.tokens, atol=1e-5)
    assert rollout.select([2, 0]).trajectory.logprobs.shape == (2, 6, 16)


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=2,
                logging_steps=1, bf16=False, report_to=[], learning_rate=1e-2, guidance_scale=3.0,
                save_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return GRPOUMMConfig(**base)


def _alternating(prompts, completions, **kwargs):
    return [float(i % 2) for i in range(len(prompts))]


def test_old_logps_give_ratio_one_at_the_first_iteration(bagel, tmp_path):
    trainer = GRPOUMMTrainer(bagel, reward_funcs=[_alternating],
                             args=_config(tmp_path, per_device_train_batch_size=2, steps_per_generation=2,
                                          num_iterations=2), train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.model.train()
    first = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2] for _ in range(2)])
    assert first["old_logps"] is not None and first["old_logps"].shape == (2, 2, 16)  # window of 2 steps
    logps = trainer.backend.step_logprobs(first["rollout"].prompts, first["rollout"]).logprobs
    assert torch.equal(logps.detach(), first["old_logps"])  # the same rows and computation: ratio exactly 1
    trainer.compute_loss(trainer.model, first).backward()
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/region_mean"] == [0.0] and metrics["sampling/sampling_logp_difference/max"][0] < 1e-4
    with pytest.raises(ValueError, match="importance_sampling_level='step'"):
        from srum_trl.models.janus import build_tiny_janus

        model, processor = build_tiny_janus(WORDS, seed=0)
        GRPOUMMTrainer(model, reward_funcs=[_alternating], processing_class=processor,
                       args=_config(tmp_path, importance_sampling_level="step"),
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def test_flow_grpo_trains_the_lora_adapter_with_dense_advantages_and_exact_kl(bagel, tmp_path):
    from peft import LoraConfig

    judge = UMMJudgeRewardFunction(map_rule="signed")
    trainer = GRPOUMMTrainer(bagel, reward_funcs=[judge, _alternating],
                             args=_config(tmp_path, beta=0.1, advantage_mode="dense", reward_weights=[1.0, 0.5],
                                          sde_steps="random", sde_num_train_steps=3),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                             peft_config=LoraConfig(r=2, lora_alpha=4))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "_moe_gen" in n for n in trained)  # the generation expert only
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items() if k in before)
    first, second = trainer.state.log_history[0], trainer.state.log_history[1]
    for key in ("loss", "reward", "reward_std", "rewards/umm_judge/mean", "rewards/_alternating/mean",
                "frac_reward_zero_std", "clip_ratio/region_mean", "kl", "sampling/sampling_logp_difference/mean",
                "flow/trained_steps"):
        assert key in first, key
    assert first["flow/trained_steps"] == 3 and sum(k.startswith("kl/step_") for k in first) == 3
    assert first["kl"] == pytest.approx(0.0, abs=1e-10)  # a fresh adapter (B = 0) is the reference
    assert second["kl"] > 0 and all(math.isfinite(v) for v in (first["loss"], second["loss"]))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_flow_grpo_raises_a_reward_on_the_latents(tmp_path, sign):
    """The policy gradient has the right sign: 10 rounds of flow GRPO (LoRA, SDE window) raise a reward that reads the
    latents (+/- the mean of latent channel 0), measured on fixed-seed ODE samples before and after."""
    from peft import LoraConfig

    bagel = tiny_bagel_backend(WORDS, seed=0, num_timesteps=6)

    def reward(tokens):
        return sign * tokens[:, 0].mean(dim=(1, 2))

    def evaluate():
        return float(reward(bagel.generate(PROMPTS[:2] * 16, GenerationConfig(guidance=1.0), seed=123).tokens).mean())

    before = evaluate()
    trainer = GRPOUMMTrainer(bagel, reward_funcs=[_alternating],
                             args=_config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_steps=10,
                                          guidance_scale=1.0, warmup_steps=0),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
                             peft_config=LoraConfig(r=8, lora_alpha=16))
    trainer._score = lambda rollout, batch: (reward(rollout.tokens)[:, None].float(), None)  # the latents' reward
    trainer.train()
    assert evaluate() > before + 0.03


def test_grpo_command_on_a_bagel_folder(bagel, tmp_path):
    from srum_trl.cli import main

    folder = str(tmp_path / "bagel")
    bagel.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = str(tmp_path / "run")
    main(["grpo", "--model_name_or_path", folder, "--prompts", str(prompts), "--output_dir", out,
          "--num_generations", "2", "--per_device_train_batch_size", "4", "--max_steps", "1", "--bf16", "false",
          "--report_to", "none", "--save_strategy", "no", "--guidance_scale", "3", "--dtype", "float32",
          "--use_peft", "--lora_r", "2", "--beta", "0.05", "--sde_window_size", "1",
          "--model_init_kwargs", json.dumps({**TINY_BACKEND_SETTINGS, "num_timesteps": 5})])
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_grpo_bagel_example_runs(bagel, tmp_path):
    import importlib.util

    folder = str(tmp_path / "bagel")
    bagel.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("grpo_bagel", os.path.join(root, "examples", "grpo_bagel.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = str(tmp_path / "run")
    example.main(["--model_name_or_path", folder, "--prompts", str(prompts), "--output_dir", out,
                  "--image_size", "64", "--num_timesteps", "5", "--vit_max_size", "56", "--vit_min_size", "28",
                  "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                  "1", "--max_steps", "1", "--bf16", "false", "--dtype", "float32", "--report_to", "none",
                  "--save_strategy", "no", "--use_peft", "--lora_r", "2", "--advantage_mode", "dense"])
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_evidence_grpo_arms_run_on_a_bagel_base(tmp_path, monkeypatch):
    """The ShapesWorld evidence runner's GRPO arms on a BAGEL-architecture base (a random tiny one here): flow GRPO
    with the self-judge, dense advantages and the exact scorer, trained and evaluated end to end."""
    from srum_trl.shapes import evidence

    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the runner gives each job every core: one thread here
    from srum_trl.shapes.questions import VOCABULARY

    base = str(tmp_path / "flow-base")
    tiny_bagel_backend(VOCABULARY, seed=0).save_pretrained(base)
    out = str(tmp_path / "evidence")
    settings = {**TINY_BACKEND_SETTINGS, "num_timesteps": 4}
    result = evidence.main(["--base", base, "--out", out, "--arms", "grpo", "grpo_dense", "grpo_oracle", "--seeds", "0",
                            "--steps", "1", "--batch_size", "4", "--num_generations", "2", "--eval_prompts", "4",
                            "--train_eval_prompts", "4", "--track_prompts", "4", "--track_every", "1",
                            "--understanding_prompts", "1", "--device", "cpu", "--guidance", "2.0",
                            "--backend_kwargs", json.dumps(settings), "--grpo_config", '{"sde_window_size": 1}'])
    rows = {r["arm"]: r for r in result["runs"]}
    assert set(rows) == {"grpo", "grpo_dense", "grpo_oracle"}
    for arm, row in rows.items():
        assert "error" not in row, row.get("traceback")
        assert 0.0 <= row["heldout"]["overall"] <= 1.0 and [h["step"] for h in row["history"]] == [0, 1]
        assert row["train_logs"][0]["flow/trained_steps"] == 1.0  # flow GRPO: a window of one SDE step
    assert any(k.startswith("clip_ratio/region_mean/step_") for k in rows["grpo_dense"]["train_logs"][0])
    assert os.path.exists(os.path.join(out, "evidence.md")) and result["config"]["grpo_config"] == {"sde_window_size": 1}
