"""Tests for srum_trl.shapes: grammar, split, rendering, negatives and the scorer."""

import itertools

import numpy as np
import pytest
from PIL import Image

from srum_trl.shapes import scorer, world
from srum_trl.shapes.world import ShapeObject

PALETTE = {
    (0, 0, 0),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
}


def pixel_colors(image):
    return {tuple(int(v) for v in c) for c in np.asarray(image).reshape(-1, 3)}


def boxes_apart(a, b, gap=2):
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# --------------------------------------------------------------------------- #
# Grammar
# --------------------------------------------------------------------------- #
def test_grammar_sizes_and_uniqueness():
    prompts = world.all_prompts()
    assert list(prompts) == ["single", "pair", "spatial", "counting"]
    # 6 colors x 3 shapes = 18 items; ordered pairs of distinct items = 18 * 17.
    assert {k: len(v) for k, v in prompts.items()} == {
        "single": 18,
        "pair": 306,
        "spatial": 1224,
        "counting": 54,
    }
    flat = [p for v in prompts.values() for p in v]
    assert len(set(flat)) == len(flat) == 1602
    assert world.all_prompts() == prompts  # deterministic


def test_grammar_contains_both_orders_and_plural_forms():
    prompts = world.all_prompts()
    assert "a red circle and a blue square" in prompts["pair"]
    assert "a blue square and a red circle" in prompts["pair"]
    assert "a cyan triangle below a magenta triangle" in prompts["spatial"]
    assert "four yellow squares" in prompts["counting"]


@pytest.mark.parametrize(
    "prompt, category, objects, relation",
    [
        ("a red circle", "single", (("red", "circle"),), None),
        ("a green square and a blue triangle", "pair", (("green", "square"), ("blue", "triangle")), None),
        (
            "a yellow circle to the left of a cyan square",
            "spatial",
            (("yellow", "circle"), ("cyan", "square")),
            "to the left of",
        ),
        ("a red square below a red circle", "spatial", (("red", "square"), ("red", "circle")), "below"),
        ("three red circles", "counting", (("red", "circle"),) * 3, None),
        ("two magenta triangles", "counting", (("magenta", "triangle"),) * 2, None),
        ("  four blue squares\n", "counting", (("blue", "square"),) * 4, None),
    ],
)
def test_parse_prompt(prompt, category, objects, relation):
    spec = world.parse_prompt(prompt)
    assert spec.prompt == prompt.strip()
    assert spec.category == category
    assert spec.objects == objects
    assert spec.relation == relation


@pytest.mark.parametrize(
    "prompt",
    [
        "a purple circle",
        "five red squares",
        "a red circle and a red circle",
        "a red circle above a red circle",
        "",
        "A red circle",
        "a red  circle",
        "a red circle.",
        "one red circle",
        "two red circle",
        "a red circles",
        "a red circle next to a blue square",
    ],
)
def test_parse_prompt_rejects(prompt):
    with pytest.raises(ValueError) as info:
        world.parse_prompt(prompt)
    message = str(info.value)
    assert repr(prompt) in message
    assert "not in the ShapesWorld grammar" in message
    assert "a red circle to the left of a blue square" in message  # shows examples


# --------------------------------------------------------------------------- #
# Split and sampling
# --------------------------------------------------------------------------- #
def test_split_disjoint_covering_deterministic_stratified():
    train, heldout = world.split_prompts()
    assert not set(train) & set(heldout)
    everything = world.all_prompts()
    assert sorted(train + heldout) == sorted(p for v in everything.values() for p in v)
    assert world.split_prompts() == (train, heldout)
    assert world.train_prompts() == train and world.heldout_prompts() == heldout
    # round(0.2 * n) per category: 18 -> 4, 306 -> 61, 1224 -> 245, 54 -> 11
    expected = {"single": 4, "pair": 61, "spatial": 245, "counting": 11}
    for category, n in expected.items():
        assert len(set(heldout) & set(everything[category])) == n
    other_train, other_heldout = world.split_prompts(seed=1)
    assert other_heldout != heldout and len(other_heldout) == len(heldout)
    assert world.split_prompts(heldout_fraction=0.0) == (
        [p for v in everything.values() for p in v],
        [],
    )
    with pytest.raises(ValueError):
        world.split_prompts(heldout_fraction=1.5)


