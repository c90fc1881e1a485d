"""Evaluation metrics against closed forms, and ``gflowdiff validate`` / ``gflowdiff compare`` end to end."""

from __future__ import annotations

import math

import pytest
import torch

from gflowdiff.evaluation.metrics import (
    PerPromptDiversity,
    PriorFidelity,
    RewardStatistics,
    TargetFidelity,
    importance_weighted_histogram,
    total_variation,
)
from gflowdiff.evaluation.metrics.prior_fidelity import frechet_distance, kernel_distance
from gflowdiff.evaluation.metrics.target_fidelity import effective_sample_size


def test_reward_statistics_match_torch_over_several_updates():
    values = torch.randn(37, generator=torch.Generator().manual_seed(0)) * 3 + 1
    metric = RewardStatistics()
    for chunk in values.split(10):
        metric.update(chunk)
    result = metric.compute()
    torch.testing.assert_close(result["mean"], values.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result["std"], values.std(), rtol=1e-5, atol=1e-6)


def test_reward_statistics_reject_nan():
    with pytest.raises(ValueError, match="NaN"):
        RewardStatistics().update(torch.tensor([1.0, math.nan]))


def test_diversity_is_the_mean_pairwise_distance_per_prompt():
    # prompt "a": three points on a line at 0, 1, 3 → pairwise distances 1, 3, 2 → mean 2; prompt "b": two points 4
    # apart → 4. Average over prompts: 3. Identical samples: 0.
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    metric = PerPromptDiversity("euclidean")
    metric.update(torch.cat([a[:2], b[:1]]), ["a", "a", "b"])
    metric.update(torch.cat([a[2:], b[1:]]), ["a", "b"])
    torch.testing.assert_close(metric.compute(), torch.tensor(3.0))
    collapsed = PerPromptDiversity("cosine")
    collapsed.update(torch.ones(5, 3), ["p"] * 5)
    assert float(collapsed.compute()) == pytest.approx(0.0, abs=1e-6)
    orthogonal = PerPromptDiversity("cosine")
    orthogonal.update(torch.eye(3), ["p"] * 3)
    assert float(orthogonal.compute()) == pytest.approx(1.0)


def test_frechet_distance_closed_form_for_shifted_and_scaled_gaussians():
    # FID(N(μ1, Σ1), N(μ2, Σ2)) = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½); with Σ2 = s²Σ1 = s²I (d = 4) and a shift of
    # norm 2: 4 + d(1 + s² − 2s) = 4 + 4(1 − s)². Checked on the fitted moments of large samples.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 4, generator=generator, dtype=torch.float64)
    b = 1.5 * torch.randn(200_000, 4, generator=generator, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 0])
    assert float(frechet_distance(a, b)) == pytest.approx(4 + 4 * 0.25, rel=0.02)
    assert float(frechet_distance(a, a)) == pytest.approx(0.0, abs=1e-3)


def test_kernel_distance_is_unbiased_near_zero_for_one_distribution_and_positive_otherwise():
    generator = torch.Generator().manual_seed(1)
    same = [float(kernel_distance(torch.randn(64, 8, generator=generator), torch.randn(64, 8, generator=generator)))
            for _ in range(20)]  # fmt: skip
    assert abs(sum(same) / len(same)) < 0.05
    shifted = kernel_distance(torch.randn(64, 8, generator=generator), torch.randn(64, 8, generator=generator) + 1)
    assert float(shifted) > 0.5


def test_prior_fidelity_is_per_prompt():
    """Two prompts whose pretrained sets differ: pooled they would look alike, per prompt each set is matched."""
    generator = torch.Generator().manual_seed(2)
    cat = torch.randn(300, 3, generator=generator)
    dog = torch.randn(300, 3, generator=generator) + 5
    matched = PriorFidelity()
    matched.update(cat[:150], ["cat"] * 150, pretrained=False)
    matched.update(cat[150:], ["cat"] * 150, pretrained=True)
    matched.update(dog[:150], ["dog"] * 150, pretrained=False)
    matched.update(dog[150:], ["dog"] * 150, pretrained=True)
    swapped = PriorFidelity()  # each prompt's fine-tuned samples look like the other prompt's pretrained ones
    swapped.update(dog[:150], ["cat"] * 150, pretrained=False)
    swapped.update(cat[150:], ["cat"] * 150, pretrained=True)
    swapped.update(cat[:150], ["dog"] * 150, pretrained=False)
    swapped.update(dog[150:], ["dog"] * 150, pretrained=True)
    good, bad = matched.compute(), swapped.compute()
    assert float(good["fid"]) < 0.2 and float(bad["fid"]) > 70  # ‖shift‖² = 75
    assert float(good["kid"]) < 0.05 < float(bad["kid"])


