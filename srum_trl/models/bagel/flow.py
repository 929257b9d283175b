"""BAGEL's flow sampler, deterministic or stochastic, and the recomputation of its stochastic steps for flow GRPO.

[`sample_latents`] runs BAGEL's sampler (Euler steps over the shifted grid, text CFG inside `cfg_interval` with the
official renormalisation). Given an [`SDEConfig`] it takes the SDE step of `models/flow_sde.py` on the steps that the
config picks (same marginals, Gaussian steps) and records the trained ones (state before, state drawn, per-token
log-density) in a [`FlowTrajectory`]; every other step is the very Euler step of the deterministic sampler.

[`recompute_step_logprobs`] evaluates the recorded steps again under the model as it is now (training mode, with
gradients): one forward over every (image, step) row, prompt and latents together (`context_velocity`), with the
unconditional rows of the steps inside the CFG interval appended, so that the loss scores exactly the velocity that
sampled: guided where the sampler guided, conditional elsewhere.
"""

from __future__ import annotations

import torch

from ..flow_sde import FlowSteps, FlowTrajectory, SDEConfig, plan_sde_steps, recompute_steps, sde_step, step_logprob


def _guide(backend, v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    from .backend import guide_velocity

    return guide_velocity(v_cond, v_uncond, guidance, backend.cfg_renorm_type, backend.cfg_renorm_min)


def _inside_cfg(backend, t: float, guidance: float) -> bool:
    lo, hi = backend.cfg_interval
    return guidance != 1.0 and lo < t <= hi


def sample_latents(backend, prompts: list[str], guidance: float, generator: torch.Generator,
                   sde: SDEConfig | None = None) -> tuple[torch.Tensor, FlowTrajectory | None]:
    """Latent tokens `[B, h*w, 64]` (float32, on the model's device) for the prompts, and the trajectory of the
    trained SDE steps (None without `sde`). Initial and SDE noise come from `generator` (CPU), so a seed gives the
    same images on every device."""
    from .backend import sampling_timesteps

    device = backend.device
    ids, valid = backend._left_pad([backend._prompt_ids(p) for p in prompts])
    B = ids.shape[0]
    cache = backend._call("context", ids=ids, valid=valid)
    text_len = valid.long().sum(-1)
    guided = guidance != 1.0
    if guided:
        cache2 = [(torch.cat([k, k]), torch.cat([v, v])) for k, v in cache]
        valid2 = torch.cat([valid, torch.zeros_like(valid)])
        pos2 = torch.cat([text_len, torch.zeros_like(text_len)])
    grid = backend.token_grid
    n = grid[0] * grid[1]
    x = torch.randn(B, n, backend.config.patch_latent_dim, generator=generator).to(device)
    ts = sampling_timesteps(backend.num_timesteps, backend.timestep_shift, device=device)
    num_steps = backend.num_timesteps - 1
    stochastic, trained = plan_sde_steps(sde, num_steps) if sde is not None else ([], [])
    t_cap = float(ts[1])
    markers = backend._markers()
    records = []
    for i in range(num_steps):
        t = ts[i]
        if _inside_cfg(backend, float(t), guidance):
            v = backend._call("velocity", x_t=torch.cat([x, x]), t=t.expand(2 * B), grid=grid, markers=markers,
                              image_positions=pos2, cache=cache2, cache_valid=valid2).float()
            v = _guide(backend, v[:B], v[B:], guidance)
        else:
            v = backend._call("velocity", x_t=x, t=t.expand(B), grid=grid, markers=markers,
                              image_positions=text_len, cache=cache, cache_valid=valid).float()
        if i in stochastic:
            mean, std = sde_step(x, v, t, ts[i + 1], sde.noise_level, t_cap)
            x_next = mean + std * torch.randn(x.shape, generator=generator).to(device)
            if i in trained:
                records.append((x.cpu(), x_next.cpu(), step_logprob(x_next, mean, std).cpu()))
        else:
            x_next = x - v * (ts[i] - ts[i + 1])
        x = x_next
    if sde is None:
        return x, None
    trajectory = FlowTrajectory(
        timesteps=ts.float().cpu(),
        steps=torch.tensor(trained, dtype=torch.long),
        latents=torch.stack([r[0] for r in records], 1),
        next_latents=torch.stack([r[1] for r in records], 1),
        logprobs=torch.stack([r[2] for r in records], 1),
        noise_level=float(sde.noise_level),
    )
    return x, trajectory


def recompute_step_logprobs(backend, prompts: list[str], rollout) -> FlowSteps:
    """[`FlowSteps`] of the rollout's recorded steps under the model as it is now (differentiable): see the module
    docs. One forward of `B * S` rows, plus one unconditional row per (image, step) inside the CFG interval."""
    trajectory = rollout.trajectory
    if trajectory is None:
        raise ValueError("step_logprobs needs a rollout sampled with the SDE (GenerationConfig(sde=SDEConfig(...))); "
                         "this one was sampled deterministically and has no trajectory.")
    if len(prompts) != len(trajectory):
        raise ValueError(f"step_logprobs got {len(prompts)} prompts for {len(trajectory)} trajectories.")
    device = backend.device
    guidance = rollout.guidance
    steps = len(trajectory.steps)
    prompt_rows = [backend._prompt_ids(p) for p in prompts for _ in range(steps)]
    grid = tuple(rollout.grid)
    markers = backend._markers()

    def velocity(x: torch.Tensor, t: torch.Tensor, _steps: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        guided = [r for r in range(rows) if _inside_cfg(backend, float(t[r]), guidance)]
        ids, valid = backend._left_pad(prompt_rows + [[] for _ in guided])
        x, t = x.to(device), t.to(device)
        if guided:
            index = torch.tensor(guided, dtype=torch.long, device=device)
            x_all, t_all = torch.cat([x, x[index]]), torch.cat([t, t[index]])
        else:
            x_all, t_all = x, t
        v = backend._call("context_velocity", ids=ids, valid=valid, x_t=x_all, t=t_all, grid=grid,
                          markers=markers).float()
        if not guided:
            return v
        v_cond = v[:rows]
        return v_cond.index_copy(0, index, _guide(backend, v_cond[index], v[rows:], guidance))

    return recompute_steps(trajectory, velocity)

