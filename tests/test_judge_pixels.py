"""The device pixel path: `Rollout.pixels` filled by Janus `generate`, `PixelViews` (whole images and crop boxes of a
uint8 tensor) turned into the processor's inputs on the device, and the judge given `pixels=` scoring exactly as from
the PIL images. References are the processor on PIL images and PIL crops (`Image.crop`), never the new code."""

import numpy as np
import pytest
import torch
from PIL import Image

from srum_trl import UMMJudgeRewardFunction
from srum_trl.models import GenerationConfig
from srum_trl.models.base import PixelViews, Rollout
from srum_trl.rewards import CallableProposer, GridProposer

PROMPTS = ["a red circle", "a blue square and a green triangle", "a red circle and a blue square"]


def _pixels(rng, n, size):
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _pil(pixels):
    """Independent PIL images of a uint8 [N, H, W, 3] tensor."""
    return [Image.fromarray(a) for a in pixels.cpu().numpy()]


def _reference(backend, images, boxes, questions):
    """The processor's inputs (float32 pixel values) for PIL images cropped with `Image.crop`."""
    views = [im if box is None else im.crop(box) for im, box in zip(images, boxes)]
    texts = [backend.format_question(q) for q in questions]
    return backend.processor(text=texts, images=views, return_tensors="pt", padding=True)


def _processor_p_yes(backend, images, boxes, questions):
    """P(yes) from the processor's inputs on PIL crops (the fast input path switched off)."""
    views = [im if box is None else im.crop(box) for im, box in zip(images, boxes)]
    backend.fast_understanding_inputs = False
    try:
        return backend.yes_probability(views, questions)
    finally:
        del backend.fast_understanding_inputs


# ------------------------------------------------------------------------------------------------- the rollout
def test_generate_fills_pixels_equal_to_the_images(tiny_backend):
    rollout = tiny_backend.generate(PROMPTS, GenerationConfig(guidance=3.0, batch_size=2), seed=3)
    assert rollout.pixels.dtype == torch.uint8 and rollout.pixels.shape == (3, 32, 32, 3)
    assert rollout.pixels.device == tiny_backend.device
    for image, row in zip(rollout.images, rollout.pixels):
        assert np.array_equal(np.asarray(image), row.numpy())
    tiny_backend.rollout_pixels = False
    assert tiny_backend.generate(PROMPTS[:1], GenerationConfig(guidance=3.0), seed=3).pixels is None


def test_select_keeps_pixels_consistent():
    pixels = _pixels(np.random.default_rng(0), 5, 4)
    rollout = Rollout(list("abcde"), _pil(pixels), torch.arange(10).view(5, 2), (1, 2), pixels=pixels)
    for index in ([3, 0, 3], slice(1, 4), slice(None, None, 2), slice(None, None, -1)):
        part = rollout.select(index)
        rows = list(range(5))[index] if isinstance(index, slice) else index
        assert torch.equal(part.pixels, pixels[rows]) and part.prompts == [rollout.prompts[i] for i in rows]
        for image, row in zip(part.images, part.pixels):
            assert np.array_equal(np.asarray(image), row.numpy())
    assert rollout.select(slice(1, 4)).pixels.data_ptr() == pixels[1].data_ptr()  # a slice is a view
    assert Rollout(["a"], [None], torch.zeros(1, 2), (1, 2)).select([0]).pixels is None


def test_pixel_views_to_pil_is_image_crop():
    pixels = _pixels(np.random.default_rng(1), 2, 10)
    images = _pil(pixels)
    boxes = [None, (2, 3, 7, 9), (-2, 4, 5, 12), (0, 0, 10, 10)]
    views = PixelViews(pixels, [1, 0, 1, 0], boxes)
    expected = [images[1], images[0].crop(boxes[1]), images[1].crop(boxes[2]), images[0].crop(boxes[3])]
    assert [np.asarray(a).tolist() for a in views.to_pil()] == [np.asarray(b).tolist() for b in expected]
    assert views.sizes() == [(10, 10), (6, 5), (8, 7), (10, 10)]
    assert views[1:3].index == [0, 1] and views[[3, 0]].boxes == [(0, 0, 10, 10), None]
    with pytest.raises(ValueError, match="uint8"):
        PixelViews(pixels.float(), [0])
    with pytest.raises(ValueError, match="outside"):
        PixelViews(pixels, [2])


