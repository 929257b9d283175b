"""Merge the JSON results of several `python -m srum_trl.shapes.evidence` runs into one evidence table.

Each run's rows (arm x seed) are pooled and summarised together (mean, std and standard error over seeds, the
differences to the base model and to self-SFT in standard errors), so arms trained by separate commands on the same
base model, guidance and evaluation prompts appear side by side. Rows of the same arm and recipe (steps, images per
step, learning rate) are pooled over files, so seeds run by separate commands count together; a seed present twice is
taken from the first file (a rerun of the same command gives the same numbers). The same arm run with another
learning rate is shown as its own row, labelled `ARM@LR`.

    python scripts/shapes_evidence_table.py docs/results/shapes_evidence_b128_srum.json \
        docs/results/shapes_evidence_b128_srum_ablations.json docs/results/shapes_evidence_b128_grpo.json
"""

import argparse
import json
import math
from types import SimpleNamespace

from srum_trl.shapes.evidence import (CONTROL_ARMS, GROUPED_ARMS, GRPO_ARMS, _ms, _num, _pct, arm_learning_rate,
                                      arm_order, parse_arm, summarize)


def merge(paths: list[str]) -> tuple[dict, list[dict], list[str]]:
    """(summary, rows, commands) of the pooled runs; fails if the files disagree on the base model's evaluation."""
    rows, commands, base, seen, labels, n_eval = [], [], None, set(), {}, None
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        this_base = result["summary"]["base"]
        if base is not None and this_base["heldout"]["overall"] != base["heldout"]["overall"]:
            raise ValueError(f"{path} evaluates another base model or prompt set than {paths[0]}; not merged.")
        base = base or this_base
        commands.append(result["command"])
        n_eval = result["config"]["eval_prompts"]
        config = SimpleNamespace(**result["config"])
        steps = {}  # the steps each arm's seeds made (fewer than the run's when its time limit stopped them)
        for row in result["runs"]:
            steps.setdefault(row["arm"], []).append(row.get("steps", config.steps))
        for row in result["runs"]:
            lr = arm_learning_rate(row["arm"], config)
            settings = _settings(config, row["arm"])
            recipe = _recipe(config, row["arm"], lr, steps[row["arm"]], settings)
            if (row["arm"], recipe) not in labels:
                labels[(row["arm"], recipe)] = _label(row["arm"], recipe, lr, labels, settings)
            label = labels[(row["arm"], recipe)]
            if (label, row["seed"]) not in seen and "error" not in row:
                seen.add((label, row["seed"]))
                rows.append({**row, "arm": label, "recipe": recipe})
    summary = summarize(rows, base)
    # The base model is evaluated once: its own sampling error (binomial, n evaluation prompts) added to the arm's
    # standard error over seeds gives a conservative distance to the base.
    p = base["heldout"]["overall"]
    base_se = math.sqrt(p * (1 - p) / n_eval)
    for arm, entry in summary.items():
        if arm != "base" and entry["overall"]["mean"] is not None:
            se = math.sqrt((entry["overall"]["se"] or 0.0) ** 2 + base_se**2)
            entry["vs_base_conservative"] = (entry["overall"]["mean"] - p) / se
    return summary, rows, commands


def _label(arm: str, recipe: str, lr: float, labels: dict, settings: str = "") -> str:
    """The arm's row label: the arm itself; `ARM@LR` when the arm already has a row with another recipe; with the
    GRPO settings of `--grpo_config` in brackets when it has some (`grpo@1e-4 (sde_steps random)`); with its whole
    recipe in brackets when that label is still taken."""
    taken = set(labels.values())
    label = arm
    if arm in taken and parse_arm(arm)[1] is None:
        label = f"{arm}@{lr:g}" if lr >= 1e-3 else f"{arm}@{lr:.0e}".replace("e-0", "e-")
    if settings:
        label = f"{label} ({settings})"
    return label if label not in taken else f"{_spec(label)} ({recipe})"


def _spec(label: str) -> str:
    """The `ARM` or `ARM@LR` of a row label (a label may end in its recipe, in brackets)."""
    return label.split(" (")[0]


def _recipe(config, arm: str, lr: float, steps: list[int] | None = None, settings: str = "") -> str:
    """Steps x images, learning rate, groups, and `settings`, the GRPO arms' `--grpo_config` ([`_settings`], so
    that runs with another noise level or SDE-step rule are not pooled with each other). `steps`: the steps the
    arm's seeds made; when a time limit stopped them before the run's count, their range is shown ("11-19 of 60")."""
    name = parse_arm(arm)[0]
    groups = f", groups of {config.num_generations}" if name in GROUPED_ARMS else ""
    count = f"{config.steps}"
    if steps and min(steps) < config.steps:
        low, high = min(steps), max(steps)
        count = f"{low}{'' if low == high else f'-{high}'} of {config.steps}"
    return f"{count} x {config.batch_size}, lr {lr:g}{groups}{', ' + settings if settings else ''}"


def _settings(config, arm: str) -> str:
    """The run's `--grpo_config` settings of a GRPO arm ("noise_level 1.0, sde_steps random"), else ""."""
    if parse_arm(arm)[0] not in GRPO_ARMS or not getattr(config, "grpo_config", None):
        return ""
    return ", ".join(f"{key} {value}" for key, value in sorted(config.grpo_config.items()))


def table(summary: dict, rows: list[dict]) -> str:
    recipes = {r["arm"]: r["recipe"] for r in rows}
    base = summary["base"]
    lines = ["| arm | recipe (steps x images, lr) | held-out overall | single | pair | spatial | counting | "
             "understanding | train prompts | vs base (SE) | vs base (SE, with base's own error) | vs SFT (SE) | "
             "error closed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base | - | {_pct(base['heldout']['overall'])} | {_pct(base['heldout']['single'])} | "
             f"{_pct(base['heldout']['pair'])} | {_pct(base['heldout']['spatial'])} | "
             f"{_pct(base['heldout']['counting'])} | {_pct(base['understanding'])} | "
             f"{_pct(base.get('train_prompts', {}).get('overall'))} | | | | |"]
    labels = [a for a in summary if a != "base"]
    order = arm_order({_spec(label) for label in labels})
    for arm in sorted(labels, key=lambda label: (order.index(_spec(label)), label)):
        e = summary[arm]
        label = f"{arm} (control)" if parse_arm(_spec(arm))[0] in CONTROL_ARMS else arm
        closed = "" if e.get("error_closed") is None else f"{100 * e['error_closed']:+.0f}%"
        lines.append(f"| {label} | {recipes[arm]} | {_ms(e['overall'])} | {_ms(e['single'])} | {_ms(e['pair'])} | "
                     f"{_ms(e['spatial'])} | {_ms(e['counting'])} | {_ms(e['understanding'])} | "
                     f"{_ms(e['train_prompts'])} | {_num(e.get('vs_base_in_se'))} | {_num(e.get('vs_base_conservative'))} | "
                     f"{_num(e.get('vs_sft_in_se'))} | "
                     f"{closed} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files of evidence runs")
    args = parser.parse_args(argv)
    summary, rows, commands = merge(args.results)
    text = table(summary, rows) + "\n\nCommands:\n" + "\n".join(f"- `{c}`" for c in commands)
    print(text)
    return text


if __name__ == "__main__":
    main()
