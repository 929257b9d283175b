"""The shipped ShapesWorld base model and SRUM adapter, the `srum-trl shapes` commands, the evidence summary."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from srum_trl.cli import main
from srum_trl.models import GenerationConfig, load_backend
from srum_trl.shapes import assets
from srum_trl.shapes.evidence import _stats, arm_learning_rate, arm_order, parse_arm, summarize, EvidenceConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_checkpoint_layout_and_size():
    base = assets.base_model_path()
    sizes = [os.path.getsize(os.path.join(base, f)) for f in os.listdir(base)]
    assert sum(sizes) <= 32 * 2**20 and max(sizes) < 16 * 2**20
    for lora in (assets.srum_lora_path(), assets.grpo_lora_path()):
        assert os.path.getsize(os.path.join(lora, "adapter_model.safetensors")) < 16 * 2**20
        config = json.load(open(os.path.join(lora, "adapter_config.json")))
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "srum_trl/shapes/assets/base"


def test_shipped_base_model_understands_and_reconstructs_scenes():
    """Measured here, on scenes rendered now: the judge answers yes for the prompt of a scene and no for another
    prompt, and the VQ round trip keeps what the exact scorer checks."""
    from srum_trl.shapes import render, score
    from srum_trl.shapes.pretrain import vq_roundtrip
    from srum_trl.shapes.questions import global_question
    from srum_trl.shapes.world import sample_prompts

    base = load_backend(assets.base_model_path(), dtype="float32")
    prompts = sample_prompts(12, "heldout", seed=7)
    images = [render(p, np.random.default_rng(i))[0] for i, p in enumerate(prompts)]
    others = prompts[1:] + prompts[:1]  # each scene asked about the next scene's prompt too
    assert all(p != o for p, o in zip(prompts, others))
    p_yes = base.yes_probability(images * 2, [global_question(p) for p in prompts + others])
    right = torch.cat([p_yes[:12] > 0.5, p_yes[12:] < 0.5])
    assert right.float().mean() >= 0.9, p_yes
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    _, decoded = vq_roundtrip(base.core.model.vqmodel, pixels)
    kept = [score(decoded[i].numpy(), p).correct for i, p in enumerate(prompts)]
    assert sum(kept) >= 11, kept


def test_base_and_adapter_generate(tmp_path):
    base = load_backend(assets.base_model_path(), dtype="float32")
    assert base.token_grid == (8, 8) and base.image_size == 64
    prompts = ["a red circle", "two blue squares"]
    config = GenerationConfig(guidance=2.0)
    plain = base.generate(prompts, config, seed=0)
    assert [im.size for im in plain.images] == [(64, 64)] * 2
    for adapter in (assets.srum_lora_path(), assets.grpo_lora_path()):
        tuned = load_backend(assets.base_model_path(), adapter=adapter, dtype="float32")
        assert not torch.equal(tuned.generate(prompts, config, seed=0).tokens, plain.tokens)


def test_generate_then_shapes_eval(tmp_path, capsys):
    from srum_trl.shapes import score

    prompts = tmp_path / "p.txt"
    main(["shapes", "prompts", "--out", str(prompts), "--n", "4", "--split", "heldout"])
    out = str(tmp_path / "images")
    main(["generate", "--model", assets.base_model_path(), "--adapter", assets.grpo_lora_path(), "--prompts",
          str(prompts), "--out", out, "--guidance_scale", "2"])
    main(["shapes", "eval", "--images", out, "--prompts", str(prompts)])
    result = json.load(open(os.path.join(out, "shapes_eval.json")))
    lines = open(prompts).read().splitlines()
    correct = [score(Image.open(os.path.join(out, f"{i:05d}.png")), p).correct for i, p in enumerate(lines)]
    assert result["num_images"] == 4 and result["accuracy"]["overall"] == pytest.approx(sum(correct) / 4)
    assert [r["correct"] for r in result["per_image"]] == correct
    assert "overall" in capsys.readouterr().out


def test_shipped_flow_base_is_a_bagel_folder():
    """The flow base: BAGEL's published layout (+ ae_config.json, generation_config.json), <= 9 MiB, loaded by
    load_backend with its own sampler settings, and the shipped adapter changes its images."""
    base = assets.flow_base_model_path()
    names = set(os.listdir(base))
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "ae_config.json",
            "tokenizer.json", "generation_config.json", "metrics.json"} <= names
    sizes = [os.path.getsize(os.path.join(base, f)) for f in names]
    assert sum(sizes) <= 9 * 2**20
    metrics = json.load(open(os.path.join(base, "metrics.json")))
    assert metrics["vae_recon_accuracy"] >= 0.95 and metrics["token_grid"] == [8, 8]
    backend = load_backend(base, dtype="float32")
    assert type(backend).__name__ == "BagelBackend" and backend.token_grid == (8, 8) and backend.image_size == 64
    assert backend.default_generation_config().guidance == metrics["best_guidance"]
    assert backend.timestep_shift == metrics["best_timestep_shift"]
    prompts = ["a red circle", "two blue squares"]
    plain = backend.generate(prompts, seed=0)
    assert [(im.size, im.mode) for im in plain.images] == [((64, 64), "RGB")] * 2
    tuned = load_backend(base, adapter=assets.flow_srum_lora_path(), dtype="float32")
    assert not torch.equal(tuned.generate(prompts, seed=0).tokens, plain.tokens)
    config = json.load(open(os.path.join(assets.flow_srum_lora_path(), "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "srum_trl/shapes/assets/flow-base"


def test_flow_generate_with_adapter_then_shapes_eval(tmp_path):
    prompts = tmp_path / "p.txt"
    main(["shapes", "prompts", "--out", str(prompts), "--n", "3", "--split", "heldout"])
    out = tmp_path / "images"
    main(["generate", "--model", assets.flow_base_model_path(), "--adapter", assets.flow_srum_lora_path(),
          "--prompts", str(prompts), "--out", str(out), "--seed", "0"])
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "images.json"]
    main(["shapes", "eval", "--images", str(out), "--prompts", str(prompts)])
    assert json.load(open(out / "shapes_eval.json"))["num_images"] == 3


def test_janus_base_samples_at_its_best_guidance():
    backend = load_backend(assets.base_model_path(), dtype="float32")
    metrics = json.load(open(os.path.join(assets.base_model_path(), "metrics.json")))
    assert backend.default_generation_config().guidance == metrics["best_guidance"] == 2.0


def test_shapes_eval_against_a_known_answer(tmp_path):
    """Scenes drawn for their own prompt are correct by construction; one scene drawn for another prompt is not:
    the accuracy is 3 / 4, whatever model made nothing here."""
    from srum_trl.data.manifest import check_image_folder, prompts_fingerprint
    from srum_trl.shapes import render

    lines = ["a red circle", "two blue squares", "a green triangle above a red circle", "three red circles"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    folder = tmp_path / "images"
    check_image_folder(str(folder), {"num_prompts": 4, "prompts_sha256": prompts_fingerprint(lines)})
    drawn = lines[:3] + ["a blue triangle"]  # line 3 shows one blue triangle, not three red circles
    for i, p in enumerate(drawn):
        render(p, np.random.default_rng(i))[0].save(folder / f"{i:05d}.png")
    main(["shapes", "eval", "--images", str(folder), "--prompts", str(tmp_path / "p.txt")])
    result = json.load(open(folder / "shapes_eval.json"))
    assert [r["correct"] for r in result["per_image"]] == [True, True, True, False]
    assert result["accuracy"]["overall"] == 0.75 and result["accuracy"]["counting"] == 0.5


def test_stats_and_summary_hand_computed():
    s = _stats(np.array([0.7, 0.8, 0.9]))
    assert s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1) and s["se"] == pytest.approx(0.1 / 3**0.5)
    base = {"heldout": {"overall": 0.6}, "understanding": 0.9}

    def row(arm, seed, acc):
        return {"arm": arm, "seed": seed, "heldout": {"overall": acc, "guidance_margin": 1.0}, "understanding": 0.9,
                "history": [{"heldout_accuracy": acc}]}

    rows = [row("sft", 0, 0.6), row("sft", 1, 0.6), row("srum", 0, 0.7), row("srum", 1, 0.7),
            {"arm": "srum", "seed": 2, "error": "boom"}]
    summary = summarize(rows, base)
    assert summary["srum"]["overall"]["mean"] == pytest.approx(0.7) and summary["srum"]["seeds"] == [0, 1]
    assert summary["srum"]["error_closed"] == pytest.approx(0.25)  # (0.7 - 0.6) / (1 - 0.6)
    assert summary["srum"]["vs_sft_in_se"] is None  # zero spread: no standard error to compare with


def test_arm_specs_carry_their_learning_rate():
    assert parse_arm("srum") == ("srum", None) and parse_arm("srum_centered@3e-4") == ("srum_centered", 3e-4)
    cfg = EvidenceConfig(base="b", out="o", learning_rate=1e-4, grpo_learning_rate=5e-5)
    assert [arm_learning_rate(a, cfg) for a in ("srum", "grpo", "grpo@1e-3", "sft@2e-4")] == [1e-4, 5e-5, 1e-3, 2e-4]
    assert arm_order(["grpo", "srum_centered@3e-4", "srum_centered@1e-4", "sft"]) == [
        "sft", "srum_centered@1e-4", "srum_centered@3e-4", "grpo"]
    for bad, message in [("srum_x", "unknown arm"), ("srum@", None), ("srum@-1", "positive"), ("srum@abc", "positive"),
                         ("srum@inf", "positive")]:
        if message is None:
            assert parse_arm(bad) == ("srum", None)
        else:
            with pytest.raises(ValueError, match=message):
                parse_arm(bad)


def test_evidence_time_limit_and_loss_settings():
    import time

    from srum_trl.shapes.evidence import arm_loss_guidance, parse_args

    before = time.time()
    cfg = parse_args(["--base", "b", "--out", "o", "--max_seconds", "100", "--eval_reserve_s", "30"])
    assert before + 70 <= cfg.train_until <= time.time() + 70
    assert parse_args(["--base", "b", "--out", "o"]).train_until is None

    class Flow:
        token_kind = "continuous"

    class Tokens:
        token_kind = "discrete"

    assert arm_loss_guidance(cfg, Flow()) == "conditional" and arm_loss_guidance(cfg, Tokens()) == "guided"
    cfg.loss_guidance = "guided"
    assert arm_loss_guidance(cfg, Flow()) == "guided"


def test_a_trainer_loads_a_path_in_float32_on_the_cpu(tmp_path, monkeypatch):
    """The shipped base is stored in bfloat16 (its config.json says so); on the CPU the trainers load it in float32
    unless model_init_kwargs asks for a dtype."""
    from srum_trl import SRUMConfig
    from srum_trl.trainers.common import resolve_backend

    assert json.load(open(os.path.join(assets.base_model_path(), "config.json")))["dtype"] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plain = resolve_backend(assets.base_model_path(), SRUMConfig(output_dir=str(tmp_path), report_to="none"))
    assert {p.dtype for p in plain.model.parameters()} == {torch.float32}
    asked = resolve_backend(assets.base_model_path(), SRUMConfig(
        output_dir=str(tmp_path), report_to="none", model_init_kwargs={"dtype": "bfloat16"}))
    assert {p.dtype for p in asked.model.parameters()} == {torch.bfloat16}