def test_sample_prompts():
    sample = world.sample_prompts(400, split="train", seed=3)
    assert len(sample) == 400
    assert sample == world.sample_prompts(400, split="train", seed=3)
    assert set(sample) <= set(world.train_prompts())
    categories = [world.parse_prompt(p).category for p in sample]
    for category in world.CATEGORIES:  # uniform over categories: ~100 each
        assert 60 <= categories.count(category) <= 140
    held = world.sample_prompts(50, split="heldout", seed=0, categories=("spatial",))
    assert set(held) <= set(world.heldout_prompts())
    assert all(world.parse_prompt(p).category == "spatial" for p in held)
    assert set(world.sample_prompts(200, split="all", seed=0, categories=("single",))) <= set(
        world.all_prompts()["single"]
    )
    assert world.sample_prompts(0) == []


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": -1}, "n"),
        ({"n": 2.5}, "n"),
        ({"n": 3, "split": "test"}, "split"),
        ({"n": 3, "categories": ("colors",)}, "categories"),
        ({"n": 3, "categories": ()}, "categories"),
    ],
)
def test_sample_prompts_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        world.sample_prompts(**kwargs)


# --------------------------------------------------------------------------- #
# Drawing and rendering
# --------------------------------------------------------------------------- #
def test_draw_objects_exact_geometry():
    square = ShapeObject("blue", "square", (2, 3, 14, 15))
    triangle = ShapeObject("red", "triangle", (20, 10, 32, 22))
    circle = ShapeObject("green", "circle", (40, 40, 56, 56))
    pixels = np.asarray(world.draw_objects([square, triangle, circle]))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert pixel_colors(pixels) == {(0, 0, 0), (0, 0, 255), (255, 0, 0), (0, 255, 0)}

    blue = np.all(pixels == (0, 0, 255), axis=2)
    assert blue.sum() == 144 and blue[3:15, 2:14].all()

    red = np.all(pixels == (255, 0, 0), axis=2)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (20, 10, 32, 22)
    assert sorted(xs[ys == 10]) == [25, 26]  # apex: the two center columns of the top row
    assert red[21, 20:32].all()  # base: the whole bottom row
    widths = red.sum(axis=1)[10:22]
    assert all(a <= b for a, b in zip(widths, widths[1:]))  # widens downwards
    assert 0.45 < red.sum() / 144 < 0.65

    green = np.all(pixels == (0, 255, 0), axis=2)
    assert green[47:49, 47:49].all()  # center
    assert not green[40, 40] and not green[55, 55]  # box corners stay empty
    assert green[40, 46:50].all() and green[46:50, 40].all()  # touches all box sides
    assert 0.74 < green.sum() / 256 < 0.83  # pi / 4


def test_shape_object_center():
    assert ShapeObject("red", "square", (0, 0, 12, 12)).center == (6.0, 6.0)
    assert ShapeObject("red", "circle", (10, 20, 30, 40)).center == (20.0, 30.0)
    assert ShapeObject("red", "triangle", (0, 0, 12, 12)).center == (6.0, 8.0)


@pytest.fixture(scope="module")
def rendered():
    """400 seeded prompts from all categories with their rendered images."""
    prompts = world.sample_prompts(400, split="all", seed=11)
    rng = np.random.default_rng(11)
    return [(p,) + world.render(p, rng) for p in prompts]


