"""The exact (rejection) and importance-weighted estimates of the tilted target, and the TV floor, on toy rewards with
closed-form targets."""

from __future__ import annotations

import math

import pytest
import torch

from gflowdiff.evaluation.metrics.target_fidelity import (
    TargetFidelity,
    class_histogram,
    exact_tv_floor,
    importance_weighted_histogram,
    rejection_accept,
    target_fidelity,
    total_variation,
)

# A toy "pretrained model": 4 classes with probabilities P; every sample of class c has log-reward log S[c] ≤ 0, so the
# target p^#·exp(β·r) has class shares ∝ P·S^β exactly.
P = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
S = torch.tensor([0.05, 1.0, 0.5, 0.8], dtype=torch.float64)


def toy_samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.multinomial(P, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return classes, S[classes].log()


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_rejection_and_importance_weighting_agree_with_the_closed_form_target(beta):
    classes, rewards = toy_samples(200_000, seed=0)
    exact = P * S**beta / (P * S**beta).sum()  # β = 1: (0.04, 0.6, 0.2, 0.16)
    accepted = rejection_accept(rewards, beta, reward_max=0.0, generator=torch.Generator().manual_seed(1))
    rejection = class_histogram(classes[accepted], 4)
    weighted = importance_weighted_histogram(classes, rewards, beta, 4)
    # Monte-Carlo error: ~1e5 accepted samples → std of a share ≤ 0.0016; 0.01 is > 6 std.
    assert float(total_variation(rejection, exact)) < 0.01, (rejection, exact)
    assert float(total_variation(weighted, exact)) < 0.01, (weighted, exact)
    assert float(total_variation(rejection, weighted)) < 0.01
    # The acceptance rate is Z = Σ P·S^β (0.5 at β = 1, 0.415 at β = 2).
    assert float(accepted.double().mean()) == pytest.approx(float((P * S**beta).sum()), abs=0.005)


def test_floor_of_two_classes_matches_the_binomial_mean_absolute_deviation():
    # n samples of a fair coin against the exact shares (target_count huge): TV = |p̂ − ½|, whose mean is
    # E|X − 50|/100 for X ~ Bin(100, ½), = 51·C(100, 51)/2¹⁰⁰/100 = 0.0398 (the mean absolute deviation).
    expected = 51 * math.comb(100, 51) / 2**100 / 100
    floor, spread = exact_tv_floor(
        torch.tensor([0.5, 0.5]), 100, 10_000_000, torch.Generator().manual_seed(0), draws=4000
    )
    assert floor == pytest.approx(expected, abs=0.002)  # standard error ≈ 0.03/√4000 = 0.0005
    assert 0.02 < spread < 0.04  # std of |p̂ − ½| = √(0.0025 − 0.0398²) = 0.030


def test_perfect_sampler_scores_near_its_floor_and_a_wrong_one_far_above():
    classes, rewards = toy_samples(8_000, seed=2)
    exact = P * S / (P * S).sum()
    perfect = torch.multinomial(exact, 512, replacement=True, generator=torch.Generator().manual_seed(3))
    wrong = torch.multinomial(P, 512, replacement=True, generator=torch.Generator().manual_seed(4))  # untilted
    good = target_fidelity(perfect, classes, rewards, 1.0, reward_max=0.0, num_classes=4)
    bad = target_fidelity(wrong, classes, rewards, 1.0, reward_max=0.0, num_classes=4)
    assert good["exact"] == 1.0 and good["samples"] == pytest.approx(8000 * 0.5, rel=0.05)
    assert good["tv"] < good["tv_floor"] + 3 * good["tv_floor_std"]
    # TV(P, target) = ½(0.36 + 0.3 + 0 + 0.06) = 0.36 in closed form: far above the floor (≈ 0.03)
    assert bad["tv"] > 0.3 > 5 * bad["tv_floor"]
    weighted = target_fidelity(perfect, classes, rewards, 1.0, reward_max=None, num_classes=4)
    assert weighted["exact"] == 0.0 and weighted["tv"] < weighted["tv_floor"] + 3 * weighted["tv_floor_std"]


def test_rejection_refuses_a_reward_above_its_declared_bound():
    with pytest.raises(ValueError, match="exceeds the reward's declared upper bound"):
        rejection_accept(torch.tensor([-1.0, 0.5]), 1.0, 0.0, torch.Generator())


def test_metric_uses_the_exact_target_when_the_reward_declares_a_bound():
    classes, rewards = toy_samples(4_000, seed=5)
    tuned = torch.multinomial(P * S / (P * S).sum(), 256, replacement=True, generator=torch.Generator().manual_seed(6))
    metric = TargetFidelity(beta=1.0, reward_max=0.0, num_classes=4)
    for part in range(4):  # several batches, as an evaluation sends them
        rows = slice(part * 1000, (part + 1) * 1000)
        metric.update(rewards[rows], classes[rows], tuned[part * 64 : (part + 1) * 64])
    result = metric.compute()
    assert float(result["exact"]) == 1.0
    assert float(result["tv"]) < float(result["tv_floor"] + 3 * result["tv_floor_std"])
    assert float(result["reward"]) == pytest.approx(float((P * S * S.log()).sum() / (P * S).sum()), abs=0.02)


def test_digit_reward_declares_its_bound():
    from gflowdiff.rewards import DigitClassifierReward, WeightedSum

    reward = DigitClassifierReward()
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert reward.upper_bound == 0.0 and bool((reward(images, [""] * 64) <= 0).all())
    assert WeightedSum([DigitClassifierReward(), DigitClassifierReward()], [0.5, 2.0]).upper_bound == 0.0
    assert WeightedSum([DigitClassifierReward()], [-1.0]).upper_bound is None  # −log p is unbounded above


def test_each_objective_declares_the_beta_of_its_target():
    # Issue: `reward_scale` meant β in the ∇-DB/DB family and a loss multiplier in ReFL/DRaFT, and the evaluation read
    # it as β for every objective. Now the multiplier is `loss_scale` and objectives that target no distribution say so.
    import inspect

    from gflowdiff.objectives import DB, DDPO, DRaFT, NablaDB, ReFL, ResidualDB, ResidualNablaDB

    for objective_class in (ResidualNablaDB, NablaDB, DB, ResidualDB):
        assert objective_class(reward_scale=2.5).target_beta == 2.5
    for objective_class in (ReFL, DRaFT):
        assert "reward_scale" not in inspect.signature(objective_class).parameters
        assert objective_class(loss_scale=3.0).target_beta is None
    assert DDPO().target_beta is None


def test_evaluator_reports_target_fidelity_only_for_objectives_with_a_target():
    from gflowdiff.evaluation.evaluator import EvaluationConfig, Evaluator
    from gflowdiff.rewards import DigitClassifierReward

    reward = DigitClassifierReward()
    assert Evaluator(EvaluationConfig(), reward, target_beta=None).target is None
    evaluator = Evaluator(EvaluationConfig(), reward, target_beta=1.0)
    assert evaluator.target is not None and evaluator.target.reward_max == 0.0  # exact: the reward's bound


def test_prior_distances_use_independent_pretrained_noise_and_report_their_floor():
    # Issue: FID/KID compared fine-tuned and pretrained samples from the same noise (correlated: KID went negative).
    # With an untrained LoRA the fine-tuned sampler *is* the pretrained one: from the same noise its FID would be 0
    # exactly; from independent noise it is a positive distance of the floor's size.
    from gflowdiff.diffusion.sampling import SamplerConfig
    from gflowdiff.evaluation.evaluator import EvaluationConfig, Evaluator, sample_pair
    from gflowdiff.objectives import ResidualNablaDB
    from gflowdiff.rewards import DigitClassifierReward
    from gflowdiff.training.module import GFlowDiffModule

    module = GFlowDiffModule(ResidualNablaDB(), DigitClassifierReward(), sampler=SamplerConfig(10, 1.0, 1.0))
    prompts = ["a handwritten digit"] * 96
    samples = sample_pair(module.policy, prompts, module.reward, module.sampler, 3, True, with_floor=True)
    assert not torch.equal(samples.tuned.latents[:, 0], samples.pretrained.latents[:, 0])
    assert not torch.equal(samples.pretrained.latents[:, 0], samples.pretrained_again.latents[:, 0])
    evaluator = Evaluator(EvaluationConfig(), module.reward, target_beta=1.0)
    evaluator.update(samples)
    results = evaluator.compute()
    assert results["prior_fid"] > 0 and results["prior_fid_floor"] > 0
    # the same distribution on both sides: the distance is at its floor's scale, not far above or at 0
    assert 0.25 < results["prior_fid"] / results["prior_fid_floor"] < 4
    assert abs(results["prior_kid"] - results["prior_kid_floor"]) < 0.1  # measured: −0.038 and 0.055 at 96 samples
