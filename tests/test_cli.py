"""Smoke tests of the `srum-trl` command line, run in-process on a tiny checkpoint."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from srum_trl.cli import main


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\n")
    return str(path)


def test_help_everywhere(capsys):
    main(["--help"])
    assert "generate" in capsys.readouterr().out
    for command in ("generate", "rollout", "train", "grpo", "eval", "show"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "srum_trl.cli", "--help"], capture_output=True, text=True, check=True)
    assert "rollout" in out.stdout


def _generate(checkpoint, prompts, out, *extra):
    main(["generate", "--model", checkpoint, "--prompts", prompts, "--out", out, "--seed", "3", "--guidance_scale", "3",
          "--batch_size", "2", *extra])


def test_generate_writes_one_png_per_line(tiny_checkpoint, prompt_file, tmp_path):
    out = str(tmp_path / "images")
    _generate(tiny_checkpoint, prompt_file, out)
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "images.json"]
    assert Image.open(os.path.join(out, "00001.png")).size == (32, 32)
    first = open(os.path.join(out, "00002.png"), "rb").read()
    os.remove(os.path.join(out, "00002.png"))  # as if the run had been killed: the resumed image is the same
    _generate(tiny_checkpoint, prompt_file, out)
    assert open(os.path.join(out, "00002.png"), "rb").read() == first
    manifest = json.load(open(os.path.join(out, "images.json")))
    assert (manifest["num_prompts"], manifest["seed"], manifest["guidance"], manifest["batch_size"]) == (3, 3, 3.0, 2)
    assert manifest["source"]["prompts"] == prompt_file and manifest["model"]["family"] == "JanusBackend"


def test_generate_refuses_a_folder_of_other_images(tiny_checkpoint, prompt_file, tmp_path):
    out = str(tmp_path / "images")
    _generate(tiny_checkpoint, prompt_file, out)
    other = tmp_path / "other.txt"
    other.write_text("a blue circle\na green square\na red triangle\n")
    kept = open(os.path.join(out, "00001.png"), "rb").read()
    with pytest.raises(ValueError, match="other settings(.|\n)*prompts_sha256(.|\n)*--overwrite"):
        _generate(tiny_checkpoint, str(other), out)  # would have kept lines 0-2 of the first file's images
    with pytest.raises(ValueError, match="guidance: 3.0 in the folder, 2.0 now"):
        main(["generate", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", out, "--seed", "3",
              "--guidance_scale", "2", "--batch_size", "2"])
    assert open(os.path.join(out, "00001.png"), "rb").read() == kept  # nothing was touched
    with pytest.raises(ValueError, match="made from another prompt list"):  # shapes eval pairs images with prompts
        main(["shapes", "eval", "--images", out, "--prompts", str(other)])
    Image.new("RGB", (32, 32)).save(os.path.join(out, "00007.png"))  # a stale image beyond the new prompt file
    _generate(tiny_checkpoint, str(other), out, "--overwrite")
    assert json.load(open(os.path.join(out, "images.json")))["source"]["prompts"] == str(other)
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "images.json"]  # old ones deleted
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (32, 32)).save(bare / "00000.png")
    with pytest.raises(ValueError, match="numbered images but no images.json"):
        _generate(tiny_checkpoint, prompt_file, str(bare))
    with pytest.raises(ValueError, match="no images.json.*--unchecked"):
        main(["shapes", "eval", "--images", str(bare), "--prompts", prompt_file])


def test_rollout_show_eval_and_train(tiny_checkpoint, prompt_file, tmp_path):
    store = str(tmp_path / "store")
    main(["rollout", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", store, "--shard_size", "2",
          "--pictures", "1"])
    assert os.path.exists(os.path.join(store, "pictures", "00000.png"))
    main(["show", "--rollouts", store, "--out", str(tmp_path / "pics"), "--indices", "0,2"])
    assert sorted(os.listdir(tmp_path / "pics")) == ["00000.png", "00002.png"]
    main(["eval", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", str(tmp_path / "eval"),
          "--region_proposer", "none", "--guidance_scale", "3", "--seed", "4"])
    result = json.load(open(tmp_path / "eval" / "eval.json"))
    # by hand: the same images (seed 4, guidance 3), the judge's global score 2 P(yes) - 1 of each, averaged
    from srum_trl.models import GenerationConfig, load_backend
    from srum_trl.rewards import DEFAULT_QUESTIONS

    backend = load_backend(tiny_checkpoint)
    prompts = open(prompt_file).read().split("\n")[:3]
    images = backend.generate(prompts, GenerationConfig(guidance=3.0), seed=4).images
    questions = [DEFAULT_QUESTIONS[("logits", "global")].format(prompt=p) for p in prompts]
    expected = float((2 * backend.yes_probability(images, questions) - 1).mean())
    assert result["num_prompts"] == 3 and result["mean_reward"] == pytest.approx(expected, abs=1e-5)
    out = str(tmp_path / "trained")
    main(["train", "--model_name_or_path", tiny_checkpoint, "--prompts", prompt_file, "--output_dir", out,
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_peft", "--lora_r", "4",
          "--report_to", "none", "--save_strategy", "no", "--guidance_scale", "3"])
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    main(["train", "--model_name_or_path", tiny_checkpoint, "--prompts", store, "--output_dir", str(tmp_path / "off"),
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"])
    assert os.path.exists(os.path.join(tmp_path / "off", "model.safetensors"))


def test_bad_cli_input(tiny_checkpoint, prompt_file, tmp_path):
    with pytest.raises(SystemExit, match="unknown command"):
        main(["fly"])
    with pytest.raises(ValueError, match="does not exist"):
        main(["generate", "--model", tiny_checkpoint, "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path)])
    base = ["--model", tiny_checkpoint, "--prompts", prompt_file, "--out", str(tmp_path / "x")]
    for command in ("generate", "rollout"):
        for flag, value, message in [("--guidance_scale", "0", "--guidance_scale must be > 0"),
                                     ("--guidance_scale", "-2", "--guidance_scale must be > 0"),
                                     ("--temperature", "0", "--temperature must be > 0"),
                                     ("--batch_size", "0", "--batch_size must be >= 1")]:
            with pytest.raises(ValueError, match=message):
                main([command, *base, flag, value])
    for path in (str(tmp_path / "no-model"), "./missing/model"):
        with pytest.raises(ValueError, match="no such folder"):
            main(["generate", "--model", path, "--prompts", prompt_file, "--out", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="adapter .*no such folder"):
        main(["generate", *base, "--adapter", str(tmp_path / "no-adapter")])
    with pytest.raises(SystemExit, match="--indices '1,x'"):
        main(["show", "--rollouts", str(tmp_path / "store"), "--out", str(tmp_path / "p"), "--indices", "1,x"])
