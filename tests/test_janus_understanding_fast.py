"""The fast understanding inputs of `JanusBackend` (batched pixel values, tokenize-once text) against the processor:
ids and masks identical, pixel values equal (bit for bit here), P(yes) equal; Pillow's resize reproduced exactly by
the on-device resize; fall-backs when a part cannot be reproduced."""

import numpy as np
import pytest
import torch
from PIL import Image
from srum_trl.models._compat import output_cache

QUESTIONS = ["is there a red circle here", "yes", "does this image show a blue square and a green triangle", "no",
             "describe", "is there a red circle here"]


def _noise(rng, height, width, mode="RGB"):
    channels = {"RGB": (3,), "L": (), "RGBA": (4,)}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, *channels), dtype=np.uint8), mode)


def _fast_and_processor(method, backend, images, questions):
    """`method(images, questions)` of the backend with its fast inputs, then with the processor's."""
    fast = method(images, questions)
    backend.fast_understanding_inputs = False
    try:
        ref = method(images, questions)
    finally:
        del backend.fast_understanding_inputs
    return fast, ref


def _both(backend, images, questions):
    """(fast, processor) inputs of one batch."""
    return _fast_and_processor(backend._understanding_inputs, backend, images, questions)


def _p_yes_both(backend, images, questions):
    return _fast_and_processor(backend.yes_probability, backend, images, questions)


def _assert_same_inputs(fast, ref, pixel_atol=1e-6):
    assert list(fast) == list(ref)
    assert torch.equal(fast["input_ids"], ref["input_ids"])
    assert torch.equal(fast["attention_mask"], ref["attention_mask"])
    assert fast["pixel_values"].shape == ref["pixel_values"].shape
    assert (fast["pixel_values"].float() - ref["pixel_values"].float()).abs().max().item() <= pixel_atol


