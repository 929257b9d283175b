"""ShapesWorld pretraining at `--scale tiny` (CPU), and the judge's questions and region proposer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srum_trl.models import GenerationConfig, load_backend
from srum_trl.models.janus.tiny import build_tokenizer
from srum_trl.shapes import all_prompts, render
from srum_trl.shapes.questions import (
    CAPTION_QUESTION,
    VOCABULARY,
    all_local_questions,
    global_question,
    local_questions,
    make_shapes_judge,
    object_regions,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from srum_trl.shapes import pretrain

    out = tmp_path_factory.mktemp("shapes_pretrain")
    metrics = pretrain.main(
        ["--out", str(out), "--scale", "tiny", "--device", "cpu", "--time-budget-s", "40", "--seed", "0"]
    )
    return out, metrics


def test_metrics_are_those_of_the_saved_model(pretrained):
    """The reported generation accuracy and judge agreement are recomputed here, independently, from the saved
    checkpoint: the same held-out prompts, seeds and guidance scales, scored image by image with the exact scorer."""
    from srum_trl.shapes.scorer import score
    from srum_trl.shapes.world import sample_prompts

    out, returned = pretrained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))  # the file holds what main() returned
    config, seed = metrics["config"], metrics["seed"]
    backend = load_backend(str(out / "model"), dtype=torch.float32)
    backend.understanding_batch_size = config["eval_batch"]  # the same batches as the run's evaluation
    prompts = sample_prompts(config["eval_gen_prompts"], "heldout", seed=seed + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(config["cpu_threads"] or threads)  # the same float sums as the run's evaluation
    try:
        for guidance in config["eval_guidances"]:
            rollout = backend.generate(prompts, GenerationConfig(guidance=guidance, batch_size=config["eval_batch"]),
                                       seed=seed + 2)
            correct = [score(np.asarray(image), p).correct for image, p in zip(rollout.images, prompts)]
            reported = metrics["generation"][str(float(guidance))]
            assert reported["overall"] == pytest.approx(sum(correct) / len(correct))
            p_yes = backend.yes_probability(rollout.images, [global_question(p) for p in prompts]).numpy()
            agreement = float(np.mean((p_yes > 0.5) == np.asarray(correct)))
            judged = metrics["judge_agreement"]["per_guidance"][str(float(guidance))]["accuracy"]
            assert judged == pytest.approx(agreement)
    finally:
        torch.set_num_threads(threads)
    best = max(config["eval_guidances"], key=lambda g: metrics["generation"][str(float(g))]["overall"])
    assert metrics["best_guidance"] == best
    assert metrics["generation_accuracy"] == metrics["generation"][str(float(best))]["overall"]


def test_saved_model_loads_and_generates(pretrained):
    out, _ = pretrained
    assert all(f.stat().st_size <= 15 * 1024 * 1024 for f in (out / "model").glob("*.safetensors"))
    backend = load_backend(str(out / "model"))
    assert next(backend.model.parameters()).dtype == torch.bfloat16
    backend.model.float()
    rollout = backend.generate(["a red circle", "two blue squares"], GenerationConfig(guidance=2.0, batch_size=2), seed=0)
    assert [im.size for im in rollout.images] == [(64, 64), (64, 64)]
    assert rollout.tokens.shape == (2, 64)
    p_yes = backend.yes_probability(rollout.images, [global_question("a red circle")] * 2)
    assert p_yes.shape == (2,) and torch.all((p_yes >= 0) & (p_yes <= 1))


def test_codebook_unit_norm_and_encode_decode_agree(pretrained):
    out, _ = pretrained
    backend = load_backend(str(out / "model"), dtype=torch.float32)
    vq = backend.core.model.vqmodel
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)  # bf16 storage of unit vectors
    # decode(tokens) uses the normalised codebook, encode the raw one: with unit codes, re-encoding the decoder's
    # input codes returns the same tokens
    tokens = torch.randint(0, vq.quantize.num_embeddings, (2, 64))
    codes = vq.quantize.get_codebook_entry(tokens)
    _, _, again = vq.quantize(codes)
    assert torch.equal(again.view(2, -1), tokens)


def test_questions_are_in_vocabulary():
    tokenizer = build_tokenizer(VOCABULARY)
    unk = tokenizer.unk_token_id
    questions = {CAPTION_QUESTION, "yes", "no", *all_local_questions()}
    for prompts in all_prompts().values():
        for prompt in prompts:
            questions.add(prompt)
            questions.add(global_question(prompt))
            questions.update(local_questions(prompt))
    for text in questions:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids and len(ids) == len(text.split()), text
    assert len(set(VOCABULARY)) == len(VOCABULARY)


def test_question_texts():
    assert global_question("a red circle") == "does this image show a red circle"
    assert local_questions("a red circle to the left of a blue square") == [
        "is there a red circle here",
        "is there a blue square here",
    ]
    assert local_questions("three green triangles") == ["is there a green triangle here"]
    assert local_questions("a red circle and a red circle".replace("and a red circle", "and a red square")) == [
        "is there a red circle here",
        "is there a red square here",
    ]


def _contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def test_judge_proposes_object_boxes():
    judge = make_shapes_judge()
    image, objects = render("a red circle and a blue square", np.random.default_rng(3))
    boxes = judge.region_proposer(image, "a red circle and a blue square")
    assert len(boxes) == 2
    for obj in objects:
        assert sum(_contains(box, obj.box) for box in boxes) == 1
    for box in boxes:
        assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64
    # largest first, at most 6, nothing on an empty image
    image, objects = render("four red squares", np.random.default_rng(0))
    boxes = object_regions(image)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    assert len(boxes) == 4 and areas == sorted(areas, reverse=True)
    assert object_regions(np.zeros((64, 64, 3), np.uint8)) == []


def test_judge_scores_with_tiny_model(pretrained):
    out, _ = pretrained
    backend = load_backend(str(out / "model"), dtype=torch.float32)
    judge = make_shapes_judge(backend)
    image, _ = render("a red circle and a blue square", np.random.default_rng(1))
    maps = judge.judge([image], ["a red circle and a blue square"])
    assert len(maps[0].regions) == 2
    assert -1.0 <= maps[0].global_score <= 1.0
