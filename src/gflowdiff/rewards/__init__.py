"""Reward plugins: every public class here is selectable as ``model.reward: {class_path: <Name>}``."""

from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.digit_classifier import DigitClassifierReward

__all__ = ["DigitClassifierReward", "Reward"]