# ------------------------------------------------------------------------------------------- inputs and P(yes)
@pytest.mark.parametrize("on_device", [True, False])  # the exact torch resize / Pillow on the host (CPU default)
def test_view_inputs_equal_processor_on_pil_crops(tiny_backend, on_device):
    tiny_backend.input_builder.resize_on_device = on_device
    pixels = _pixels(np.random.default_rng(2), 3, 32)
    images = _pil(pixels)
    grid = GridProposer(2)(images[0])
    index = [0, 1, 2, 0, 0, 0, 0, 2, 1, 1, 2]
    boxes = [None, None, None, *grid, (3, 5, 30, 17), (10, 0, 17, 32), (20, 20, 40, 36), (0, 0, 32, 32)]
    questions = ["is there a red circle here", "yes", "describe"] * 3 + ["no", "does this image show"]
    ref = _reference(tiny_backend, [images[i] for i in index], boxes, questions)
    enc = tiny_backend._understanding_inputs(PixelViews(pixels, index, boxes), questions)
    assert torch.equal(enc["input_ids"], ref["input_ids"]) and torch.equal(enc["attention_mask"], ref["attention_mask"])
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])  # bit for bit: crops, pad, zeros outside, full box
    assert tiny_backend.input_builder.state["plain"] is True and tiny_backend.input_builder.state["resize"] is True
    pixel_values, kinds = tiny_backend.input_builder.fast_pixels(PixelViews(pixels, index, boxes))  # no check here
    assert kinds == ["plain"] * 3 + ["resize"] * 7 + ["plain"] and torch.equal(pixel_values, ref["pixel_values"])
    p_yes = tiny_backend.yes_probability(PixelViews(pixels, index, boxes), questions)
    assert torch.allclose(p_yes, _processor_p_yes(tiny_backend, [images[i] for i in index], boxes, questions),
                          rtol=0, atol=1e-6)


def test_views_fall_back_to_the_processor(tiny_backend):
    """A part switched off (or a box the fast path cannot make, here an empty one) goes through `to_pil`."""
    pixels = _pixels(np.random.default_rng(3), 2, 32)
    images = _pil(pixels)
    index, boxes = [0, 1, 1], [None, (0, 0, 16, 16), (4, 4, 30, 10)]
    tiny_backend.input_builder.state.update(text=True, plain=False, resize=False)
    pixel_values, kinds = tiny_backend.input_builder.fast_pixels(PixelViews(pixels, index, boxes))
    assert kinds == ["processor"] * 3
    ref = _reference(tiny_backend, [images[i] for i in index], boxes, ["describe"] * 3)
    assert torch.equal(pixel_values, ref["pixel_values"])
    tiny_backend.fast_understanding_inputs = False  # the processor on `to_pil()`
    enc = tiny_backend._understanding_inputs(PixelViews(pixels, index, boxes), ["describe"] * 3)
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("mean_std", [None, (0.5, 0.5)])  # transformers' CLIP defaults / Janus-Pro's
def test_views_at_janus_dimensions_equal_processor(mean_std):
    """384 px images and 192 px grid crops (upsampled to 384), plus a non-square box (resized and padded), with the
    torch resize: the processor's pixel values bit for bit."""
    from transformers import JanusImageProcessorPil, JanusProcessor

    from srum_trl.models import JanusBackend
    from srum_trl.models.janus import build_tokenizer

    kwargs = {} if mean_std is None else {"image_mean": [mean_std[0]] * 3, "image_std": [mean_std[1]] * 3}
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(size={"height": 384, "width": 384}, **kwargs),
                               tokenizer=build_tokenizer(["a", "yes", "no"]), num_image_tokens=576)
    backend = JanusBackend(torch.nn.Linear(1, 1), processor)  # a CPU stand-in: only the model's device is read
    backend.input_builder.resize_on_device = True
    pixels = _pixels(np.random.default_rng(4), 2, 384)
    images = _pil(pixels)
    index, boxes = [0, 0, 1, 1, 0], [None, (0, 0, 192, 192), (192, 192, 384, 384), None, (10, 50, 300, 170)]
    pixel_values, kinds = backend.input_builder.fast_pixels(PixelViews(pixels, index, boxes))
    assert kinds == ["plain", "resize", "resize", "plain", "resize"]
    ref = processor.image_processor([images[i] if b is None else images[i].crop(b) for i, b in zip(index, boxes)],
                                    return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, ref)


