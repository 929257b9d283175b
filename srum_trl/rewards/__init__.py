"""Rewards: the model's own judge, region proposers and dense reward maps."""

from .judge import DEFAULT_QUESTIONS, UMMJudgeRewardFunction, parse_score
from .regions import CallableProposer, GridProposer, RegionProposer, SAMProposer, build_proposer
from .reward_map import MAP_RULES, Region, RewardMap, downsample, global_weight, signed_rule, srum_rule
from .visualize import render_reward_map

__all__ = [
    "CallableProposer",
    "DEFAULT_QUESTIONS",
    "GridProposer",
    "MAP_RULES",
    "Region",
    "RegionProposer",
    "RewardMap",
    "SAMProposer",
    "UMMJudgeRewardFunction",
    "build_proposer",
    "downsample",
    "global_weight",
    "parse_score",
    "render_reward_map",
    "signed_rule",
    "srum_rule",
]
