"""How close the flow SDE's marginals are to the exact ones, on data whose velocity is known in closed form.

Data x0 ~ N(m, s0^2) (one dimension, m = 1.5, s0 = 0.5); the path x_t = (1 - t) x0 + t eps has the marginals
N((1 - t) m, (1 - t)^2 s0^2 + t^2) and the exact velocity E[eps - x0 | x_t]. Samples are drawn from N(0, 1) at t = 1
and moved to t = 0 with the deterministic Euler sampler (ODE) or with the SDE of `srum_trl.models.flow_sde`
(noise level a), on a linear grid of N steps; the table gives, at a few times, the relative error of the samples'
std and the error of their mean against the exact marginal. tests/test_flow_grpo.py checks the same at 100 steps.

    python scripts/flow_sde_marginals.py [--out docs/results/flow_sde_marginals.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from srum_trl.models.flow_sde import sde_step

M, S0 = 1.5, 0.5


def gaussian_velocity(m: float = M, s0: float = S0):
    """The exact velocity E[eps - x0 | x_t] for x0 ~ N(m, s0^2), x_t = (1 - t) x0 + t eps."""

    def v(x, t):
        a = 1 - t
        var = a * a * s0 * s0 + t * t
        return t / var * (x - a * m) - (m + a * s0 * s0 / var * (x - a * m))

    return v


def simulate(num_steps: int, noise_level: float, samples: int, seed: int, score_correction: bool = True):
    """The grid `[N + 1]` and the states at every grid point (`[samples, 1, 1]` each). `noise_level` 0: the ODE;
    `score_correction=False`: the Euler step plus the SDE's noise, without the score term (a wrong SDE)."""
    v = gaussian_velocity()
    ts = torch.linspace(1, 0, num_steps + 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, 1, generator=g)
    states = [x]
    for i in range(num_steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        mean, std = sde_step(x, v(x, t), t, t_next, noise_level, float(ts[1]))
        if not score_correction:
            mean = sde_step(x, v(x, t), t, t_next, 0.0)[0]
        x = mean + std * torch.randn(x.shape, generator=g)
        states.append(x)
    return ts, states


def exact(t: float) -> tuple[float, float]:
    return (1 - t) * M, math.sqrt((1 - t) ** 2 * S0**2 + t**2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON output file")
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--noise_level", type=float, default=0.7)
    args = parser.parse_args(argv)
    rows = []
    for steps in (15, 50, 100):
        for name, a in (("ODE", 0.0), ("SDE", args.noise_level)):
            ts, states = simulate(steps, a, args.samples, seed=0)
            for t_target in (0.9, 0.5, 0.0):
                i = min(range(steps + 1), key=lambda j: abs(float(ts[j]) - t_target))
                mean, std = exact(float(ts[i]))
                x = states[i]
                rows.append({"steps": steps, "sampler": name, "t": round(float(ts[i]), 3),
                             "std_rel_error": round(x.std().item() / std - 1, 4),
                             "mean_error": round(x.mean().item() - mean, 4)})
    print(f"x0 ~ N({M}, {S0}^2), {args.samples} samples, a = {args.noise_level}, linear grid")
    print("| steps | sampler | t | std rel. error | mean error |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['sampler']} | {r['t']} | {100 * r['std_rel_error']:+.2f}% | {r['mean_error']:+.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python scripts/flow_sde_marginals.py --out " + args.out, "samples": args.samples,
                       "noise_level": args.noise_level, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
