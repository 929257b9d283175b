"""The tensor core of GRPO on image tokens: rewards -> advantages (scalar or dense) -> clipped surrogate loss.

Pure functions over tensors, so each one is tested against hand computations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from trl.trainer.utils import nanstd


@dataclass
class GRPOLossOutput:
    """What [`grpo_loss`] returns.

    Attributes:
        loss: the scalar loss (before gradient-accumulation scaling).
        ratio: the detached importance weights, `[B, T]` (token level) or `[B, 1]` (sequence level).
        per_token_kl: the detached k3 KL per token, or None when `beta == 0`.
        metrics: TRL's names: `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`, and `kl`
            when `beta != 0`.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    per_token_kl: torch.Tensor | None
    metrics: dict[str, float]


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    exact_kl: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> GRPOLossOutput:
    """TRL's GRPO loss on tensors.

    `ratio = exp(logp - old)` per token (or `exp(mean_t(logp - old))` per sequence);
    `per_token_loss = -min(ratio * A_t, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A_t) + beta * KL_t` with
    `KL_t = exp(ref - logp) - (ref - logp) - 1`; then, over the masked tokens:
    "grpo" the mean over sequences of each sequence's token mean; "bnpo" the token mean; "dr_grpo" the sum over
    `B * max_completion_length`; "dapo" the sum over `num_items` (the mean number of tokens per micro-batch of
    the generation round; default: the tokens of this batch). `importance_sampling_ratio` (`[B, T]` or `[B, 1]`,
    TRL's correction for the sampler's numerics) multiplies the clipped surrogate before the KL term is added.

    Args:
        per_token_logps, old_per_token_logps, ref_per_token_logps, mask: `[B, T]`.
        advantages: `[B]` (one per sequence) or `[B, T]` (dense).
        exact_kl: `[B, T]`, a differentiable per-token KL to the reference known in closed form (e.g. between the
            Gaussian steps of a flow SDE); used with `beta` instead of the k3 estimate from `ref_per_token_logps`.
    """
    if mask is None:
        mask = torch.ones_like(per_token_logps)
    mask = mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(per_token_logps.device, per_token_logps.dtype)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    log_ratio = per_token_logps - old_per_token_logps.to(per_token_logps.device)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}.")
    coef_1 = torch.exp(log_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio.to(per_token_loss.device, per_token_loss.dtype)
    per_token_kl = None
    if beta != 0.0:
        if exact_kl is not None:
            per_token_kl = exact_kl.to(per_token_logps.device, per_token_logps.dtype)
        elif ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps (or exact_kl).")
        else:
            delta = ref_per_token_logps.to(per_token_logps.device) - per_token_logps
            per_token_kl = torch.exp(delta) - delta - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = per_token_loss.expand_as(mask)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * length)
    elif loss_type == "dapo":
        normaliser = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        loss = (per_token_loss * mask).sum() / normaliser.clamp(min=1.0)
    else:
        raise ValueError(f"loss_type must be one of 'grpo', 'dr_grpo', 'dapo', 'bnpo', got {loss_type!r}.")

    def masked_mean(x: torch.Tensor) -> float:
        if x.shape[1] == 1:  # one value per sequence
            return float(x.float().mean())
        return float((x * mask).sum() / mask.sum().clamp(min=1.0))

    is_low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    metrics = {
        "clip_ratio/low_mean": masked_mean(is_low.float()),
        "clip_ratio/high_mean": masked_mean(is_high.float()),
        "clip_ratio/region_mean": masked_mean((is_low | is_high).float()),
    }
    if per_token_kl is not None:
        metrics["kl"] = masked_mean(per_token_kl.detach())
        per_token_kl = per_token_kl.detach()
    return GRPOLossOutput(loss, coef_1.detach(), per_token_kl, metrics)


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[N, F]` rewards -> `[N]`: the weighted sum skipping NaN (TRL's `nansum`); NaN where every function is NaN."""
    rewards = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), math.nan)


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's advantages of `[N]` rewards in consecutive groups of `num_generations`.

    `A = r - nanmean_group(r)`, divided by `std + 1e-4` where std is the group's ("group"), the batch's ("batch")
    or not at all ("none"). NaN rewards are left out of the statistics and get advantage 0. Returns the advantages
    and, per row, whether the std used (the group's for "group"/"none") is zero.
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def normalise_token_map(token_map: torch.Tensor, rule: str) -> torch.Tensor:
    """A reward map on [0, 1]: the "signed" rule's [-1, 1] maps by (m + 1) / 2; other rules ("srum": already in
    [0, 1], custom rules) are clamped to [0, 1]."""
    token_map = token_map.float()
    if rule == "signed":
        token_map = (token_map + 1.0) / 2.0
    return token_map.clamp(0.0, 1.0)


def dense_advantages(advantages: torch.Tensor, token_maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spread per-image advantages `[N]` over tokens with reward maps `[N, T]` in [0, 1].

    `A_t = A * m_t / mean_t(m)` for A >= 0 (credit where the judge liked the image) and
    `A_t = A * (1 - m_t) / mean_t(1 - m)` for A < 0 (blame where it disliked it). The mean over tokens of A_t is A.
    A map with (nearly) zero mean weight falls back to the uniform weight 1.
    """
    token_maps = token_maps.to(advantages.device, torch.float32)

    def relative(m: torch.Tensor) -> torch.Tensor:
        mean = m.mean(-1, keepdim=True)
        return torch.where(mean > eps, m / mean.clamp(min=eps), torch.ones_like(m))

    weights = torch.where(advantages[:, None] >= 0, relative(token_maps), relative(1.0 - token_maps))
    return advantages[:, None].float() * weights
