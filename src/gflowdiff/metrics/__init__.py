"""Evaluation metrics (torchmetrics ``Metric``s, correct under DDP) and the feature spaces they measure in."""

from gflowdiff.metrics.diversity import PerPromptDiversity
from gflowdiff.metrics.features import ClassifierFeatures, ClipImageFeatures, PixelFeatures, build_feature_extractor
from gflowdiff.metrics.prior_fidelity import PriorFidelity
from gflowdiff.metrics.reward_statistics import RewardStatistics
from gflowdiff.metrics.target_fidelity import TargetFidelity, importance_weighted_histogram, total_variation

__all__ = [
    "ClassifierFeatures",
    "ClipImageFeatures",
    "PerPromptDiversity",
    "PixelFeatures",
    "PriorFidelity",
    "RewardStatistics",
    "TargetFidelity",
    "build_feature_extractor",
    "importance_weighted_histogram",
    "total_variation",
]
