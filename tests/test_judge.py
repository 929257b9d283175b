"""The judge: logits mode on the tiny model, text mode parsing/retries, frozen judging with LoRA."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from srum_trl import UMMJudgeRewardFunction
from srum_trl.rewards import CallableProposer, GridProposer
from srum_trl.warn import SRUMTrlWarning


def _images(n, size=32):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_logits_judge_scores_are_2p_minus_1(tiny_backend):
    judge = UMMJudgeRewardFunction(tiny_backend, region_proposer=GridProposer(2))
    images, prompts = _images(2), ["a red circle", "a blue square"]
    maps = judge.judge(images, prompts)
    p_global = tiny_backend.yes_probability(images, [judge._global_question(p) for p in prompts])
    for m, p in zip(maps, p_global):
        assert m.global_score == pytest.approx(2 * p.item() - 1, abs=1e-5)
        assert len(m.regions) == 4 and m.token_map.shape == (4, 4)
    crop = images[0].crop(maps[0].regions[1].box)
    p_local = tiny_backend.yes_probability([crop], [judge._local_questions(prompts[0], maps[0].regions[1].box)[0]])
    assert maps[0].regions[1].score == pytest.approx(2 * p_local.item() - 1, abs=1e-5)
    assert judge(prompts=prompts, completions=images) == pytest.approx([m.global_score for m in maps])


def test_local_question_callable_takes_max(tiny_backend):
    judge = UMMJudgeRewardFunction(
        tiny_backend,
        use_global=False,
        region_proposer=CallableProposer(lambda image, prompt: [(0, 0, 16, 16)]),
        local_question=lambda prompt: ["is there a red circle here", "is there a blue square here"],
    )
    image = _images(1)[0]
    m = judge.judge([image], ["a red circle and a blue square"])[0]
    crop = image.crop((0, 0, 16, 16))
    p = tiny_backend.yes_probability([crop, crop], ["is there a red circle here", "is there a blue square here"])
    assert m.global_score is None
    assert m.regions[0].score == pytest.approx(2 * p.max().item() - 1, abs=1e-5)
    assert UMMJudgeRewardFunction.scalar(m) == pytest.approx(m.regions[0].score)
    # the region is labelled with the question that scored best (what object credit compares across images)
    assert m.regions[0].label == ["is there a red circle here", "is there a blue square here"][int(p.argmax())]
    # one template question: every region of a prompt shares the empty label
    plain = UMMJudgeRewardFunction(tiny_backend, use_global=False, region_proposer=GridProposer(2))
    assert {r.label for r in plain.judge([image], ["a red circle"])[0].regions} == {""}


class _ScriptedBackend:
    """A stand-in judge that answers from a script, to test text-mode parsing without a language model."""

    token_grid = (2, 2)

    def __init__(self, answers):
        self.answers = list(answers)
        self.model = torch.nn.Linear(1, 1)
        self.calls = []

    def answer(self, images, questions, max_new_tokens=64, temperature=0.0):
        self.calls.append((len(questions), temperature))
        return [self.answers.pop(0) for _ in questions]


def test_text_mode_parses_retries_and_counts_unparsed():
    backend = _ScriptedBackend(["Score: 0.5", "no idea", "still nothing", "Score: -0.25", "nothing", "nope", "nah"])
    judge = UMMJudgeRewardFunction(backend, mode="text", use_local=False, max_retries=2)
    maps = judge.judge(_images(3, 8), ["a", "b", "c"])
    # image 0 parsed at once; image 1 parsed on its first retry; image 2 never -> a missing score (NaN), counted
    assert [m.global_score for m in maps][:2] == pytest.approx([0.5, -0.25])
    assert math.isnan(maps[2].global_score) and np.isnan(maps[2].token_map).all()
    assert judge.stats["unparsed"] == 1 and judge.stats["retries"] == 3
    assert backend.calls == [(3, 0.0), (2, 0.7), (1, 0.7)]
    rewards = UMMJudgeRewardFunction(_ScriptedBackend(["Score: 0.5", "Score: 8/10"]), mode="text", use_local=False,
                                     max_retries=0)(prompts=["a", "b"], completions=_images(2, 8))
    assert rewards[0] == 0.5 and math.isnan(rewards[1])  # TRL's signature: NaN, masked by the trainers


def test_text_mode_region_without_a_score_is_left_out_of_the_map():
    box = CallableProposer(lambda image, prompt: [(0, 0, 4, 4), (4, 4, 8, 8)])
    judge = UMMJudgeRewardFunction(_ScriptedBackend(["Score: 0.0", "nothing", "Score: 1.0"]), mode="text",
                                   region_proposer=box, max_retries=0)
    m = judge.judge(_images(1, 8), ["a"])[0]
    assert m.global_score == 0.0 and math.isnan(m.regions[0].score) and m.regions[1].score == 1.0
    # srum rule, g = 0: 0.5 * 0.5 everywhere, 1.0 * 0.5 in the scored box (bottom-right token of 2x2)
    np.testing.assert_allclose(m.token_map, [[0.25, 0.25], [0.25, 0.5]])


@pytest.mark.parametrize("box, message", [((6, 0, 2, 4), "inverted"), ((0, 0, float("nan"), 4), "NaN"),
                                          ((0, 0, 4), "four numbers"), ("oops", "four numbers")])
def test_bad_proposer_boxes_fail_before_any_question(box, message):
    backend = _ScriptedBackend([])
    judge = UMMJudgeRewardFunction(backend, mode="text", region_proposer=CallableProposer(lambda i, p: [box]))
    with pytest.raises(ValueError, match=f"CallableProposer.*image 0 .*box 0 .*{message}"):
        judge.judge(_images(1, 8), ["a red circle"])
    assert backend.calls == []  # nothing was asked: the step fails at once, not after every question


def test_proposer_boxes_outside_the_image_are_clamped_and_counted(tiny_backend):
    boxes = CallableProposer(lambda image, prompt: [(-4, 0, 16, 40), (40, 40, 50, 50), (0, 0, 16, 16)])
    judge = UMMJudgeRewardFunction(tiny_backend, use_global=False, region_proposer=boxes)
    image = _images(1)[0]
    with pytest.warns(SRUMTrlWarning, match="2 box.*1 clamped.*1 dropped"):
        m = judge.judge([image], ["a red circle"])[0]
    assert [r.box for r in m.regions] == [(0, 0, 16, 32), (0, 0, 16, 16)]
    assert judge.stats["boxes_clamped"] == 1 and judge.stats["boxes_dropped"] == 1
    question = judge._local_questions("a red circle", (0, 0, 16, 32))[0]
    p = tiny_backend.yes_probability([image.crop((0, 0, 16, 32))], [question])
    assert m.regions[0].score == pytest.approx(2 * p.item() - 1, abs=1e-5)  # the judge saw the clamped crop


def test_judge_bad_configuration(tiny_backend):
    with pytest.raises(ValueError, match="mode"):
        UMMJudgeRewardFunction(tiny_backend, mode="vibes")
    with pytest.raises(ValueError, match="both False"):
        UMMJudgeRewardFunction(tiny_backend, use_global=False, use_local=False)
    with pytest.raises(ValueError, match="no backend"):
        UMMJudgeRewardFunction().judge(_images(1), ["a"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        UMMJudgeRewardFunction(tiny_backend).judge(_images(2), ["a"])
    with pytest.raises(ValueError, match="put '{box}' in the template"):
        UMMJudgeRewardFunction(tiny_backend, region_view="box", local_question="is this good")
    assert "{box}" in UMMJudgeRewardFunction(tiny_backend, region_view="box").local_question
    assert "{box}" not in UMMJudgeRewardFunction(tiny_backend, mode="text").local_question  # crop view
    bad = UMMJudgeRewardFunction(tiny_backend, region_proposer=lambda i, p: None)
    with pytest.raises(ValueError, match="returned None for image 0"):
        bad.judge(_images(1), ["a red circle"])


def test_frozen_judge_ignores_lora(tiny_backend):
    from peft import LoraConfig, get_peft_model

    images, prompts = _images(2), ["a red circle", "a blue square"]
    before = [m.global_score for m in UMMJudgeRewardFunction(tiny_backend, use_local=False).judge(images, prompts)]
    tiny_backend.model = get_peft_model(tiny_backend.model, LoraConfig(r=4, target_modules=tiny_backend.default_lora_targets()))
    with torch.no_grad():
        for name, param in tiny_backend.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # adapters now change the model
    frozen = UMMJudgeRewardFunction(tiny_backend, use_local=False).judge(images, prompts)
    live = UMMJudgeRewardFunction(tiny_backend, use_local=False, frozen=False).judge(images, prompts)
    assert [m.global_score for m in frozen] == pytest.approx(before, abs=1e-6)
    assert [m.global_score for m in live] != pytest.approx(before, abs=1e-3)
