"""Reward-map rules, downsampling, proposers and score parsing against hand-computed values."""

import numpy as np
import pytest
from PIL import Image

from srum_trl.rewards import (GridProposer, Region, RewardMap, UMMJudgeRewardFunction, downsample, parse_score,
                              render_reward_map, signed_rule, srum_rule)
from srum_trl.rewards.reward_map import check_box
from srum_trl.warn import SRUMTrlWarning


def test_srum_rule_hand_computed():
    # g = 0.6 scales by 0.8; region score 0.5 -> (0.5 + 1) / 2 = 0.75 inside the box, 0.5 floor elsewhere.
    pixel = srum_rule(4, 4, 0.6, [Region((0, 0, 2, 2), 0.5)])
    expected = np.full((4, 4), 0.4, dtype=np.float32)
    expected[0:2, 0:2] = 0.6
    np.testing.assert_allclose(pixel, expected, atol=1e-6)


def test_srum_rule_negative_region_never_below_floor():
    # The documented quirk: max with the 0.5 floor, so s = -0.8 ((s+1)/2 = 0.1) leaves the box at 0.5 * (g+1)/2.
    pixel = srum_rule(4, 4, 1.0, [Region((1, 1, 3, 3), -0.8)])
    np.testing.assert_allclose(pixel, np.full((4, 4), 0.5), atol=1e-6)


def test_srum_rule_overlapping_regions_take_max():
    pixel = srum_rule(2, 4, 1.0, [Region((0, 0, 3, 2), 0.0), Region((2, 0, 4, 2), 1.0)])
    np.testing.assert_allclose(pixel[0], [0.5, 0.5, 1.0, 1.0], atol=1e-6)


def test_signed_rule_hand_computed():
    # local opinion: -1 in the box, 0 elsewhere; weight (L + g) / 2 with g = -1.
    pixel = signed_rule(2, 2, -1.0, [Region((0, 0, 1, 2), -1.0)])
    np.testing.assert_allclose(pixel, [[-1.0, -0.5], [-1.0, -0.5]], atol=1e-6)
    # overlapping: the stronger opinion wins (|-0.6| > |0.3|), with g = 0.2
    pixel = signed_rule(1, 2, 0.2, [Region((0, 0, 2, 1), 0.3), Region((1, 0, 2, 1), -0.6)])
    np.testing.assert_allclose(pixel, [[0.25, -0.2]], atol=1e-6)


def test_downsample_modes():
    pixel = np.zeros((8, 8), dtype=np.float32)
    pixel[:, :4] = 1.0
    for mode in ("bilinear", "area"):
        np.testing.assert_allclose(downsample(pixel, (2, 2), mode), [[1, 0], [1, 0]], atol=1e-6)
    small = np.zeros((8, 8), dtype=np.float32)
    small[0:2, 0:2] = 1.0  # a 2x2 box in the 4x4 top-left cell covers a quarter of it
    assert downsample(small, (2, 2), "area")[0, 0] == pytest.approx(0.25, abs=1e-6)
    # bilinear samples the cell center (pixel 1.5 -> 2 and 1 blended 50/50 per axis): pixels 1 and 2 -> 0.5*0.5
    assert downsample(small, (2, 2), "bilinear")[0, 0] == pytest.approx(0.25, abs=1e-6)
    tiny = np.zeros((8, 8), dtype=np.float32)
    tiny[0, 0] = 1.0  # one corner pixel: bilinear misses it, area counts 1/16
    assert downsample(tiny, (2, 2), "bilinear")[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert downsample(tiny, (2, 2), "area")[0, 0] == pytest.approx(1 / 16, abs=1e-6)
    assert downsample(np.full((8, 8), 0.3, np.float32), (4, 4)) == pytest.approx(np.full((4, 4), 0.3))
    with pytest.raises(ValueError, match="downsample mode"):
        downsample(pixel, (2, 2), "nearest")


def test_reward_map_from_scores_token_map():
    m = RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((0, 0, 4, 4), 1.0)])
    # g = 0 halves everything: top-left cell (1.0 * 0.5), others (0.5 * 0.5)
    np.testing.assert_allclose(m.token_map, [[0.5, 0.25], [0.25, 0.25]], atol=1e-6)
    no_global = RewardMap.from_scores((8, 8), (2, 2), None, [])
    np.testing.assert_allclose(no_global.token_map, np.full((2, 2), 0.5), atol=1e-6)