def test_text_and_plain_images_equal_processor(tiny_backend):
    rng = np.random.default_rng(0)
    images = [_noise(rng, 32, 32) for _ in QUESTIONS]
    fast, ref = _both(tiny_backend, images, QUESTIONS)
    _assert_same_inputs(fast, ref)
    lengths = ref["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max() and (ref["attention_mask"][:, -1] == 1).all()  # mixed lengths, left pad
    assert (fast["input_ids"] == tiny_backend.config.image_token_id).sum(-1).tolist() == [16] * len(QUESTIONS)
    pixels, kinds = tiny_backend.input_builder.fast_pixels(images)
    assert kinds == ["plain"] * len(images) and torch.equal(pixels, ref["pixel_values"])  # bit for bit
    ids, mask = tiny_backend.input_builder.fast_text([tiny_backend.format_question(q) for q in QUESTIONS])
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    p_fast, p_ref = _p_yes_both(tiny_backend, images, QUESTIONS)
    assert torch.allclose(p_fast, p_ref, rtol=0, atol=1e-6)
    assert tiny_backend.input_builder.state["text"] is True and tiny_backend.input_builder.state["plain"] is True


@pytest.mark.parametrize("on_device", [False, True])  # Pillow on the host / the exact torch resize
def test_mixed_sizes_and_modes_equal_processor(tiny_backend, on_device):
    tiny_backend.input_builder.resize_on_device = on_device
    rng = np.random.default_rng(1)
    images = [_noise(rng, 32, 32), _noise(rng, 16, 16), _noise(rng, 20, 45), _noise(rng, 70, 9),
              _noise(rng, 32, 32, "L"), _noise(rng, 33, 31, "RGBA"), _noise(rng, 64, 64), _noise(rng, 67, 14)]
    questions = (QUESTIONS * 2)[: len(images)]
    fast, ref = _both(tiny_backend, images, questions)
    _assert_same_inputs(fast, ref, pixel_atol=0.0)
    _, kinds = tiny_backend.input_builder.fast_pixels([im.convert("RGB") for im in images])
    assert kinds == ["plain", "resize", "resize", "resize", "plain", "resize", "resize", "resize"]
    p_fast, p_ref = _p_yes_both(tiny_backend, images, questions)
    assert torch.allclose(p_fast, p_ref, rtol=0, atol=1e-6)


def test_torch_resize_is_pillow_bit_for_bit():
    from srum_trl.models.janus.understanding import pil_pass_order, pil_resize_torch

    order = pil_pass_order()
    assert order in ("auto", "h")
    rng = np.random.default_rng(2)
    sizes = [((192, 192), (384, 384)), ((67, 14), (32, 7)), ((100, 50), (30, 40)), ((13, 90), (9, 64)),
             ((500, 333), (384, 256)), ((7, 7), (64, 64))]
    sizes += [tuple(tuple(int(v) for v in rng.integers(3, 90, 2)) for _ in range(2)) for _ in range(12)]
    for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        for (h, w), (new_h, new_w) in sizes:
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ref = np.asarray(Image.fromarray(a).resize((new_w, new_h), resample))
            out = pil_resize_torch(torch.from_numpy(a).permute(2, 0, 1)[None], new_h, new_w, int(resample), order)
            assert np.array_equal(out[0].permute(1, 2, 0).numpy(), ref), ((h, w), (new_h, new_w), resample)


def test_bilinear_processor_and_bf16_model(tiny_janus):
    from srum_trl.models import JanusBackend

    model, processor = tiny_janus
    processor.image_processor.resample = Image.Resampling.BILINEAR
    backend = JanusBackend(model.to(torch.bfloat16), processor)
    backend.input_builder.resize_on_device = True
    rng = np.random.default_rng(3)
    images = [_noise(rng, 32, 32), _noise(rng, 24, 40), _noise(rng, 50, 50)]
    fast, ref = _both(backend, images, QUESTIONS[:3])
    assert fast["pixel_values"].dtype == torch.bfloat16  # cast on the device, as the vision tower would
    assert torch.equal(fast["pixel_values"], ref["pixel_values"].to(torch.bfloat16))
    p_fast, p_ref = _p_yes_both(backend, images, QUESTIONS[:3])
    assert torch.equal(p_fast, p_ref)


def test_shapes_base_model_fast_inputs_equal_processor():
    from srum_trl.models import load_backend
    from srum_trl.shapes import assets
    from srum_trl.shapes.questions import global_question, local_question
    from srum_trl.shapes.world import render

    backend = load_backend(assets.base_model_path(), dtype="float32")
    assert backend.processor.image_processor.size.height == backend.image_size == 64
    prompts = ["a red circle", "two blue squares", "a green triangle to the left of a red square"]
    images = [render(p, rng=i)[0] for i, p in enumerate(prompts)]
    questions = [global_question(p) for p in prompts]
    questions += [local_question("red", "circle"), local_question("blue", "square")]
    crops = [images[0].crop((0, 0, 32, 32)), images[2].crop((10, 5, 50, 30))]  # upsampled (and padded) like the judge's
    fast, ref = _both(backend, images, questions[:3])
    _assert_same_inputs(fast, ref)
    assert torch.equal(fast["pixel_values"], ref["pixel_values"])
    for on_device in (False, True):  # Pillow on the host (the CPU default) / the exact torch resize (CUDA default)
        backend.input_builder.resize_on_device = on_device
        fast, ref = _both(backend, images + crops, questions)
        _assert_same_inputs(fast, ref, pixel_atol=0.0)
    p_fast, p_ref = _p_yes_both(backend, images + crops, questions)
    assert torch.allclose(p_fast, p_ref, rtol=0, atol=1e-5)
    assert p_ref[:3].min() > 0.5  # the base model says yes to its own correct renders (a non-trivial comparison)


def test_answer_and_chunks(tiny_backend):
    rng = np.random.default_rng(4)
    images = [_noise(rng, 32, 32), _noise(rng, 20, 30), _noise(rng, 32, 32)]
    answers = tiny_backend.answer(images, QUESTIONS[:3], max_new_tokens=3)
    tiny_backend.fast_understanding_inputs = False
    assert tiny_backend.answer(images, QUESTIONS[:3], max_new_tokens=3) == answers
    del tiny_backend.fast_understanding_inputs
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    whole = tiny_backend.yes_probability(images, QUESTIONS[:3])
    tiny_backend.understanding_batch_size = 2
    assert torch.allclose(tiny_backend.yes_probability(images, QUESTIONS[:3]), whole, rtol=0, atol=1e-6)
    assert tiny_backend.yes_probability([], []).shape == (0,)


def test_yes_probability_forward_builds_no_cache(tiny_backend, monkeypatch):
    core, seen = tiny_backend.core, []
    forward = core.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("use_cache"), output_cache(out)))
        return out

    monkeypatch.setattr(core, "forward", spy)
    tiny_backend.yes_probability([Image.new("RGB", (32, 32))] * 2, QUESTIONS[:2])
    assert seen == [(False, None)]


def test_mismatch_switches_the_part_off(tiny_backend, monkeypatch, caplog):
    rng = np.random.default_rng(5)
    images = [_noise(rng, 32, 32), _noise(rng, 32, 32)]
    real = tiny_backend.input_builder.fast_text

    def wrong(texts):
        ids, mask = real(texts)
        return ids.flip(-1), mask

    monkeypatch.setattr(tiny_backend.input_builder, "fast_text", wrong)
    fast, ref = _both(tiny_backend, images, QUESTIONS[:2])
    _assert_same_inputs(fast, ref)  # this call was redone with the processor
    assert tiny_backend.input_builder.state["text"] is False
    assert "differ from the processor" in caplog.text


def test_unknown_image_processor_goes_to_the_processor(tiny_backend, monkeypatch):
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    class Custom(JanusImageProcessorPil):
        pass

    image_processor = tiny_backend.processor.image_processor
    monkeypatch.setattr(image_processor, "__class__", Custom)  # a subclass may resize differently: not reproduced
    rng = np.random.default_rng(6)
    images = [_noise(rng, 32, 32), _noise(rng, 10, 20)]
    pixels, kinds = tiny_backend.input_builder.fast_pixels(images)
    assert kinds == ["processor", "processor"]
    fast, ref = _both(tiny_backend, images, QUESTIONS[:2])
    _assert_same_inputs(fast, ref, pixel_atol=0.0)
