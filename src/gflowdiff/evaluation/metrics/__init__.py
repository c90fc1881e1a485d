"""Evaluation metrics (torchmetrics ``Metric``s, correct under DDP) and the feature spaces they measure in."""

from gflowdiff.evaluation.metrics.diversity import PerPromptDiversity
from gflowdiff.evaluation.metrics.features import (
    ClassifierFeatures,
    ClipImageFeatures,
    PixelFeatures,
    build_feature_extractor,
)
from gflowdiff.evaluation.metrics.prior_fidelity import PriorFidelity
from gflowdiff.evaluation.metrics.reward_statistics import RewardStatistics
from gflowdiff.evaluation.metrics.target_fidelity import TargetFidelity, importance_weighted_histogram, total_variation

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
