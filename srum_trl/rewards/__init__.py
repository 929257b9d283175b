"""Rewards: the model's own judge, region proposers and dense reward maps; rewards on other models (CLIP score and
PickScore, another VLM as judge, OCR, GenEval's rules on a zero-shot detector). Each reward on another model imports
its library when built, so `import srum_trl.rewards` needs none of them."""

from .clip import CLIPScoreReward, PickScoreReward
from .geneval import Detection, GenEvalReward, GenEvalResult, ZeroShotDetector, check_geneval, parse_metadata
from .judge import DEFAULT_QUESTIONS, UMMJudgeRewardFunction, parse_score
from .regions import CallableProposer, GridProposer, RegionProposer, SAMProposer, build_proposer
from .ocr import OCRReward, quoted_text, text_similarity
from .reward_map import MAP_RULES, Region, RewardMap, downsample, global_weight, signed_rule, srum_rule
from .visualize import render_reward_map
from .vlm import TransformersJudge, VLMJudgeReward

__all__ = [
    "CLIPScoreReward",
    "CallableProposer",
    "Detection",
    "GenEvalResult",
    "GenEvalReward",
    "OCRReward",
    "PickScoreReward",
    "TransformersJudge",
    "VLMJudgeReward",
    "ZeroShotDetector",
    "check_geneval",
    "parse_metadata",
    "quoted_text",
    "text_similarity",
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
