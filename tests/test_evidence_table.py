"""scripts/shapes_evidence_table.py: rows of several evidence runs pooled per arm and recipe."""

import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _script():
    spec = importlib.util.spec_from_file_location("shapes_evidence_table",
                                                  os.path.join(HERE, "..", "scripts", "shapes_evidence_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, name, lr, rows):
    base = {"heldout": {"overall": 0.5, "single": 0.5, "pair": 0.5, "spatial": 0.5, "counting": 0.5},
            "understanding": 0.9}
    runs = [{"arm": arm, "seed": seed, "heldout": {"overall": acc, "guidance_margin": 1.0}, "understanding": 0.9,
             "history": [{"heldout_accuracy": acc}]} for arm, seed, acc in rows]
    path = tmp_path / name
    path.write_text(json.dumps({"summary": {"base": base}, "runs": runs, "command": f"cmd {name}",
                                "config": {"eval_prompts": 100, "steps": 10, "batch_size": 8, "learning_rate": lr,
                                           "grpo_learning_rate": 3e-4, "num_generations": 8}}))
    return str(path)


def test_seeds_pool_per_arm_and_recipe(tmp_path):
    table = _script()
    a = _run(tmp_path, "a.json", 1e-4, [("sft", 0, 0.4), ("sft", 1, 0.6), ("srum_grouped@3e-4", 0, 0.7)])
    b = _run(tmp_path, "b.json", 1e-4, [("sft", 1, 0.9), ("sft", 2, 0.5), ("srum_grouped@3e-4", 1, 0.9)])
    c = _run(tmp_path, "c.json", 2e-4, [("sft", 0, 0.2)])
    summary, rows, commands = table.merge([a, b, c])
    assert summary["sft"]["seeds"] == [0, 1, 2]  # seed 1 taken from the first file that has it
    assert summary["sft"]["overall"]["mean"] == pytest.approx(0.5)  # (0.4 + 0.6 + 0.5) / 3
    assert summary["srum_grouped@3e-4"]["overall"]["mean"] == pytest.approx(0.8)
    assert summary["sft@2e-4"]["overall"]["mean"] == pytest.approx(0.2)  # another learning rate: its own row
    assert {r["recipe"] for r in rows if r["arm"] == "srum_grouped@3e-4"} == {"10 x 8, lr 0.0003, groups of 8"}
    assert commands == ["cmd a.json", "cmd b.json", "cmd c.json"]
    text = table.table(summary, rows)
    assert text.index("| sft |") < text.index("| sft@2e-4 |") < text.index("| srum_grouped@3e-4 |")


def test_arms_stopped_by_a_time_limit_show_their_steps(tmp_path):
    table = _script()
    path = _run(tmp_path, "t.json", 2e-4, [("sft", 0, 0.4), ("sft", 1, 0.6), ("srum", 0, 0.5)])
    result = json.loads(open(path).read())
    for run, steps in zip(result["runs"], (7, 9, 10)):
        run["steps"] = steps  # the run's recipe says 10 steps; a time limit stopped two rows earlier
    open(path, "w").write(json.dumps(result))
    _, rows, _ = table.merge([path])
    recipes = {r["arm"]: r["recipe"] for r in rows}
    assert recipes == {"sft": "7-9 of 10 x 8, lr 0.0002", "srum": "10 x 8, lr 0.0002"}


def test_grpo_runs_with_other_settings_get_their_own_rows(tmp_path):
    table = _script()
    a = _run(tmp_path, "a.json", 1e-4, [("grpo", 0, 0.5), ("grpo", 1, 0.7)])
    b = _run(tmp_path, "b.json", 1e-4, [("grpo", 0, 0.2), ("grpo", 1, 0.4), ("sft", 0, 0.3)])
    c = _run(tmp_path, "c.json", 1e-4, [("grpo", 0, 0.9)])
    for path, settings in ((b, {"sde_steps": "random", "noise_level": 1.0}), (c, {"noise_level": 1.0})):
        result = json.loads(open(path).read())
        result["config"]["grpo_config"] = settings  # `--grpo_config` of that run: the GRPO arms only
        open(path, "w").write(json.dumps(result))
    summary, rows, _ = table.merge([a, b, c])
    assert summary["grpo"]["overall"]["mean"] == pytest.approx(0.6)  # not pooled with the other settings' seeds
    assert summary["grpo@3e-4 (noise_level 1.0, sde_steps random)"]["overall"]["mean"] == pytest.approx(0.3)
    assert summary["grpo@3e-4 (noise_level 1.0)"]["overall"]["mean"] == pytest.approx(0.9)
    assert {r["recipe"] for r in rows if r["arm"] == "sft"} == {"10 x 8, lr 0.0001"}  # SRUM arms: no GRPO settings
    assert "| grpo@3e-4 (noise_level 1.0) | 10 x 8, lr 0.0003, groups of 8, noise_level 1.0 |" in table.table(summary, rows)
