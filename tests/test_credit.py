"""Per-token credit rules (`srum_trl.trainers.credit`) against hand computations, and their use by SRUMTrainer."""

import pytest
import torch
from datasets import Dataset

from srum_trl.models.base import Rollout
from srum_trl.trainers.credit import object_credit, position_baselines, region_cover


def test_position_baseline_is_the_mean_of_the_same_position_over_the_prompt():
    prompts = ["x", "y", "x", "y"]
    weights = torch.tensor([[0.5, 1.0], [0.2, 0.2], [0.5, 0.0], [0.4, 0.8]])
    base = position_baselines(prompts, weights)
    assert base.reshape(-1).tolist() == pytest.approx([0.5, 0.5, 0.3, 0.5, 0.5, 0.5, 0.3, 0.5])
    centred = weights - base
    # a background shared by both images of "x" (position 0: 0.5 in both) carries no weight
    assert centred[[0, 2], 0].tolist() == [0.0, 0.0]


def test_region_cover_is_the_covered_share_of_each_token():
    # 8x8 image, 2x2 tokens of 4x4 pixels; the box covers x 2..6, y 0..4: half of token 0 and half of token 1
    cover = region_cover((2, 0, 6, 4), (8, 8), (2, 2))
    assert cover.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert region_cover((0, 0, 1, 1), (8, 8), (2, 2)).tolist() == pytest.approx([1 / 16, 0, 0, 0])


def test_object_credit_compares_a_region_with_the_same_object_in_the_other_images():
    prompts = ["p", "p", "p", "q"]
    whole_top_left, whole_bottom_right = (0, 0, 4, 4), (4, 4, 8, 8)
    regions = [
        [("red circle", 0.8, whole_top_left), ("blue square", -0.6, whole_bottom_right)],
        [("red circle", 0.2, whole_bottom_right)],
        [("red circle", -0.4, whole_top_left), ("blue square", 0.4, (0, 4, 8, 8))],
        [("red circle", 1.0, whole_top_left)],  # alone in its group: nothing to compare with
    ]
    credit = object_credit(prompts, regions, (8, 8), (2, 2))
    # image 0: red circle 0.8 vs mean(0.2, -0.4) = -0.1 -> 0.9 on token 0; blue square -0.6 vs 0.4 -> -1.0 on token 3
    assert credit[0].tolist() == pytest.approx([0.9, 0.0, 0.0, -1.0])
    # image 1: red circle 0.2 vs mean(0.8, -0.4) = 0.2 -> 0 on token 3
    assert credit[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    # image 2: red circle -0.4 vs 0.5 -> -0.9 on token 0; blue square 0.4 vs -0.6 -> +1.0 on tokens 2 and 3
    assert credit[2].tolist() == pytest.approx([-0.9, 0.0, 1.0, 1.0])
    assert credit[3].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_object_credit_averages_overlapping_regions_by_cover():
    prompts = ["p", "p"]
    regions = [[("a", 1.0, (0, 0, 4, 4)), ("b", 0.0, (0, 0, 2, 4))], [("a", 0.0, (0, 0, 4, 4)), ("b", 0.5, (0, 0, 4, 4))]]
    credit = object_credit(prompts, regions, (8, 8), (2, 2))
    # token 0 of image 0: a covers 1 (credit 1.0), b covers 0.5 (credit -0.5): (1.0 - 0.25) / 1.5
    assert credit[0, 0].item() == pytest.approx(0.75 / 1.5)
    with pytest.raises(ValueError, match="region lists"):
        object_credit(prompts, regions[:1], (8, 8), (2, 2))


def _trainer(tiny_janus, tmp_path, **kw):
    from srum_trl import SRUMConfig, SRUMTrainer

    model, processor = tiny_janus
    args = SRUMConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, constraint_weight=0.0, report_to="none", use_cpu=True, **kw)
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    return SRUMTrainer(model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                       processing_class=processor)


def _round(trainer, maps):
    batch = next(iter(trainer.get_train_dataloader()))
    prompts = [row["prompt"] for row in batch]
    rollout = Rollout(prompts, [None] * 4, torch.zeros(4, 4, dtype=torch.long), (2, 2))

    class _Image:
        size = (8, 8)

    rollout.images = [_Image()] * 4
    trainer.backend.generate = lambda prompts, config, seed=None: rollout
    trainer._judge = lambda rollout, mode: (maps, [0.0] * 4)
    return trainer._make_round(batch, "train")["weights"]


def test_trainer_object_credit_adds_region_credit_to_the_centred_global_weight(tiny_janus, tmp_path):
    from srum_trl.rewards import Region, RewardMap

    trainer = _trainer(tiny_janus, tmp_path, reward_baseline="prompt", local_credit="object", local_credit_weight=2.0)

    def reward_map(g, regions):  # the token map is ignored by object credit: give it nonsense
        return RewardMap(g, regions, None, torch.full((2, 2), 9.0).numpy())

    maps = [reward_map(0.6, [Region((0, 0, 4, 4), 0.5, "o")]), reward_map(-0.2, [Region((0, 0, 4, 4), -0.5, "o")]),
            reward_map(0.0, []), reward_map(0.0, [])]
    weights = _round(trainer, maps)
    # global part: srum rule (g + 1) / 4 = 0.4 and 0.2, minus the prompt's mean 0.3 -> +0.1 / -0.1
    # region credit: 0.5 - (-0.5) = +1.0 and -1.0 on token 0, times beta / 4 = 0.5
    assert weights[0].tolist() == pytest.approx([0.1 + 0.5, 0.1, 0.1, 0.1])
    assert weights[1].tolist() == pytest.approx([-0.1 - 0.5, -0.1, -0.1, -0.1])
    assert weights[2:].abs().max().item() == 0.0
    assert trainer._metrics["train"]["srum/object_credit"][-1] == pytest.approx(2 / 16)


def test_trainer_position_baseline(tiny_janus, tmp_path):
    from srum_trl.rewards import RewardMap

    trainer = _trainer(tiny_janus, tmp_path, reward_baseline="position")
    maps = [RewardMap(None, [], None, torch.tensor(m).numpy()) for m in
            ([[0.5, 1.0], [0.5, 0.5]], [[0.5, 0.0], [0.5, 0.7]], [[0.2, 0.2], [0.2, 0.2]], [[0.4, 0.4], [0.4, 0.4]])]
    weights = _round(trainer, maps)
    assert weights[0].tolist() == pytest.approx([0.0, 0.5, 0.0, -0.1])
    assert weights[1].tolist() == pytest.approx([0.0, -0.5, 0.0, 0.1])
    assert weights[2].tolist() == pytest.approx([-0.1] * 4)


@pytest.mark.parametrize("kw, message", [
    ({"local_credit": "pixels"}, "local_credit must be one of"),
    ({"local_credit": "object", "use_local_reward": False}, "use_local_reward"),
    ({"local_credit_weight": -1.0}, "local_credit_weight"),
])
def test_credit_fields_checked(tmp_path, kw, message):
    from srum_trl import SRUMConfig

    with pytest.raises(ValueError, match=message):
        SRUMConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def test_object_credit_needs_several_images_per_prompt(tiny_janus, tmp_path):
    from srum_trl import SRUMConfig, SRUMTrainer

    model, processor = tiny_janus
    args = SRUMConfig(output_dir=str(tmp_path / "o"), local_credit="object", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        SRUMTrainer(model, args=args, train_dataset=Dataset.from_dict({"prompt": ["a red circle"] * 8}),
                    processing_class=processor)