def test_render_is_exact_and_valid(rendered):
    for prompt, image, objects in rendered:
        spec = world.parse_prompt(prompt)
        assert image.size == (64, 64) and image.mode == "RGB"
        colors = pixel_colors(image)
        assert colors <= PALETTE
        assert colors == {(0, 0, 0)} | {world.COLORS[o.color] for o in objects}
        assert sorted((o.color, o.shape) for o in objects) == sorted(spec.objects)
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            assert 12 <= x1 - x0 <= 20 and x1 - x0 == y1 - y0
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        for a, b in itertools.combinations(objects, 2):
            assert boxes_apart(a.box, b.box)
        if spec.relation is not None:
            (ax, ay), (bx, by) = objects[0].center, objects[1].center
            margin = {
                "to the left of": bx - ax,
                "to the right of": ax - bx,
                "above": by - ay,
                "below": ay - by,
            }[spec.relation]
            assert margin >= 6
        assert world.is_correct(objects, prompt)


def test_render_is_seeded():
    a, objects_a = world.render("three cyan triangles", rng=5)
    b, objects_b = world.render("three cyan triangles", rng=np.random.default_rng(5))
    assert objects_a == objects_b
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError):
        world.render("a purple circle")


def test_is_correct_on_hand_made_objects():
    red = ShapeObject("red", "circle", (4, 20, 20, 36))
    blue = ShapeObject("blue", "square", (40, 20, 56, 36))
    assert world.is_correct([red, blue], "a red circle and a blue square")
    assert world.is_correct([blue, red], "a red circle to the left of a blue square")
    assert world.is_correct([blue, red], "a blue square to the right of a red circle")
    assert not world.is_correct([red, blue], "a red circle above a blue square")  # same height
    assert not world.is_correct([red, blue], "a red circle")
    assert not world.is_correct([red], "a red circle and a blue square")
    touching = ShapeObject("blue", "square", (19, 20, 35, 36))
    assert not world.is_correct([red, touching], "a red circle and a blue square")


def test_add_noise():
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    noisy = world.add_noise(gray, rng=1, sigma=20, blur=0)
    assert noisy.size == (64, 64) and noisy.mode == "RGB"
    assert np.array_equal(np.asarray(noisy), np.asarray(world.add_noise(gray, rng=1, sigma=20, blur=0)))
    assert 19 < np.asarray(noisy, dtype=float).std() < 21

    image, _ = world.render("a red square", rng=0)
    blurred = np.asarray(world.add_noise(image, rng=0, sigma=0, blur=0.7))
    red = blurred[..., 0]
    assert ((red > 0) & (red < 255)).sum() > 40  # soft edges
    assert np.array_equal(np.asarray(world.add_noise(image, 0, sigma=0, blur=0)), np.asarray(image))


# --------------------------------------------------------------------------- #
# Negatives
# --------------------------------------------------------------------------- #
def test_negative_kinds_for():
    assert world.negative_kinds_for("a red circle") == (
        "wrong_color",
        "wrong_shape",
        "missing_object",
        "extra_object",
    )
    assert set(world.negative_kinds_for("a red square above a blue circle")) == {
        "wrong_color",
        "wrong_shape",
        "missing_object",
        "extra_object",
        "swapped_relation",
        "rounded_square",
        "merged",
    }
    assert "wrong_count" in world.negative_kinds_for("two red circles")
    with pytest.raises(ValueError):
        world.render_negative("a red circle", kind="wrong_count")
    with pytest.raises(ValueError):
        world.render_negative("a red circle", kind="no_such_kind")


