"""Stochastic sampling of rectified-flow generators for policy-gradient training, independent of any model family.

Convention (BAGEL's, and SD3's / FLUX's): `x_t = (1 - t) x_0 + t eps`, t runs from 1 (noise) to 0 (data), the model
predicts the velocity `v(x, t) = E[eps - x_0 | x_t]`, and the deterministic sampler takes Euler steps
`x_{t'} = x_t - (t - t') v` on a grid `1 = t_0 > t_1 > ... > t_N = 0`.

The velocity also gives the score of the path, `grad log p_t(x) = -(x + (1 - t) v) / t`, so for any noise scale
`sigma_t` the reverse-time SDE

    dx = [v - (sigma_t^2 / 2) grad log p_t(x)] dt + sigma_t dw      (t decreasing)

has the same marginals `p_t` as the ODE `dx = v dt` (Flow-GRPO, arXiv 2505.05470, with `sigma_t = a sqrt(t / (1 - t))`,
`a` the noise level). One Euler-Maruyama step from t down to `t' = t - h` is a Gaussian with a diagonal covariance:

    mean = x - h [v + sigma_t^2 / (2 t) (x + (1 - t) v)]        std = sigma_t sqrt(h)

and `a = 0` gives back the Euler step. At `t = 1`, `1 - t` is floored at `1 - t_cap` (`t_cap`: the grid's second
point), so that `sigma` stays finite on the first step.

The policy of one latent token on one step is that Gaussian over the token's numbers: [`step_logprob`] is its exact
log-density (summed over the token's numbers), [`step_kl`] the exact KL between the steps of two models (both
Gaussians have the same std, which depends on the grid only). Which steps are stochastic and which are trained is an
[`SDEConfig`], resolved per round by [`plan_sde_steps`]; a backend records what a trainer needs in a
[`FlowTrajectory`] and recomputes it as [`FlowSteps`].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

SDE_STEP_MODES = ("window", "random", "all")


def _rows(value, like: torch.Tensor) -> torch.Tensor:
    """A float or a per-row tensor `[R]` shaped to broadcast against `like` `[R, ...]` (float32, `like`'s device)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.dim() == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (like.dim() - 1)))


def noise_std(t, noise_level: float, t_cap=None) -> torch.Tensor:
    """`sigma_t = a sqrt(t / (1 - t))`, with `1 - t` floored at `1 - t_cap` when `t_cap` is given."""
    t = torch.as_tensor(t, dtype=torch.float32)
    one_minus = 1.0 - t
    if t_cap is not None:
        one_minus = one_minus.clamp(min=1.0 - float(t_cap))
    return noise_level * torch.sqrt(t / one_minus)


def sde_step(x: torch.Tensor, v: torch.Tensor, t, t_next, noise_level: float, t_cap=None):
    """The Gaussian of one step from `t` to `t_next < t`: `(mean, std)`.

    Args:
        x, v: the state `x_t` and the velocity at it, `[R, ...]` (computed in float32).
        t, t_next: floats, or per-row tensors `[R]`.
        noise_level: `a` of `sigma_t = a sqrt(t / (1 - t))`; 0 gives the Euler step (std 0).
        t_cap: the largest t below 1 on the grid (keeps `sigma` finite at t = 1).

    Returns:
        `mean` like `x`, and `std` broadcastable to it (`[R, 1, ...]`, or a scalar tensor for scalar times).
    """
    x, v = x.float(), v.float()
    t_rows, next_rows = _rows(t, x), _rows(t_next, x)
    h = t_rows - next_rows
    if noise_level == 0:
        return x - h * v, torch.zeros_like(h)
    sigma = noise_std(t_rows, noise_level, t_cap).to(x.device)
    mean = x - h * (v + sigma.pow(2) / (2 * t_rows) * (x + (1 - t_rows) * v))
    return mean, sigma * torch.sqrt(h)


def step_logprob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of `sample` under `N(mean, std^2 I)`, summed over the last dimension (a token's numbers):
    `sum_c [-(x_c - mean_c)^2 / (2 std^2) - log std - log(2 pi) / 2]`. `std` must be > 0."""
    std = std.float()
    z = (sample.float() - mean.float()) / std
    per_number = -0.5 * z.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per_number.sum(-1)


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The exact `KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) = |mean - ref_mean|^2 / (2 s^2)`, summed over the last
    dimension (equal variances make it symmetric); `std` broadcasts against `mean` as in [`step_logprob`]."""
    return 0.5 * ((mean.float() - ref_mean.float()) / std.float()).pow(2).sum(-1)


# ------------------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class SDEConfig:
    """Which steps of a flow sampler are stochastic and which are trained (set by a trainer, per round).

    Attributes:
        noise_level: `a` of `sigma_t = a sqrt(t / (1 - t))` (Flow-GRPO's default 0.7).
        steps: "window": SDE on `window_size` consecutive steps starting at a random step of `window_range`, Euler
            (ODE) elsewhere, and only the window is trained (Flow-GRPO-Fast, MixGRPO); "random": SDE on every step,
            a random subset of `num_train_steps` steps trained (Flow-GRPO's training on fewer steps); "all": SDE on
            every step, every step trained (Flow-GRPO).
        window_size: steps in the window (1 to 3 is the published range).
        window_range: `(lo, hi)`: the window lies inside steps `lo .. hi - 1`. None: the first half of the steps.
        num_train_steps: "random": steps trained per round. None: half of the steps, rounded up.
        seed: seeds the choice of steps; a round uses one seed on every process, so every process trains the same
            number of steps.
    """

    noise_level: float = 0.7
    steps: str = "window"
    window_size: int = 2
    window_range: tuple[int, int] | None = None
    num_train_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.steps not in SDE_STEP_MODES:
            raise ValueError(f"sde_steps must be one of {SDE_STEP_MODES}, got {self.steps!r}.")
        if not self.noise_level > 0 or math.isinf(self.noise_level):
            raise ValueError(f"noise_level must be a positive number (the SDE's a), got {self.noise_level}.")
        if self.window_size < 1:
            raise ValueError(f"sde_window_size must be >= 1, got {self.window_size}.")
        if self.num_train_steps is not None and self.num_train_steps < 1:
            raise ValueError(f"sde_num_train_steps must be >= 1, got {self.num_train_steps}.")

    def with_seed(self, seed: int) -> "SDEConfig":
        return replace(self, seed=int(seed))


def plan_sde_steps(config: SDEConfig, num_steps: int) -> tuple[list[int], list[int]]:
    """`(stochastic, trained)` step indices (`0 .. num_steps - 1`, step i goes from grid point i to i + 1) of one
    round; `trained` is a subset of `stochastic`. A ValueError names the setting that does not fit `num_steps`."""
    generator = torch.Generator().manual_seed(config.seed)
    every = list(range(num_steps))
    if config.steps == "all":
        return every, every
    if config.steps == "random":
        k = config.num_train_steps if config.num_train_steps is not None else math.ceil(num_steps / 2)
        if k > num_steps:
            raise ValueError(f"sde_num_train_steps={k} exceeds the sampler's {num_steps} steps.")
        return every, sorted(torch.randperm(num_steps, generator=generator)[:k].tolist())
    size = config.window_size
    lo, hi = config.window_range if config.window_range is not None else (0, max(size, num_steps // 2))
    if not 0 <= lo < hi <= num_steps or hi - lo < size:
        raise ValueError(f"sde_window_range=({lo}, {hi}) must hold sde_window_size={size} consecutive steps of the "
                         f"sampler's {num_steps} (0 <= lo < hi <= {num_steps}).")
    start = int(torch.randint(lo, hi - size + 1, (1,), generator=generator))
    window = list(range(start, start + size))
    return window, window


# ------------------------------------------------------------------------------------------------ trajectories
@dataclass
class FlowTrajectory:
    """The trained steps of a batch of SDE samples (`Rollout.trajectory`), on the CPU in float32.

    Attributes:
        timesteps: `[N + 1]`, the sampler's time grid (`timesteps[0] = 1`).
        steps: `[S]` (long), the recorded steps; step `i` goes from `timesteps[i]` to `timesteps[i + 1]`.
        latents: `[B, S, n, C]`, the state before each recorded step (n latent tokens of C numbers).
        next_latents: `[B, S, n, C]`, the state the step drew.
        logprobs: `[B, S, n]`, the per-token [`step_logprob`] of the drawn state, as the sampler computed it.
        noise_level: the SDE's `a`.
    """

    timesteps: torch.Tensor
    steps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    logprobs: torch.Tensor
    noise_level: float

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def t(self) -> torch.Tensor:
        """`[S]`: the time at the start of each recorded step."""
        return self.timesteps[self.steps]

    @property
    def t_next(self) -> torch.Tensor:
        """`[S]`: the time at its end."""
        return self.timesteps[self.steps + 1]

    @property
    def t_cap(self) -> float:
        """The grid's largest time below 1 (see [`noise_std`])."""
        return float(self.timesteps[1])

    def select(self, rows) -> "FlowTrajectory":
        """The trajectory of the given rows (a list of indices or a slice)."""
        return replace(self, latents=self.latents[rows], next_latents=self.next_latents[rows],
                       logprobs=self.logprobs[rows])

    @staticmethod
    def cat(parts: list["FlowTrajectory"]) -> "FlowTrajectory":
        """Rows of several trajectories of the same plan, concatenated."""
        first = parts[0]
        if any(not torch.equal(p.steps, first.steps) for p in parts):
            raise ValueError("FlowTrajectory.cat needs trajectories of the same recorded steps.")
        return replace(first, latents=torch.cat([p.latents for p in parts]),
                       next_latents=torch.cat([p.next_latents for p in parts]),
                       logprobs=torch.cat([p.logprobs for p in parts]))


@dataclass
class FlowSteps:
    """The recorded steps of a trajectory recomputed under a model (`UMMBackend.step_logprobs`).

    Attributes:
        logprobs: `[B, S, n]`, per-token [`step_logprob`] of the recorded next state (differentiable).
        means: `[B, S, n, C]`, the step means under the model (differentiable; the KL needs them).
        std: `[S]`, the step std (the same for every model).
    """

    logprobs: torch.Tensor
    means: torch.Tensor
    std: torch.Tensor


def recompute_steps(trajectory: FlowTrajectory, velocity) -> FlowSteps:
    """[`FlowSteps`] of `trajectory` under a velocity function.

    `velocity(x_t [B * S, n, C], t [B * S], row_steps [B * S])` returns the velocities of all recorded steps at once
    (rows image-major: row `b * S + s` is step `s` of image `b`), on the device of its output.
    """
    B, S, n, C = trajectory.latents.shape
    t, t_next = trajectory.t.repeat(B), trajectory.t_next.repeat(B)
    x = trajectory.latents.reshape(B * S, n, C)
    v = velocity(x, t, trajectory.steps.repeat(B))
    x = x.to(v.device)
    mean, std = sde_step(x, v, t, t_next, trajectory.noise_level, trajectory.t_cap)
    sample = trajectory.next_latents.reshape(B * S, n, C).to(v.device)
    logprobs = step_logprob(sample, mean, std)
    return FlowSteps(logprobs=logprobs.view(B, S, n), means=mean.view(B, S, n, C),
                     std=std.reshape(B, S)[0].detach())
