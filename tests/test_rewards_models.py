"""Rewards on other models, on tiny random checkpoints of their real transformers classes (loaded by path like real
ones): CLIP score / PickScore, a VLM judge (LLaVA; Janus through the shipped ShapesWorld base) and the zero-shot
detector under GenEval's rules. Hand-computed references where the numbers are ours; ranges, NaN rules, batching
and errors elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from srum_trl.rewards import CLIPScoreReward, GenEvalReward, TransformersJudge, VLMJudgeReward, ZeroShotDetector

from tiny_hf import tiny_clip, tiny_llava, tiny_owlv2


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def owl_path(tmp_path_factory):
    pytest.importorskip("scipy")  # OWLv2's image processor resizes with scipy when torchvision is absent
    return tiny_owlv2(tmp_path_factory.mktemp("owl"))


def _images(n, size=(40, 30)):
    colors = ["red", "green", "blue", "yellow", "white", "black"]
    return [Image.new("RGB", size, colors[i % len(colors)]) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------- CLIP
def test_clip_score_is_the_cosine_of_the_models_embeddings(clip_path):
    from transformers import CLIPModel, CLIPProcessor

    reward = CLIPScoreReward(clip_path, device="cpu")
    images, prompts = _images(3), ["a red cat", "a green dog", "a blue cup"]
    got = reward(prompts, images)
    model, processor = CLIPModel.from_pretrained(clip_path), CLIPProcessor.from_pretrained(clip_path)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()  # CLIP's logits are scale * cosine
    assert got == pytest.approx(cosine.tolist(), abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in got)
    assert reward.__name__ == "clip_score"


def test_clip_scales_batching_and_arrays(clip_path):
    base = CLIPScoreReward(clip_path, device="cpu", batch_size=2)
    images, prompts = _images(5), ["a red cat"] * 5
    cosine = torch.tensor(base(prompts, images))
    one_batch = CLIPScoreReward(clip_path, device="cpu", batch_size=8)
    assert one_batch(prompts, images) == pytest.approx(cosine.tolist(), abs=1e-5)  # batching changes nothing
    arrays = [np.asarray(im) for im in images]
    assert base(prompts, arrays) == pytest.approx(cosine.tolist(), abs=1e-5)  # arrays read as the same pixels
    clipscore = CLIPScoreReward(clip_path, device="cpu", scale="clipscore")(prompts, images)
    assert clipscore == pytest.approx((2.5 * cosine.clamp(min=0)).tolist(), abs=1e-5)
    pick = CLIPScoreReward(clip_path, device="cpu", scale="pickscore")
    scale = float(pick.model.logit_scale.detach().exp())
    assert pick(prompts, images) == pytest.approx((scale * cosine / 26).clamp(-1, 1).tolist(), abs=1e-5)
    assert pick.__name__ == "pickscore"
    assert base([], []) == []


def test_clip_bad_input_names_the_argument(clip_path, llava_path, tmp_path):
    reward = CLIPScoreReward(clip_path, device="cpu")
    with pytest.raises(ValueError, match=r"completions\[1\]"):
        reward(["a", "b"], [Image.new("RGB", (8, 8)), "not/an/image.png"])
    with pytest.raises(ValueError, match=r"completions\[0\] is a dict"):
        reward(["a"], [{"image": 1}])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        reward([None], _images(1))
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        reward(["a", "b"], _images(1))
    with pytest.raises(ValueError, match=r"model=.*'llava' checkpoint; CLIPScoreReward needs one of \['clip'\]"):
        CLIPScoreReward(llava_path, device="cpu")
    with pytest.raises(ValueError, match="could not be read"):
        CLIPScoreReward(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ValueError, match="scale must be"):
        CLIPScoreReward(clip_path, scale="logits")


def test_clip_device_and_dtype(clip_path):
    reward = CLIPScoreReward(clip_path, device="cpu", dtype="bfloat16")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    assert reward.model.device.type == "cpu"
    values = reward(["a red cat"], _images(1))
    assert isinstance(values[0], float) and -1.0 <= values[0] <= 1.0


# ------------------------------------------------------------------------------------------------------ VLM judge
def test_vlm_judge_is_two_p_yes_minus_one_from_the_models_logits(llava_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = VLMJudgeReward(llava_path, device="cpu", batch_size=2)
    images, prompts = _images(3), ["a red cat", "a green dog", "a blue cup"]
    got = reward(prompts, images)
    # reference: one row at a time, no padding, P(yes) over the yes/no spellings of the vocabulary
    model, processor = AutoModelForImageTextToText.from_pretrained(llava_path), AutoProcessor.from_pretrained(llava_path)
    tok = processor.tokenizer
    yes = [tok.convert_tokens_to_ids(w) for w in ("yes", "Yes")]
    no = [tok.convert_tokens_to_ids(w) for w in ("no", "No")]
    expected = []
    for image, prompt in zip(images, prompts):
        question = f'Does this image match the description "{prompt}"? Answer yes or no.'
        text = f"USER: <image> {question} ASSISTANT:"
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[image], return_tensors="pt")).logits[0, -1]
        p = torch.softmax(logits, -1)
        p_yes, p_no = p[yes].sum(), p[no].sum()
        expected.append(float(2 * p_yes / (p_yes + p_no) - 1))
    assert got == pytest.approx(expected, abs=1e-4)
    assert reward.__name__ == "vlm_judge"


def test_vlm_judge_region_maps_and_text_mode(llava_path):
    judge = TransformersJudge(llava_path, device="cpu", map_grid=(4, 4))
    reward = VLMJudgeReward(judge, region_proposer="grid", region_grid=2)
    maps = reward.judge(_images(2, size=(32, 32)), ["a red cat", "a dog"])
    assert [m.token_map.shape for m in maps] == [(4, 4), (4, 4)]
    assert all(len(m.regions) == 4 and m.global_score is not None for m in maps)
    # the scalar reward is the global score
    assert reward(["a red cat", "a dog"], _images(2, size=(32, 32))) == pytest.approx([m.global_score for m in maps])
    answers = judge.answer(_images(2), ["does this image show a cat", "is there a dog"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    text = VLMJudgeReward(judge, mode="text", max_retries=0)
    values = text(["a cat"], _images(1))
    # a random model writes no "Score:": a missing score (NaN, left out as TRL does), counted
    assert len(values) == 1 and math.isnan(values[0]) and text.stats["unparsed"] == 1


def test_vlm_judge_on_janus_answers_about_shapes():
    """The shipped ShapesWorld base (a real, trained Janus model) as a VLM judge through the generic path: it says
    yes to a render of the prompt and no to a render of another prompt."""
    from srum_trl.shapes import assets
    from srum_trl.shapes.world import render

    judge = VLMJudgeReward(assets.base_model_path(), device="cpu", question="does this image show {prompt}")
    prompts = ["a red circle", "a blue square", "a green triangle"]
    right = judge(prompts, [render(p, 0)[0] for p in prompts])
    wrong = judge(prompts, [render(p, 0)[0] for p in prompts[1:] + prompts[:1]])
    assert min(right) > 0.5 and max(wrong) < -0.5


def test_vlm_judge_refuses_a_checkpoint_of_the_wrong_kind(clip_path):
    with pytest.raises(ValueError, match=r"'clip' checkpoint; a VLM judge needs one of"):
        VLMJudgeReward(clip_path, device="cpu")


def test_vlm_judge_question_template_needs_the_question(llava_path):
    with pytest.raises(ValueError, match="question_template must contain"):
        TransformersJudge(llava_path, device="cpu", question_template="{image}")


# ------------------------------------------------------------------------------------------- detector + GenEval
def test_detector_boxes_lie_inside_the_image(owl_path):
    detector = ZeroShotDetector(owl_path, device="cpu")
    assert detector.default_threshold == 0.1
    found = detector.detect(Image.new("RGB", (48, 40), "red"), ["cat", "dog"], threshold=0.0)
    assert found and {d.label for d in found} <= {"cat", "dog"}
    for d in found:
        assert 0 <= d.box[0] <= d.box[2] <= 48 and 0 <= d.box[1] <= d.box[3] <= 40 and 0.0 <= d.score <= 1.0


def test_geneval_reward_nan_without_metadata_and_colour_needs_clip(owl_path, clip_path, tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}\n'
                    '{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], '
                    '"prompt": "a photo of a red dog"}\n')
    reward = GenEvalReward(owl_path, metadata=str(meta), threshold=0.0, device="cpu")
    images = _images(3)
    values = reward(["a photo of a cat", "something else", "a photo of a cat"], images)
    assert math.isnan(values[1]) and values[0] in (0.0, 1.0) and values[2] in (0.0, 1.0)
    # threshold 0: every query gets boxes, so "a cat" is present
    assert values[0] == 1.0
    with pytest.raises(ValueError, match="asks for a colour: pass color_model"):
        reward(["a photo of a red dog"], images[:1])
    with_clip = GenEvalReward(reward.detector, color_model=clip_path, metadata=str(meta), threshold=0.0)
    assert with_clip(["a photo of a red dog"], images[:1])[0] in (0.0, 1.0)
    # an impossible threshold finds nothing: the object is missing
    assert GenEvalReward(reward.detector, metadata=str(meta), threshold=1.01)(["a photo of a cat"], images[:1]) == [0.0]
    # metadata as a column (what GRPOUMMTrainer passes from the dataset) wins over the table
    column = [{"tag": "counting", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 2}]}]
    assert reward(["a photo of a cat"], images[:1], metadata=column) == [0.0]  # 16 random boxes: more than one cat


def test_geneval_refuses_a_detector_of_the_wrong_kind(clip_path):
    with pytest.raises(ValueError, match=r"detector=.*'clip' checkpoint; a zero-shot object detector needs one of"):
        ZeroShotDetector(clip_path, device="cpu")
