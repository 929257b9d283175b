"""Flow GRPO: the path of [`GRPOUMMTrainer`] for flow-matching backends (continuous latents, `token_kind ==
"continuous"`), as in Flow-GRPO (arXiv 2505.05470) and its window variants (Flow-GRPO-Fast, MixGRPO).

The policy of a flow model is its SDE sampler: each stochastic denoising step draws every latent token from a
Gaussian whose mean the velocity sets (`srum_trl.models.flow_sde`). So a rollout carries, per image, per trained
step and per latent token, the log-density of the step it took (`[rows, steps, tokens]`), and training recomputes it
under the current policy (`backend.step_logprobs`). From there it is TRL's GRPO loss, unchanged, on those
log-densities: the per-step, per-token ratio, clipping by `epsilon` / `epsilon_high`, the `loss_type` aggregation
over every (step, token) of the micro-batch, and with `beta > 0` the exact KL between the step Gaussians of the
policy and of the reference (adapters off), which have the same std. Advantages are per image (scalar) or per latent
token (dense, from the judge's reward map), the same for every step.

Old log-probabilities follow TRL's rule: when a round is used within one optimizer step they are the current ones,
detached (ratio exactly 1); otherwise they are recomputed without gradients right after sampling, one micro-batch at a
time with the very rows that micro-step trains, so that the ratio is exactly 1 at the first iteration too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..models.flow_sde import step_kl
from .base import nanmean
from .grpo_loss import GRPOLossOutput, grpo_loss


def flow_grpo_loss(
    per_step_logps: torch.Tensor,
    old_per_step_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    steps: list[int] | None = None,
    exact_kl: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> GRPOLossOutput:
    """[`grpo_loss`] over `[B, S, n]` per-step, per-token log-probabilities (S trained steps, n latent tokens).

    Every (step, token) is one "token" of TRL's loss: `max_completion_length` defaults to `S * n` and `num_items`
    counts (step, token) pairs. `importance_sampling_level`: "token" (one ratio per step and token), "step" (one
    per image and step: the exp of the mean log-ratio over the step's tokens), "sequence" (one per image).

    Args:
        per_step_logps, old_per_step_logps: `[B, S, n]`.
        advantages: `[B]` (scalar) or `[B, n]` (dense; the same for every step).
        steps: the sampler's index of each of the S steps (names the per-step metrics; default 0 .. S - 1).
        exact_kl: `[B, S, n]`, the per-token KL to the reference (differentiable), required when `beta > 0`.

    Returns:
        [`GRPOLossOutput`] whose metrics add, per step `i`, `clip_ratio/region_mean/step_i` and (with a KL)
        `kl/step_i`.
    """
    B, S, n = per_step_logps.shape
    steps = list(range(S)) if steps is None else [int(s) for s in steps]
    adv = advantages.to(per_step_logps.device, per_step_logps.dtype)
    adv = (adv[:, None, None] if adv.dim() == 1 else adv[:, None, :]).expand(B, S, n)
    length = max_completion_length if max_completion_length is not None else S * n
    if importance_sampling_level == "step":
        rows, width, level, length = B * S, n, "sequence", length / S
    else:
        rows, width, level = B, S * n, importance_sampling_level
    out = grpo_loss(
        per_step_logps.reshape(rows, width),
        old_per_step_logps.reshape(rows, width),
        adv.reshape(rows, width),
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=length,
        num_items=num_items,
        exact_kl=exact_kl.reshape(rows, width) if exact_kl is not None else None,
    )
    ratio = out.ratio.reshape(B, 1, 1) if importance_sampling_level == "sequence" else out.ratio.reshape(B, S, -1)
    ratio = ratio.expand(B, S, n)
    high = epsilon_low if epsilon_high is None else epsilon_high
    region = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    for s, step in enumerate(steps):
        out.metrics[f"clip_ratio/region_mean/step_{step}"] = float(region[:, s].float().mean())
        if out.per_token_kl is not None:
            out.metrics[f"kl/step_{step}"] = float(out.per_token_kl.reshape(B, S, n)[:, s].mean())
    return out


class FlowGRPOMixin:
    """The flow-backend methods of [`GRPOUMMTrainer`]: rounds sampled with the SDE, micro-batches with their old
    log-probs and reference means, and the loss. Uses the trainer's `backend`, `ref_backend`, `args`, `generation`,
    `accelerator`, `_metrics`, `_gather` and `_as_forward`."""

    def _flow_generation(self):
        """This round's generation config: the SDE steps drawn from the run's seed and the micro-step, the same on
        every process (so every process trains as many steps)."""
        seed = self.args.seed * 1_000_033 + self._step * 131 + self.state.global_step
        return replace(self.generation, sde=self.generation.sde.with_seed(seed))

    def _flow_finish_round(self, out: dict, mode: str) -> dict:
        """Per-round bookkeeping of a scored flow round: the loss normaliser and the sampled steps; in evaluation
        (served whole, not split) the reference means too."""
        rollout = out["rollout"]
        trajectory = rollout.trajectory
        per_image = len(trajectory.steps) * math.prod(rollout.grid)
        steps = self.args.steps_per_generation if mode == "train" else 1
        local = torch.tensor([float(len(rollout) * per_image)], device=self.accelerator.device)
        out["num_items"] = float(self.accelerator.gather(local).sum()) / self.accelerator.num_processes / steps
        metrics = self._metrics[mode]
        metrics["flow/trained_steps"].append(float(len(trajectory.steps)))
        metrics["flow/first_trained_step"].append(float(trajectory.steps.min()))
        if mode == "eval":
            return self._flow_prepare(out, old=False)
        return out

    def _flow_split(self, round_: dict) -> list[dict]:
        """Shuffle a round, cut it into `steps_per_generation` micro-batches and give each its old log-probs (when
        the round outlives one optimizer step) and reference means (`beta > 0`)."""
        spg = self.args.steps_per_generation
        n = len(round_["rollout"])
        perm = torch.randperm(n).tolist()
        size = math.ceil(n / spg)
        generate_every = spg * self.args.num_iterations
        old = self.args.gradient_accumulation_steps % generate_every != 0
        batches = []
        for i in range(0, n, size):
            rows = perm[i : i + size]
            item = {"rollout": round_["rollout"].select(rows), "advantages": round_["advantages"][rows],
                    "num_items": round_["num_items"]}
            batches.append(self._flow_prepare(item, old))
        return batches

    @torch.no_grad()
    def _flow_prepare(self, item: dict, old: bool) -> dict:
        rollout = item["rollout"]
        item["old_logps"], item["ref_means"] = None, None
        if old:
            logps = self._as_forward(self.backend.step_logprobs, rollout.prompts, rollout).logprobs.float()
            self._flow_log_mismatch(logps, rollout, "train")
            item["old_logps"] = logps.cpu()
        if self.ref_backend is self.backend:  # PEFT: the model with its adapters disabled
            with self.backend.frozen():
                item["ref_means"] = self._as_forward(self.backend.step_logprobs, rollout.prompts, rollout).means.cpu()
        elif self.ref_backend is not None:  # a frozen, unsharded copy
            item["ref_means"] = self.ref_backend.step_logprobs(rollout.prompts, rollout).means.cpu()
        return item

    def _flow_log_mismatch(self, logps: torch.Tensor, rollout, mode: str) -> None:
        """Mean and max |log-prob recomputed for training - log-prob recorded by the sampler| (same policy)."""
        diff = (logps.detach().float().cpu() - rollout.trajectory.logprobs.float()).abs()
        mean, top = self._gather([float(diff.mean())]), self._gather([float(diff.max())])
        self._metrics[mode]["sampling/sampling_logp_difference/mean"].append(nanmean(mean))
        self._metrics[mode]["sampling/sampling_logp_difference/max"].append(max(top))

    def _flow_compute_loss(self, model, inputs: dict, mode: str) -> torch.Tensor:
        rollout = inputs["rollout"]
        with self.backend.using(model):  # through the DDP / FSDP wrapper, so gradients are synchronised
            steps = self._as_forward(self.backend.step_logprobs, rollout.prompts, rollout)
        logps = steps.logprobs
        old = inputs.get("old_logps")
        if old is None:  # the policy that sampled: ratio exactly 1, and the sampling / training mismatch to log
            self._flow_log_mismatch(logps, rollout, mode)
        kl = None
        if self.args.beta != 0.0:
            ref = inputs["ref_means"].to(steps.means.device)
            kl = step_kl(steps.means, ref, steps.std.to(steps.means.device).view(1, -1, 1, 1))
        out = flow_grpo_loss(
            logps,
            logps.detach() if old is None else old.to(logps.device),
            inputs["advantages"],
            steps=rollout.trajectory.steps.tolist(),
            exact_kl=kl,
            beta=self.args.beta,
            epsilon_low=self.args.epsilon,
            epsilon_high=self.args.epsilon_high,
            loss_type=self.args.loss_type,
            importance_sampling_level=self.args.importance_sampling_level,
            max_completion_length=self.args.max_completion_length,
            num_items=inputs.get("num_items"),
        )
        keys = list(out.metrics)
        gathered = self._gather([out.metrics[k] for k in keys])  # process after process
        for i, key in enumerate(keys):
            self._metrics[mode][key].append(nanmean(gathered[i :: len(keys)]))
        return out.loss
