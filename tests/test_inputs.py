"""Bad input gets a clear, early error naming the argument (or file and line) and the fix."""

import os

import numpy as np
import pytest
from PIL import Image

from srum_trl import GRPOUMMConfig, SRUMConfig, UMMJudgeRewardFunction
from srum_trl.data.images import MAX_IMAGE_PIXELS_ENV, open_image
from srum_trl.data.prompts import load_prompts
from srum_trl.models import GenerationConfig, load_backend


# ---------------------------------------------------------------------------------------------- prompt files
def test_prompt_files_name_the_file_and_line(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a red circle\na blue caf\xe9 square\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt, line 2, column 11: byte b'\\xe9' is not UTF-8"):
        load_prompts(str(latin))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"\n')
    with pytest.raises(ValueError, match="p.jsonl, line 2, column .*not a JSON record"):
        load_prompts(str(jsonl))
    jsonl.write_text('{"prompt": "a red circle"}\n\n{"prompt": "a blue square"}\n\n\n')
    with pytest.raises(ValueError, match="p.jsonl: line 2 is blank"):  # as in a text file: line numbers name outputs
        load_prompts(str(jsonl))
    jsonl.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n\n\n')  # trailing blanks are fine
    assert load_prompts(str(jsonl)) == ["a red circle", "a blue square"]
    jsonl.write_text('{"prompt": "a red circle"}\n{"text": "a blue square"}\n')
    with pytest.raises(ValueError, match="line 2 has no prompt text"):
        load_prompts(str(jsonl))
    bad = tmp_path / "p.json"
    bad.write_text('[\n  "a red circle",\n  "a blue square"\n')
    with pytest.raises(ValueError, match="p.json, line 4, column 1: not valid JSON"):
        load_prompts(str(bad))


def test_unknown_words_and_prompts_too_long_for_the_judge(tiny_backend):
    with pytest.raises(ValueError, match=r"prompt\[1\] \('a purple circle'\) has words the tokenizer does not know: "
                                         r"\['purple'\]"):
        tiny_backend.check_prompts(["a red circle", "a purple circle"])
    # 100 words fit the generation context (128 - 16 image tokens) but not a judge question with its image
    long = " ".join(["red"] * 100)
    tiny_backend.check_prompts([long])
    judge = UMMJudgeRewardFunction(tiny_backend)
    with pytest.raises(ValueError, match=r"prompt\[1\] .* judge question of \d+ tokens .* context of 128"):
        judge.check_prompts(["a red circle", long])
    judge.check_prompts(["a red circle"])
    question = judge._global_question("a red circle")
    image = Image.new("RGB", (32, 32))
    assert tiny_backend.question_lengths([question]) == [tiny_backend._understanding_inputs([image], [question])[
        "attention_mask"].sum().item()]  # the length the model reads


def test_trainers_check_prompts_before_training(tiny_janus, tmp_path):
    from datasets import Dataset

    from srum_trl import GRPOUMMTrainer, SRUMTrainer

    model, processor = tiny_janus
    data = Dataset.from_dict({"prompt": ["a red circle", "a purple square"] * 2})
    with pytest.raises(ValueError, match=r"train_dataset\['prompt'\]\[1\] .*\['purple'\]"):
        SRUMTrainer(model, args=SRUMConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2),
                    train_dataset=data, processing_class=processor)
    with pytest.raises(ValueError, match=r"eval_dataset\['prompt'\]\[1\] .*\['purple'\]"):
        GRPOUMMTrainer(model, args=GRPOUMMConfig(output_dir=str(tmp_path), report_to="none",
                                                 per_device_train_batch_size=2, num_generations=2),
                       train_dataset=data.select([0, 0]), eval_dataset=data, processing_class=processor)


# --------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config_cls", [SRUMConfig, GRPOUMMConfig])
@pytest.mark.parametrize("field, value, message", [
    ("per_device_train_batch_size", 0, "per_device_train_batch_size must be >= 1"),
    ("per_device_eval_batch_size", 0, "per_device_eval_batch_size must be >= 1"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be >= 1"),
    ("generation_batch_size", 0, "generation_batch_size must be >= 1"),
    ("top_k", 0, "top_k must be >= 1"),
    ("region_grid", 0, "region_grid must be >= 1"),
    ("learning_rate", -1e-4, "learning_rate must be >= 0"),
    ("adam_epsilon", float("nan"), "adam_epsilon must be >= 0"),
])
def test_configs_refuse_out_of_range_fields(tmp_path, config_cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_cls(output_dir=str(tmp_path), report_to="none", **{field: value})


@pytest.mark.parametrize("kw, message", [({"guidance": 0.0}, "guidance must be > 0"),
                                         ({"temperature": 0.0}, "temperature must be > 0"),
                                         ({"temperature": -1.0}, "temperature must be > 0"),
                                         ({"top_k": 0}, "top_k must be >= 1"),
                                         ({"batch_size": 0}, "batch_size must be >= 1")])
def test_generation_config_refuses_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kw)


# ----------------------------------------------------------------------------------------- model folders
def test_damaged_checkpoints_name_the_file(tiny_checkpoint, tmp_path):
    shard = next(n for n in os.listdir(tiny_checkpoint) if n.endswith(".safetensors"))
    path = os.path.join(tiny_checkpoint, shard)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard} is not a readable safetensors file .*cut short"):
        load_backend(tiny_checkpoint)
    open(path, "wb").write(data)
    config = os.path.join(tiny_checkpoint, "config.json")
    text = open(config).read()
    open(config, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_backend(tiny_checkpoint)
    open(config, "w").write(text)
    with pytest.raises(ValueError, match="no such folder"):
        load_backend(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is a file"):
        load_backend(config)


# ------------------------------------------------------------------------------------------------- images
def test_images_handed_in_have_a_size_limit(tiny_backend, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 4000)).save(big)  # 20 million pixels: under PIL's 89.5 million, over our 16.8 million
    with pytest.raises(ValueError, match="big.png is 5000 x 4000 = 20000000 pixels, above the limit of 16777216"):
        open_image(str(big))
    assert open_image(str(big), max_pixels=20_000_000).size == (5000, 4000)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "100")
    small = tmp_path / "small.png"
    Image.new("RGB", (11, 10)).save(small)
    with pytest.raises(ValueError, match="110 pixels, above the limit of 100"):
        open_image(str(small))
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV)
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.png cannot be decoded"):
        open_image(str(cut))
    judge = UMMJudgeRewardFunction(tiny_backend, max_image_pixels=32 * 32 - 1)
    with pytest.raises(ValueError, match="judge: image 0 is 32 x 32"):
        judge.judge([Image.new("RGB", (32, 32))], ["a red circle"])