def test_render_negative_kinds_are_incorrect():
    rng = np.random.default_rng(0)
    prompts = world.sample_prompts(60, split="all", seed=2)
    seen = set()
    for prompt in prompts + ["a red square above a blue circle", "three green squares"]:
        spec = world.parse_prompt(prompt)
        for kind in world.negative_kinds_for(prompt):
            image, objects, used = world.render_negative(prompt, rng, kind)
            seen.add(used)
            assert used == kind
            assert not world.is_correct(objects, prompt)
            assert pixel_colors(image) <= PALETTE
            names = [(o.color, o.shape) for o in objects]
            if kind == "wrong_count":
                assert len(objects) in (len(spec.objects) - 1, len(spec.objects) + 1)
                assert set(names) == set(spec.objects)
            if kind == "missing_object":
                assert len(objects) == len(spec.objects) - 1
            if kind == "extra_object":
                assert len(objects) == len(spec.objects) + 1
            if kind == "swapped_relation":
                assert names == list(spec.objects)
                assert not world.relation_holds(objects[0].center, objects[1].center, spec.relation)
            if kind == "rounded_square":
                assert "rounded_square" in [o.shape for o in objects]
            if kind == "merged":
                assert any(world.objects_touch(a, b) for a, b in itertools.combinations(objects, 2))
        image, objects, kind = world.render_negative(prompt, rng)
        assert kind in world.negative_kinds_for(prompt)
        assert not world.is_correct(objects, prompt)
    assert seen == set(world.NEGATIVE_KINDS)


# --------------------------------------------------------------------------- #
# Scorer
# --------------------------------------------------------------------------- #
def hand_drawn(*objects):
    return world.draw_objects(list(objects))


def test_detect_objects_on_hand_drawn_image():
    image = hand_drawn(
        ShapeObject("red", "circle", (4, 20, 20, 36)),
        ShapeObject("blue", "square", (40, 20, 56, 36)),
        ShapeObject("yellow", "triangle", (24, 44, 38, 58)),
    )
    detected = scorer.detect_objects(image)
    assert [(d.color, d.shape) for d in detected] == [
        ("red", "circle"),
        ("yellow", "triangle"),
        ("blue", "square"),
    ]  # sorted by centroid x
    blue = detected[2]
    assert blue.box == (40, 20, 56, 36) and blue.area == 256 and blue.center == (48.0, 28.0)
    # Arrays, and images at another resolution, are accepted too.
    assert [(d.color, d.shape) for d in scorer.detect_objects(np.asarray(image))] == [
        (d.color, d.shape) for d in detected
    ]
    big = image.resize((256, 256), Image.NEAREST)
    assert [(d.color, d.shape) for d in scorer.detect_objects(big)] == [(d.color, d.shape) for d in detected]
    assert scorer.detect_objects(Image.new("RGB", (64, 64))) == []


def test_detect_tolerates_color_shifts_and_ignores_specks():
    pixels = np.asarray(hand_drawn(ShapeObject("magenta", "square", (10, 10, 26, 26)))).copy()
    pixels[np.all(pixels == (255, 0, 255), axis=2)] = (210, 40, 190)  # dull magenta
    pixels[50, 50] = (255, 0, 0)  # a single-pixel speck
    pixels[40:44, 40:44] = (0, 255, 0)  # a 16 px blob, below the minimum area
    detected = scorer.detect_objects(pixels)
    assert [(d.color, d.shape) for d in detected] == [("magenta", "square")]


def test_score_hand_drawn_pair_and_spatial():
    image = hand_drawn(
        ShapeObject("red", "circle", (4, 20, 20, 36)),
        ShapeObject("blue", "square", (40, 20, 56, 36)),
    )
    for prompt in [
        "a red circle and a blue square",
        "a blue square and a red circle",
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
    ]:
        result = scorer.score(image, prompt)
        assert result.correct, prompt
        assert all(result.checks.values())
    for prompt in [
        "a green circle and a blue square",  # wrong color
        "a red triangle and a blue square",  # wrong shape
        "a red circle",  # extra object
        "a red circle to the right of a blue square",  # wrong relation
        "a red circle above a blue square",  # same height: neither above nor below
        "a red circle below a blue square",
        "two red circles",  # wrong count / objects
    ]:
        assert not scorer.score(image, prompt).correct, prompt

    result = scorer.score(image, "a red circle to the right of a blue square")
    assert result.category == "spatial"
    assert result.checks == {"objects": True, "no_missing": True, "no_extra": True, "count": True, "relation": False}

    result = scorer.score(image, "a red circle")
    assert result.checks["no_extra"] is False and result.checks["count"] is False
    assert result.missing == [] and [(o.color, o.shape) for o in result.extra] == [("blue", "square")]

    result = scorer.score(image, "a green circle and a blue square")
    assert result.missing == [("green", "circle")]
    assert [(o.color, o.shape) for o in result.extra] == [("red", "circle")]