# ------------------------------------------------------------------------------------------------------ judge
@pytest.mark.parametrize("region_view, on_device", [("crop", True), ("crop", None), ("box", None)])
def test_judge_from_pixels_scores_as_from_images(tiny_backend, region_view, on_device):
    tiny_backend.input_builder.resize_on_device = on_device  # True: the torch resize; None: Pillow on the CPU
    rollout = tiny_backend.generate(PROMPTS, GenerationConfig(guidance=3.0, batch_size=2), seed=5)
    local = None if region_view == "crop" else "is the region {box} fine"
    judge = UMMJudgeRewardFunction(tiny_backend, region_proposer=GridProposer(2), region_view=region_view,
                                   local_question=local)
    from_pixels = judge.judge(rollout.images, rollout.prompts, rollout.grid, pixels=rollout.pixels)
    # reference: P(yes) of the processor's inputs on the PIL image and its PIL crops
    for image, prompt, m in zip(rollout.images, rollout.prompts, from_pixels):
        boxes = [r.box for r in m.regions]
        questions = [judge._global_question(prompt)] + [judge._local_questions(prompt, b)[0] for b in boxes]
        views = [None] + (boxes if region_view == "crop" else [None] * len(boxes))
        p = _processor_p_yes(tiny_backend, [image] * len(views), views, questions)
        assert m.global_score == pytest.approx(2 * p[0].item() - 1, abs=2e-6)
        assert [r.score for r in m.regions] == pytest.approx((2 * p[1:] - 1).tolist(), abs=2e-6)
    state = tiny_backend.input_builder.state
    assert state["text"] is True and state["plain"] is True  # the fast path ran (not switched off)
    assert state["resize"] is (True if region_view == "crop" else None)
    from_images = judge.judge(rollout.images, rollout.prompts, rollout.grid)
    for a, b in zip(from_pixels, from_images):
        assert a.global_score == b.global_score and [r.score for r in a.regions] == [r.score for r in b.regions]
        assert np.array_equal(a.token_map, b.token_map)


def test_judge_pixels_only_views_no_pil_crops(tiny_backend, monkeypatch):
    """With pixels, the backend sees one `PixelViews` (global + crops) and, once the first-use check against the
    processor is done, no PIL image is made or cropped (resize on the device, the default on CUDA)."""
    rollout = tiny_backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=6)
    tiny_backend.input_builder.resize_on_device = True
    proposer = CallableProposer(lambda image, prompt: [(0, 0, 16, 16), (8, 8, 32, 24)])
    judge = UMMJudgeRewardFunction(tiny_backend, region_proposer=proposer)
    first = judge.judge(rollout.images, rollout.prompts, rollout.grid, pixels=rollout.pixels)  # checks, on PIL crops
    seen = []
    real = type(tiny_backend).yes_probability

    def spy(self, images, questions):
        seen.append(images)
        return real(self, images, questions)

    monkeypatch.setattr(type(tiny_backend), "yes_probability", spy)
    monkeypatch.setattr(Image.Image, "crop", lambda *a, **k: pytest.fail("a PIL crop on the device path"))
    monkeypatch.setattr(Image, "fromarray", lambda *a, **k: pytest.fail("a PIL image on the device path"))
    maps = judge.judge(rollout.images, rollout.prompts, rollout.grid, pixels=rollout.pixels)
    assert [m.global_score for m in maps] == [m.global_score for m in first]
    assert len(seen) == 1 and isinstance(seen[0], PixelViews) and len(seen[0]) == 2 * 3
    assert seen[0].boxes == [None, (0, 0, 16, 16), (8, 8, 32, 24)] * 2 and seen[0].index == [0, 0, 0, 1, 1, 1]
    assert all(len(m.regions) == 2 for m in maps)


