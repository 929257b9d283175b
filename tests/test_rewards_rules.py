"""GenEval's rules against hand-made detections, and the OCR reward on text drawn by PIL and read by RapidOCR's
bundled models (offline)."""

from __future__ import annotations

import math

import pytest
from PIL import Image, ImageDraw, ImageFont

from srum_trl.rewards import Detection, check_geneval, parse_metadata, quoted_text, text_similarity
from srum_trl.rewards.geneval import relative_position, select_detections
from srum_trl.rewards.ocr import edit_distance


def _det(label, box, score=0.9, color=None):
    return Detection(label, score, box, color)


# --------------------------------------------------------------------------------------------- relative positions
@pytest.mark.parametrize("box_a, box_b, expected", [
    ((0, 40, 20, 60), (60, 40, 80, 60), {"left of"}),              # same row, A on the left
    ((60, 40, 80, 60), (0, 40, 20, 60), {"right of"}),
    ((40, 0, 60, 20), (40, 60, 60, 80), {"above"}),                # y grows downwards
    ((40, 60, 60, 80), (40, 0, 60, 20), {"below"}),
    ((0, 0, 20, 20), (60, 60, 80, 80), {"left of", "above"}),      # diagonal: dx = dy = -0.5657 after shrinking
    ((40, 40, 60, 60), (41, 41, 61, 61), set()),                   # nearly concentric: no relation
    # offset (-20, -4), sizes (40, 40): shrunk by 4 per axis to (-16, 0); / |offset| 20.396 -> dx -0.784, dy 0
    ((0, 40, 20, 60), (20, 44, 40, 64), {"left of"}),
])
def test_relative_position_by_hand(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_relative_position_threshold_widens_the_dead_zone():
    # offset (-24, 0), sizes 40: with threshold 0.1 the shrunk offset is -20 (relation holds); with 0.6 it is 0
    assert relative_position((0, 0, 20, 20), (24, 0, 44, 20), threshold=0.1) == {"left of"}
    assert relative_position((0, 0, 20, 20), (24, 0, 44, 20), threshold=0.6) == set()


# --------------------------------------------------------------------------------------------------- the rules
TWO = parse_metadata({"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]})
COUNT = parse_metadata({"tag": "counting", "include": [{"class": "cup", "count": 3}],
                        "exclude": [{"class": "cup", "count": 4}]})
COLOR = parse_metadata({"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"},
                                                         {"class": "dog", "count": 1, "color": "blue"}]})
POSITION = parse_metadata({"tag": "position", "include": [{"class": "cup", "count": 1},
                                                          {"class": "dog", "count": 1, "position": ["left of", 0]}]})


def test_objects_present_and_missing():
    both = {"cat": [_det("cat", (0, 0, 10, 10))], "dog": [_det("dog", (20, 0, 30, 10))]}
    assert check_geneval(TWO, both).correct
    missing = check_geneval(TWO, {"cat": both["cat"]})
    assert not missing.correct and missing.fraction == 0.5
    assert missing.reasons == ["expected at least 1 dog, found 0"]


def test_counting_needs_exactly_the_count():
    cups = [_det("cup", (10 * i, 0, 10 * i + 8, 8)) for i in range(5)]
    assert check_geneval(COUNT, {"cup": cups[:3]}).correct
    assert not check_geneval(COUNT, {"cup": cups[:2]}).correct        # include fails
    four = check_geneval(COUNT, {"cup": cups[:4]})                      # exclude fails
    assert not four.correct and four.clauses == [("include 3 cup", True), ("exclude 4 cup", False)]


def test_colour_reads_the_clause_objects_colour():
    right = {"cat": [_det("cat", (0, 0, 9, 9), color="red")], "dog": [_det("dog", (20, 0, 29, 9), color="blue")]}
    assert check_geneval(COLOR, right).correct
    swapped = {"cat": [_det("cat", (0, 0, 9, 9), color="blue")], "dog": [_det("dog", (20, 0, 29, 9), color="red")]}
    result = check_geneval(COLOR, swapped)
    assert not result.correct and result.fraction == 0.0
    # only the `count` most confident objects are the clause's: a second, red cat further down does not help
    extra = {"cat": [_det("cat", (0, 0, 9, 9), 0.9, "blue"), _det("cat", (40, 0, 49, 9), 0.5, "red")],
             "dog": right["dog"]}
    assert not check_geneval(COLOR, extra).correct


def test_position_against_the_target_clause():
    cup = [_det("cup", (60, 20, 80, 40))]
    assert check_geneval(POSITION, {"cup": cup, "dog": [_det("dog", (0, 20, 20, 40))]}).correct
    wrong = check_geneval(POSITION, {"cup": cup, "dog": [_det("dog", (100, 20, 120, 40))]})
    assert not wrong.correct and "expected dog left of cup, found ['right of']" in wrong.reasons
    no_target = check_geneval(POSITION, {"dog": [_det("dog", (0, 20, 20, 40))]})
    assert not no_target.correct and no_target.fraction == 0.0  # the cup is missing, so the dog has no target


def test_select_detections_threshold_nms_and_cap():
    dets = [_det("cat", (0, 0, 10, 10), 0.9), _det("cat", (1, 0, 11, 10), 0.8),    # IoU 9/11 with the first
            _det("cat", (30, 0, 40, 10), 0.5), _det("cat", (60, 0, 70, 10), 0.05)]
    assert [d.score for d in select_detections(dets, 0.1)] == [0.9, 0.5]
    assert [d.score for d in select_detections(dets, 0.1, nms_threshold=1.0)] == [0.9, 0.8, 0.5]
    assert [d.score for d in select_detections(dets, 0.0, max_objects=2)] == [0.9, 0.5]


def test_metadata_errors_name_the_field():
    with pytest.raises(ValueError, match=r"metadata\['include'\] must be a non-empty list"):
        parse_metadata({"tag": "x"})
    with pytest.raises(ValueError, match=r"\['include'\]\[0\]\['count'\] must be a positive integer"):
        parse_metadata({"include": [{"class": "cat", "count": 0}]})
    with pytest.raises(ValueError, match=r"\['include'\]\[0\]\['color'\] is 'teal'"):
        parse_metadata({"include": [{"class": "cat", "count": 1, "color": "teal"}]})
    with pytest.raises(ValueError, match=r"\['position'\] must be \[relation, index of an earlier include clause\]"):
        parse_metadata({"include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_metadata("{tag")
    # GenEval's own record format parses, with its tuple position
    record = parse_metadata('{"tag": "position", "include": [{"class": "bench", "count": 1}, {"class": "cat", '
                            '"count": 1, "position": ["below", 0]}], "prompt": "a photo of a cat below a bench"}')
    assert record["include"][1]["position"] == ("below", 0) and record["exclude"] == []


# -------------------------------------------------------------------------------------------------------- OCR
def test_quoted_text_and_similarity_by_hand():
    assert quoted_text('a sign that says "Open 24 hours"') == "Open 24 hours"
    assert quoted_text("a mug reading \u201cHELLO\u201d and \"world\"") == "HELLO world"
    assert quoted_text("a red circle") is None
    assert edit_distance("kitten", "sitting") == 3
    assert text_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert text_similarity("", "abc") == 0.0 and text_similarity("", "") == 1.0


def _text_image(text, size=(360, 80)):
    image = Image.new("RGB", size, "white")
    try:
        font = ImageFont.load_default(size=36)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    ImageDraw.Draw(image).text((12, 16), text, fill="black", font=font)
    return image


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    from srum_trl.rewards import OCRReward

    return OCRReward()


def test_ocr_reads_drawn_text(ocr):
    prompts = ['a poster with the words "HELLO 2025"', 'a sign saying "OPEN"', "a photo of a cat",
               'a banner "GOODBYE"']
    images = [_text_image("HELLO 2025"), _text_image("CLOSED"), _text_image("HELLO"), Image.new("RGB", (80, 80))]
    rewards = ocr(prompts, images)
    assert rewards[0] == 1.0                       # read exactly (case and spaces normalised)
    assert rewards[1] == pytest.approx(text_similarity("closed", "open"))  # 1 - 4/6 by hand: 'open' vs 'closed'
    assert math.isnan(rewards[2])                  # no quoted text: the reward does not apply
    assert rewards[3] == 0.0                       # nothing to read


def test_ocr_bad_input(ocr):
    with pytest.raises(ValueError, match=r"completions\[0\] is a float array outside \[0, 1\]"):
        import numpy as np

        ocr(['"A"'], [np.full((8, 8, 3), 3.0)])
    with pytest.raises(ValueError, match=r"prompts\[0\] is a int"):
        ocr([3], [Image.new("RGB", (8, 8))])
