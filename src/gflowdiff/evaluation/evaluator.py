"""Evaluation of a policy against its own pretrained model: reward, diversity, prior preservation, target fidelity.

The metrics compare fine-tuned samples with pretrained samples drawn from *independent* noise (samples from the same
noise are correlated, which biases FID/KID and the target's TV); pretrained samples from the same noise are drawn
only for the side-by-side pictures. Used by ``gflowdiff validate`` / ``test`` (through the LightningModule) and by
``gflowdiff compare``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gflowdiff.diffusion.policy import DiffusionPolicy
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.diffusion.types import Rollout
from gflowdiff.evaluation.metrics import PerPromptDiversity, PriorFidelity, RewardStatistics, TargetFidelity
from gflowdiff.evaluation.metrics.diversity import Distance
from gflowdiff.evaluation.metrics.features import FeatureSpace, build_feature_extractor
from gflowdiff.rewards.base import Reward


@dataclass
class EvaluationConfig:
    """What ``validate``/``test`` (and the validation during ``fit``) measure.

    Args:
        feature_space: space of diversity and FID/KID: ``classifier`` (the digit reward's classifier), ``clip`` (a
            CLIP image embedding from ``feature_model``), or ``auto`` (the classifier when the reward has one).
        feature_model: CLIP hub id or local folder for ``feature_space: clip``.
        diversity_distance: ``cosine`` (1 − cos, DreamSim's form) or ``euclidean``.
        compare_to_pretrained: also sample the pretrained model, twice from independent noise (prior fidelity with
            its floor, target fidelity and the side-by-side grids need it; triples the sampling cost).
        grid_prompts: prompts whose pretrained | fine-tuned grids go to TensorBoard at each evaluation.
        log_images_every_n_steps: interval of the TensorBoard grid of training samples during ``fit``; 0 disables.
    """

    feature_space: FeatureSpace = "auto"
    feature_model: str | None = None
    diversity_distance: Distance = "cosine"
    compare_to_pretrained: bool = True
    grid_prompts: int = 4
    log_images_every_n_steps: int = 50

    def __post_init__(self) -> None:
        if self.grid_prompts < 0:
            raise ValueError("--model.evaluation.grid_prompts must be >= 0")
        if self.log_images_every_n_steps < 0:
            raise ValueError("--model.evaluation.log_images_every_n_steps must be >= 0 (0 disables)")


@dataclass
class EvaluationSamples:
    """One evaluation batch: fine-tuned samples; optionally pretrained samples from independent noise (for the
    metrics) and from the fine-tuned samples' noise (for side-by-side pictures only)."""

    tuned: Rollout
    pretrained: Rollout | None
    pretrained_same_noise: Rollout | None = None
    pretrained_again: Rollout | None = None  # a second independent pretrained set: the FID/KID floor


INDEPENDENT_NOISE_OFFSET = 7_777_777  # seed offset of the pretrained samples that the metrics compare against
FLOOR_NOISE_OFFSET = 2 * INDEPENDENT_NOISE_OFFSET  # and of the second pretrained set, for the distances' floor


@torch.no_grad()
def sample_pair(
    policy: DiffusionPolicy,
    prompts: list[str],
    reward: Reward,
    sampler: SamplerConfig,
    seed: int,
    with_pretrained: bool,
    same_noise_pretrained: bool = False,
    with_floor: bool = False,
) -> EvaluationSamples:
    tuned = sample_rollout(policy, prompts, reward, sampler, torch.Generator().manual_seed(seed))
    pretrained = same_noise = again = None
    with policy.reference():
        if with_pretrained:
            generator = torch.Generator().manual_seed(seed + INDEPENDENT_NOISE_OFFSET)
            pretrained = sample_rollout(policy, prompts, reward, sampler, generator)
        if with_pretrained and with_floor:
            generator = torch.Generator().manual_seed(seed + FLOOR_NOISE_OFFSET)
            again = sample_rollout(policy, prompts, reward, sampler, generator)
        if same_noise_pretrained:
            same_noise = sample_rollout(policy, prompts, reward, sampler, torch.Generator().manual_seed(seed))
    return EvaluationSamples(tuned, pretrained, same_noise, again)


class Evaluator(nn.Module):
    """Holds the metrics of one evaluation; ``update`` per batch, ``compute`` → flat dict of floats, ``reset``."""

    def __init__(self, config: EvaluationConfig, reward: Reward, target_beta: float | None) -> None:
        super().__init__()
        self.config = config
        self.features = build_feature_extractor(config.feature_space, reward, config.feature_model)
        self.classify = getattr(reward, "predict_classes", None)  # a discrete summary: enables target fidelity
        self.reward_stats = RewardStatistics()
        self.diversity = PerPromptDiversity(config.diversity_distance)
        self.pretrained_reward_stats = RewardStatistics()
        self.pretrained_diversity = PerPromptDiversity(config.diversity_distance)
        self.prior = PriorFidelity()
        self.prior_floor = PriorFidelity()  # pretrained vs pretrained at the same sample count
        # The tilted target p^#·exp(β·r) exists for objectives that declare a β; exact where r has a known bound.
        can_classify = self.classify is not None and target_beta is not None
        self.target = TargetFidelity(target_beta, reward.upper_bound) if can_classify else None
        self.batches_seen = 0

    def update(self, samples: EvaluationSamples) -> None:
        tuned, pretrained = samples.tuned, samples.pretrained
        tuned_features = self.features(tuned.images)
        self.reward_stats.update(tuned.rewards)
        self.diversity.update(tuned_features, tuned.prompts)
        if pretrained is not None:
            pretrained_features = self.features(pretrained.images)
            self.pretrained_reward_stats.update(pretrained.rewards)
            self.pretrained_diversity.update(pretrained_features, pretrained.prompts)
            self.prior.update(tuned_features, tuned.prompts, pretrained=False)
            self.prior.update(pretrained_features, pretrained.prompts, pretrained=True)
            if self.target is not None:
                self.target.update(pretrained.rewards, self.classify(pretrained.images), self.classify(tuned.images))
            if samples.pretrained_again is not None:
                self.prior_floor.update(self.features(samples.pretrained_again.images), pretrained.prompts, False)
                self.prior_floor.update(pretrained_features, pretrained.prompts, pretrained=True)
        self.batches_seen += 1

    def compute(self) -> dict[str, float]:
        results = {f"reward_{k}": float(v) for k, v in self.reward_stats.compute().items()}
        results["diversity"] = float(self.diversity.compute())
        if self.prior.update_called:
            results.update(
                {f"pretrained_reward_{k}": float(v) for k, v in self.pretrained_reward_stats.compute().items()}
            )
            results["pretrained_diversity"] = float(self.pretrained_diversity.compute())
            results.update({f"prior_{k}": float(v) for k, v in self.prior.compute().items()})
            if self.prior_floor.update_called:
                results.update({f"prior_{k}_floor": float(v) for k, v in self.prior_floor.compute().items()})
            if self.target is not None:
                results.update({f"target_{k}": float(v) for k, v in self.target.compute().items()})
        return results

    def reset(self) -> None:
        for metric in (
            self.reward_stats,
            self.diversity,
            self.pretrained_reward_stats,
            self.pretrained_diversity,
            self.prior,
            self.prior_floor,
        ):
            metric.reset()
        if self.target is not None:
            self.target.reset()
        self.batches_seen = 0


def side_by_side(pretrained: Tensor, tuned: Tensor) -> Tensor:
    """(N, C, H, W) pairs → (2N, C, H, W) ordered pretrained₁, fine-tuned₁, pretrained₂, ... for a 2-column grid."""
    return torch.stack([pretrained, tuned], dim=1).flatten(0, 1)