def test_target_histogram_and_total_variation_closed_form():
    # Pretrained classes 0, 0, 1, 2 with rewards log(1), log(1), log(2), log(4) and β = 1: weights ∝ 1, 1, 2, 4 →
    # target histogram (2/8, 2/8, 4/8). Fine-tuned all class 2 → TV = ½(¼ + ¼ + ½) = ½.
    classes = torch.tensor([0, 0, 1, 2])
    rewards = torch.tensor([1.0, 1.0, 2.0, 4.0]).log()
    target = importance_weighted_histogram(classes, rewards, beta=1.0, num_classes=3)
    torch.testing.assert_close(target, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert float(total_variation(torch.tensor([0.0, 0.0, 1.0]), target)) == pytest.approx(0.5)
    assert float(effective_sample_size(rewards, 1.0)) == pytest.approx(64 / 22)  # (Σw)²/Σw² = 8²/(1+1+4+16)
    metric = TargetFidelity(beta=1.0, num_classes=3)
    metric.update(rewards, classes, torch.tensor([2, 2, 2, 2]))
    result = metric.compute()
    assert float(result["tv"]) == pytest.approx(0.5)
    # the target's expected reward Σ w r = (1·0 + 1·0 + 2·log 2 + 4·log 4)/8 = 10 log 2 / 8
    assert float(result["reward"]) == pytest.approx(10 * math.log(2) / 8, rel=1e-5)
    # β = 0: the target is the pretrained histogram itself
    torch.testing.assert_close(
        importance_weighted_histogram(classes, rewards, 0.0, 3), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    )


# ---- end to end -------------------------------------------------------------------------------------------------
def test_compare_trains_evaluates_reuses_and_writes_table_and_plots(tmp_path, capsys):
    from pathlib import Path

    from gflowdiff.experiments.compare import main

    repo = Path(__file__).resolve().parents[2]
    configs = [str(repo / "configs" / "digits" / name) for name in ("residual_nabla_db_paper.yaml", "refl.yaml")]
    args = ["--configs", *configs, "--seeds", "0", "--steps", "2", "--samples", "24", "--out", str(tmp_path),
            "--threads", "1"]  # fmt: skip
    main(args)
    table = (tmp_path / "results.md").read_text()
    assert "| residual_nabla_db_paper | ResidualNablaDB | 1 | 1 |" in table and "| refl | ReFL |" in table
    assert "pretrained (no fine-tuning)" in table
    for png in ("reward_vs_step.png", "reward_vs_diversity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    main(args)  # everything done is reused: no training, no sampling
    out = capsys.readouterr().out
    assert out.count("[compare] reuse") == 4 and "[compare] train" not in out and "[compare] eval" not in out


def test_compare_rejects_missing_configs_and_bad_overrides(tmp_path):
    from gflowdiff.experiments.compare import main

    with pytest.raises(SystemExit):
        main(["--configs", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        main(["--configs", __file__, "--set", "no-equals-sign"])


def test_compare_composed_config_names_its_run_and_passes_both_configs(tmp_path):
    from pathlib import Path

    from gflowdiff.experiments.runs import RunSpec

    base, override = Path("configs/digits/residual_nabla_db.yaml"), Path("configs/digits/overrides/beta2.yaml")
    spec = RunSpec(Path(f"{base}+{override}"), 1, ("model.objective.init_args.pretrained_strength=0.5",), tmp_path, 7)
    assert spec.name == "residual_nabla_db+beta2__pretrained_strength=0.5"
    command = spec.fit_command()
    assert command[command.index("fit") + 1 : command.index("fit") + 5] == [
        "--config",
        str(base),
        "--config",
        str(override),
    ]
    assert command[-2:] == ["--model.objective.init_args.pretrained_strength", "0.5"]
    assert command[command.index("--trainer.max_steps") + 1] == "7" and "--seed_everything" in command
