"""Reward plugins: every public class here is selectable as ``model.reward: {class_path: <Name>}``.

Helper modules (no plugins): ``preprocessing`` (differentiable resize / crop / normalise), ``loading`` (hub or local
weights with errors naming the option), ``clip_common`` (the CLIP embedder shared by CLIP-based rewards) and
``self_check`` (:func:`check_reward_gradient`).
"""

from gflowdiff.rewards.aesthetic import AestheticReward
from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.clip_score import ClipScoreReward
from gflowdiff.rewards.digit_classifier import DigitClassifierReward
from gflowdiff.rewards.hpsv2 import HPSv2Reward
from gflowdiff.rewards.image_reward import ImageReward
from gflowdiff.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from gflowdiff.rewards.pickscore import PickScoreReward
from gflowdiff.rewards.self_check import RewardGradientError, check_reward_gradient
from gflowdiff.rewards.weighted_sum import WeightedSum

__all__ = [
    "AestheticReward",
    "ClipScoreReward",
    "DigitClassifierReward",
    "HPSv2Reward",
    "ImageReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "PickScoreReward",
    "Reward",
    "RewardGradientError",
    "WeightedSum",
    "check_reward_gradient",
]
