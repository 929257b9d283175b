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


def test_generate_writes_one_png_per_line(tiny_checkpoint, prompt_file, tmp_path):
    out = str(tmp_path / "images")
    main(["generate", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", out, "--seed", "3",
          "--guidance_scale", "3", "--batch_size", "2"])
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(os.path.join(out, "00001.png")).size == (32, 32)
    first = open(os.path.join(out, "00002.png"), "rb").read()
    os.remove(os.path.join(out, "00002.png"))  # as if the run had been killed: the resumed image is the same
    main(["generate", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", out, "--seed", "3",
          "--guidance_scale", "3", "--batch_size", "2"])
    assert open(os.path.join(out, "00002.png"), "rb").read() == first


def test_rollout_show_eval_and_train(tiny_checkpoint, prompt_file, tmp_path):
    store = str(tmp_path / "store")
    main(["rollout", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", store, "--shard_size", "2",
          "--pictures", "1"])
    assert os.path.exists(os.path.join(store, "pictures", "00000.png"))
    main(["show", "--rollouts", store, "--out", str(tmp_path / "pics"), "--indices", "0,2"])
    assert sorted(os.listdir(tmp_path / "pics")) == ["00000.png", "00002.png"]
    main(["eval", "--model", tiny_checkpoint, "--prompts", prompt_file, "--out", str(tmp_path / "eval")])
    result = json.load(open(tmp_path / "eval" / "eval.json"))
    assert result["num_prompts"] == 3 and -1 <= result["mean_reward"] <= 1
    out = str(tmp_path / "trained")
    main(["train", "--model_name_or_path", tiny_checkpoint, "--prompts", prompt_file, "--output_dir", out,
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_peft", "--lora_r", "4",
          "--report_to", "none", "--save_strategy", "no", "--guidance_scale", "3"])
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    main(["train", "--model_name_or_path", tiny_checkpoint, "--prompts", store, "--output_dir", str(tmp_path / "off"),
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"])
    assert os.path.exists(os.path.join(tmp_path / "off", "model.safetensors"))


def test_bad_cli_input(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="unknown command"):
        main(["fly"])
    with pytest.raises(ValueError, match="does not exist"):
        main(["generate", "--model", tiny_checkpoint, "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path)])