def test_judge_pixels_checked_and_ignored_without_support(tiny_backend):
    rollout = tiny_backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=7)
    judge = UMMJudgeRewardFunction(tiny_backend)
    with pytest.raises(ValueError, match="pixels of shape"):
        judge.judge(rollout.images, rollout.prompts, pixels=rollout.pixels[:1])
    with pytest.raises(ValueError, match="pass the rollout's own pixels"):
        judge.judge(rollout.images, rollout.prompts, pixels=rollout.pixels[:, :16])
    tiny_backend.accepts_pixel_views = False  # a backend without the device path: the PIL images are used
    maps = judge.judge(rollout.images, rollout.prompts, pixels=rollout.pixels[:, :16])
    assert len(maps) == 2


def test_text_mode_answers_from_pixels(tiny_backend):
    rollout = tiny_backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=8)
    views = PixelViews(rollout.pixels, [0, 1, 1], [None, None, (0, 0, 16, 16)])
    crops = [rollout.images[0], rollout.images[1], rollout.images[1].crop((0, 0, 16, 16))]
    questions = ["describe", "is there a red circle here", "describe"]
    assert tiny_backend.answer(views, questions, max_new_tokens=3) == tiny_backend.answer(crops, questions,
                                                                                          max_new_tokens=3)


# ---------------------------------------------------------------------------------------------------- trainer
def test_srum_trainer_judges_from_rollout_pixels(tiny_janus, tmp_path, monkeypatch):
    from datasets import Dataset

    from srum_trl import SRUMConfig, SRUMTrainer

    model, processor = tiny_janus
    args = SRUMConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, bf16=False, report_to=[],
                      guidance_scale=3.0, save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = SRUMTrainer(model, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                          processing_class=processor)
    seen = []
    real = UMMJudgeRewardFunction.judge

    def spy(self, images, prompts, grid=None, global_scores=None, pixels=None):
        seen.append(pixels)
        return real(self, images, prompts, grid, global_scores=global_scores, pixels=pixels)

    monkeypatch.setattr(UMMJudgeRewardFunction, "judge", spy)
    trainer._make_round([{"prompt": p} for p in PROMPTS[:2]], "train")
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (2, 32, 32, 3)


# -------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_view_inputs_equal_processor(tiny_janus):
    """On CUDA the crop, the integer resize and the float32 normalisation give the processor's pixel values bit for
    bit (the rescale divides by a device tensor, not a host scalar, which CUDA would turn into a reciprocal)."""
    from srum_trl.models import JanusBackend

    model, processor = tiny_janus
    backend = JanusBackend(model.cuda(), processor)
    pixels = _pixels(np.random.default_rng(9), 3, 32).cuda()
    images = _pil(pixels)
    index, boxes = [0, 1, 2, 0, 2, 1], [None, None, None, (0, 0, 16, 16), (3, 5, 30, 17), (20, 20, 40, 36)]
    pixel_values, kinds = backend.input_builder.fast_pixels(PixelViews(pixels, index, boxes))
    assert kinds == ["plain"] * 3 + ["resize"] * 3
    ref = _reference(backend, [images[i] for i in index], boxes, ["describe"] * 6)["pixel_values"]
    assert torch.equal(pixel_values.cpu(), ref)


def test_compiled_understanding_forward_gives_the_same_p_yes(tiny_backend):
    """`compile_understanding` routes the judge's forward through `torch.compile` (here graph capture with the
    "eager" backend, which needs no compiler; inductor is measured on the GPU by benchmarks/janus_judge.py): P(yes)
    as the plain forward's, over two chunk shapes."""
    setting = {"backend": "eager", "dynamic": True}
    rng = np.random.default_rng(4)
    size = tiny_backend.image_size
    images = _pil(_pixels(rng, 5, size))
    questions = [f"Does this image show {p}?" for p in (PROMPTS * 2)[:5]]
    tiny_backend.understanding_batch_size = 3  # chunks of 3 and 2 rows
    plain = tiny_backend.yes_probability(images, questions)
    tiny_backend.compile_understanding = setting
    try:
        compiled = tiny_backend.yes_probability(images, questions)
        assert tiny_backend._understanding_forward() is tiny_backend._understanding_forward()  # compiled once
    finally:
        del tiny_backend.compile_understanding
    assert tiny_backend._understanding_forward() is tiny_backend.core
    assert torch.allclose(compiled, plain, atol=1e-5)
