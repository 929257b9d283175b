"""`srum-trl eval`: the protocols' statistics by hand, the shipped `evaluate` module loaded offline, and the command end
to end on the ShapesWorld base against its shipped SRUM adapter."""

from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image

from srum_trl.cli import main
from srum_trl.eval import category_scores, metric_path, paired_difference, parse_compbench_score


def test_category_score_module_by_hand():
    import evaluate

    metric = evaluate.load(metric_path("category_score"))  # a local folder: no download
    out = metric.compute(predictions=[1, 0, 1, 1, float("nan")], references=["a", "a", "b", "b", "b"],
                         groups=[0, 0, 1, 2, 3])
    # "a": one prompt with two images -> one unit of 0.5; "b": units 1 and 1 (the NaN image is left out)
    assert out["categories"]["a"] == {"mean": 0.5, "se": pytest.approx(float("nan"), nan_ok=True), "n": 2}
    assert out["categories"]["b"]["mean"] == 1.0 and out["categories"]["b"]["se"] == 0.0
    assert out["overall"] == pytest.approx((0.5 + 1 + 1) / 3) and out["num_nan"] == 1
    # units 0.5, 1, 1: sample std 0.2887, SE 0.1667
    assert out["overall_se"] == pytest.approx(math.sqrt(((0.5 - 5 / 6) ** 2 + 2 * (1 / 6) ** 2) / 2 / 3))
    by_category = category_scores([1, 0, 0, 0], ["a", "a", "b", "b"], [0, 1, 2, 3], overall="categories")
    assert by_category["overall"] == pytest.approx(0.25)  # mean of 0.5 and 0.0
    assert by_category["overall_se"] == pytest.approx(math.sqrt(0.5**2 + 0.0**2) / 2)  # SE(a) = 0.5, SE(b) = 0


def test_paired_difference_by_hand():
    d = paired_difference([0, 1, 0, 1], [1, 1, 1, 0], [0, 1, 2, 3])
    # differences 1, 0, 1, -1: mean 0.25, sample variance (0.5625 + 0.0625 + 0.5625 + 1.5625) / 3
    assert d["mean"] == pytest.approx(0.25) and d["n"] == 4
    assert d["se"] == pytest.approx(math.sqrt(2.75 / 3 / 4))
    assert paired_difference([0, float("nan")], [1, 1], [0, 1])["n"] == 1


def test_compbench_score_parsing():
    assert parse_compbench_score('{"score": 85, "explanation": "red car, blue sky"}') == 85.0
    assert parse_compbench_score('```json\n{"score": "72", "explanation": "x"}\n```') == 72.0
    assert parse_compbench_score("I would say 90") is None
    assert parse_compbench_score('{"score": 250}') is None


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from srum_trl.shapes.world import sample_prompts

    path = tmp_path_factory.mktemp("prompts") / "heldout.txt"
    path.write_text("\n".join(sample_prompts(3, "heldout", seed=3)) + "\n")
    return str(path)


def test_eval_shapes_compares_base_and_adapter(heldout, tmp_path, capsys):
    from srum_trl.shapes import assets
    from srum_trl.shapes.scorer import score

    out = tmp_path / "eval"
    main(["eval", "--protocol", "shapes", "--model", assets.base_model_path(), "--adapter", assets.srum_lora_path(),
          "--compare_base", "--prompts", heldout, "--out", str(out), "--guidance_scale", "2",
          "--samples_per_prompt", "2", "--batch_size", "6", "--device", "cpu"])
    report = json.load(open(out / "results.json"))
    assert list(report["models"]) == ["base", "srum-lora"] and report["num_prompts"] == 3
    prompts = open(heldout).read().split("\n")[:3]
    for name in ("base", "srum-lora"):
        # the reported accuracy is the exact scorer's on the saved images
        hits = [score(Image.open(out / name / "images" / f"{i:05d}_{s}.png"), prompts[i]).correct
                for i in range(3) for s in range(2)]
        assert report["models"][name]["overall"] == pytest.approx(sum(hits) / 6)
        assert report["models"][name]["num_images"] == 6
    d = report["differences"]["srum-lora"]
    assert d["mean"] == pytest.approx(report["models"]["srum-lora"]["overall"] - report["models"]["base"]["overall"])
    table = (out / "results.md").read_text()
    assert "| category | base | srum-lora | srum-lora - base |" in table and "**overall**" in table
    assert table.strip() in capsys.readouterr().out


def test_eval_bad_input(heldout, tmp_path):
    from srum_trl.shapes import assets

    base = ["eval", "--model", assets.base_model_path(), "--prompts", heldout, "--out", str(tmp_path / "e")]
    with pytest.raises(SystemExit, match="--compare_base compares the model with and without --adapter"):
        main(base + ["--protocol", "shapes", "--compare_base"])
    with pytest.raises(SystemExit, match="--protocol must be one of"):
        main(base + ["--protocol", "nope"])
    with pytest.raises(SystemExit, match="has no GenEval metadata"):
        main(base + ["--protocol", "geneval"])
    with pytest.raises(SystemExit, match="quotes a text"):
        main(base + ["--protocol", "ocr"])
    other = tmp_path / "other.txt"
    other.write_text("a photo of a cat\n")
    with pytest.raises(SystemExit, match="is not a ShapesWorld prompt"):
        main(base[:3] + ["--prompts", str(other), "--out", str(tmp_path / "f"), "--protocol", "shapes"])
    assert not os.path.exists(tmp_path / "e" / "base")  # nothing generated for a refused run