@pytest.mark.parametrize(
    "box, message",
    [((3, 0, 3, 4), "is empty"), ((5, 0, 2, 4), "is inverted"), ((0, 6, 4, 2), "is inverted"),
     ((0, float("nan"), 2, 2), "NaN or infinite"), ((0, 0, float("inf"), 2), "NaN or infinite"),
     ((0, 0, 2), "four numbers"), (("a", 0, 1, 1), "four numbers"), (None, "four numbers"), (3, "four numbers")],
)
def test_malformed_boxes_get_a_named_error(box, message):
    with pytest.raises(ValueError, match=f"region 0 box .*{message}"):
        RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region(box, 0.5)])


def test_boxes_reaching_outside_are_clamped_with_a_warning():
    inside = RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((0, 0, 4, 4), 1.0)])
    with pytest.warns(SRUMTrlWarning, match="1 were clamped to it and 0 .* dropped"):
        clamped = RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((-3, -1, 4, 4), 1.0)])
    assert clamped.regions[0].box == (0, 0, 4, 4)
    np.testing.assert_allclose(clamped.token_map, inside.token_map)
    with pytest.warns(SRUMTrlWarning, match="0 were clamped to it and 1 .* dropped"):
        outside = RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((9, 9, 12, 12), 1.0)])
    assert outside.regions == [] and outside.token_map == pytest.approx(np.full((2, 2), 0.25))
    assert check_box((0.4, 1.6, 7.5, 8.2), 8, 8) == ((0, 2, 8, 8), False)  # rounded, then inside: nothing clamped


@pytest.mark.parametrize("score", [1.5, -2.0, float("inf")])
def test_bad_scores_are_rejected(score):
    with pytest.raises(ValueError, match="region 0 score"):
        RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((0, 0, 2, 2), score)])
    with pytest.raises(ValueError, match="global score"):
        RewardMap.from_scores((8, 8), (2, 2), score, [])


def test_missing_scores_are_nan_not_zero():
    # a region without a score is kept but left out of the map: the same map as without it
    m = RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((0, 0, 4, 4), float("nan")), Region((4, 4, 8, 8), 1.0)])
    alone = RewardMap.from_scores((8, 8), (2, 2), 0.0, [Region((4, 4, 8, 8), 1.0)])
    np.testing.assert_allclose(m.token_map, alone.token_map)
    assert len(m.regions) == 2 and np.isnan(m.regions[0].score)
    # no global score: no verdict on the image, the whole map is NaN (a score of 0 would give 0.25 everywhere)
    m = RewardMap.from_scores((8, 8), (2, 2), float("nan"), [Region((0, 0, 4, 4), 1.0)])
    assert np.isnan(m.token_map).all() and np.isnan(m.pixel_map).all()
    assert np.isnan(UMMJudgeRewardFunction.scalar(m))
    assert np.asarray(render_reward_map(Image.new("RGB", (8, 8)), m)).shape[2] == 3  # drawn in grey, no error
    local_only = RewardMap.from_scores((8, 8), (2, 2), None, [Region((0, 0, 4, 4), float("nan")),
                                                             Region((4, 4, 8, 8), 0.5)])
    assert UMMJudgeRewardFunction.scalar(local_only) == pytest.approx(0.5)  # the scored regions' mean


def test_unknown_rule():
    with pytest.raises(ValueError, match="Unknown map rule"):
        RewardMap.from_scores((8, 8), (2, 2), 0.0, [], rule="nope")


def test_grid_proposer_boxes():
    image = Image.new("RGB", (64, 64))
    assert GridProposer(2)(image, "") == [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64)]
    assert GridProposer(1, 3)(Image.new("RGB", (6, 4)), "") == [(0, 0, 2, 4), (2, 0, 4, 4), (4, 0, 6, 4)]
    with pytest.raises(ValueError, match="rows >= 1"):
        GridProposer(0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 0.8", 0.8),
        ("Identified Object: a cat\nScore: -0.45\nReason: blurry", -0.45),
        ("<think>Score: -1</think> Score: 0.5", 0.5),
        ("**Score:** -0.3", -0.3),
        ("Score: .5", 0.5),
        ("Score: 1.0.", 1.0),
        ("SCORE: -1", -1.0),
        ("I cannot tell.", None),
        ("", None),
        # only the documented scale: another one is not guessed at (it used to read 1.0 for each of these)
        ("Score: 8/10", None),
        ("Score: 8 / 10", None),
        ("Score: 7 out of 10", None),
        ("7 out of 10", None),
        ("Score: 80%", None),
        ("score = 1.7", None),
        ("Score: 8", None),
        # scientific notation is read as the number it is
        ("Score: 1e-1", 0.1),
        ("Score: -2.5E-1", -0.25),
        ("Score: 0.5 then Score: 9/10", None),  # the last Score counts
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text) == (None if expected is None else pytest.approx(expected))