def test_score_hand_drawn_counting_and_vertical_relation():
    triangles = [ShapeObject("red", "triangle", (x, 40, x + 14, 54)) for x in (2, 24, 46)]
    image = hand_drawn(*triangles)
    assert scorer.score(image, "three red triangles").correct
    for prompt in ["two red triangles", "four red triangles", "three red circles", "three green triangles"]:
        assert not scorer.score(image, prompt).correct, prompt
    stacked = hand_drawn(
        ShapeObject("cyan", "triangle", (30, 4, 46, 20)),
        ShapeObject("green", "circle", (28, 40, 46, 58)),
    )
    assert scorer.score(stacked, "a cyan triangle above a green circle").correct
    assert scorer.score(stacked, "a green circle below a cyan triangle").correct
    assert not scorer.score(stacked, "a cyan triangle below a green circle").correct
    assert not scorer.score(stacked, "a cyan triangle to the left of a green circle").correct


def test_score_batch_and_accuracy_by_category():
    image, _ = world.render("a red circle", rng=0)
    results = scorer.score_batch([image, image, image], ["a red circle", "a blue circle", "two red circles"])
    assert [r.correct for r in results] == [True, False, False]
    assert scorer.accuracy_by_category(results) == {"single": 0.5, "counting": 0.0, "overall": 1 / 3}
    with pytest.raises(ValueError):
        scorer.score_batch([image], ["a red circle", "a blue circle"])
    with pytest.raises(ValueError):
        scorer.score(image, "a purple circle")


def test_scorer_accuracy_on_clean_renders(rendered):
    results = [scorer.score(image, prompt) for prompt, image, _ in rendered]
    accuracy = scorer.accuracy_by_category(results)
    assert set(accuracy) == set(world.CATEGORIES) | {"overall"}
    assert accuracy["overall"] >= 0.99, accuracy


def test_scorer_accuracy_on_noisy_renders(rendered):
    rng = np.random.default_rng(12)
    results = [
        scorer.score(world.add_noise(image, rng, sigma=20, blur=0.7), prompt) for prompt, image, _ in rendered
    ]
    accuracy = scorer.accuracy_by_category(results)
    assert accuracy["overall"] >= 0.95, accuracy


def test_scorer_rejects_other_prompts_of_the_same_category(rendered):
    rng = np.random.default_rng(13)
    everything = world.all_prompts()
    rejected = []
    for prompt, image, objects in rendered:
        candidates = everything[world.parse_prompt(prompt).category]
        other = candidates[rng.integers(len(candidates))]
        # Skip prompts the image truly satisfies ("a A and a B" == "a B and a A",
        # "A left of B" == "B right of A", or a coincidentally true relation).
        while world.is_correct(objects, other):
            other = candidates[rng.integers(len(candidates))]
        rejected.append(not scorer.score(image, other).correct)
    assert np.mean(rejected) >= 0.99


@pytest.mark.parametrize(
    "kind", ["wrong_color", "wrong_shape", "missing_object", "extra_object", "wrong_count", "swapped_relation"]
)
def test_scorer_rejects_negatives(kind):
    category = {"wrong_count": ("counting",), "swapped_relation": ("spatial",)}.get(kind, world.CATEGORIES)
    prompts = world.sample_prompts(100, split="all", seed=21, categories=category)
    rng = np.random.default_rng(21)
    rejected = []
    for prompt in prompts:
        image, _, _ = world.render_negative(prompt, rng, kind)
        rejected.append(not scorer.score(image, prompt).correct)
    assert np.mean(rejected) >= 0.95
