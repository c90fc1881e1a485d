"""The value-fitted flow head (objectives/value_flow_head.py, ``flow_head_fit: value``) against the closed-form residual
flow of the analytic Gaussian problem (tests/objectives/test_gaussian_target.py,
tests/objectives/test_pathwise_flow.py)."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.sampling import sample_rollout
from gflowdiff.objectives import ObjectiveContext, ResidualNablaDB
from gflowdiff.objectives.value_flow_head import ValueFlowHead, soft_labels, value_fit_loss
from tests.objectives.test_gaussian_target import BETA, DIM, F64, QUADRATIC, SAMPLER, GaussianPolicy, QuadraticReward
from tests.objectives.test_pathwise_flow import exact_flow_scores


def bounded_reward() -> QuadraticReward:
    reward = QuadraticReward(**QUADRATIC)  # r = −½(x − m)ᵀA(x − m) ≤ 0, the maximum at x = m
    reward.upper_bound = 0.0
    return reward


def test_a_fresh_value_head_is_flat():
    # Zero-initialised last layer: F̃_φ = ½ everywhere, flow score 0, so training starts at the pretrained sampler.
    head = ValueFlowHead(channels=4, sample_size=16, cross_attention_dim=8)
    x, t, embeds = torch.randn(3, 4, 16, 16), torch.tensor([901, 401, -19]), torch.randn(3, 5, 8)
    torch.testing.assert_close(head.logit(x, t, embeds), torch.zeros(3))
    torch.testing.assert_close(head(x, t, embeds), torch.zeros_like(x))


def test_soft_labels_and_their_loss_minimiser():
    # BCE with soft labels y is minimised at σ(logit) = mean y: with labels {0.2, 0.6} the best constant is 0.4.
    labels = soft_labels(torch.tensor([0.2, 0.6]).log(), 1.0, 0.0)
    torch.testing.assert_close(labels, torch.tensor([0.2, 0.6]))
    logits = torch.linspace(-3, 3, 601)
    losses = [float(torch.nn.functional.binary_cross_entropy_with_logits(v.expand(2), labels)) for v in logits]
    best = torch.sigmoid(logits[torch.tensor(losses).argmin()])
    assert float(best) == pytest.approx(0.4, abs=0.005)


@pytest.mark.parametrize("head_input", ["state", "state_and_denoised"])
def test_warm_up_fits_the_exact_flow_score_of_a_curved_reward(head_input):
    policy, reward = GaussianPolicy(), bounded_reward()
    objective = ResidualNablaDB(
        reward_scale=BETA, flow_head_fit="value", reward_guess_weighting="off", reverse_loss_scale=0.0,
        value_warmup_trajectories=8192, value_warmup_epochs=8, value_head_input=head_input,
    )  # fmt: skip
    head = ValueFlowHead(channels=DIM, sample_size=1, cross_attention_dim=1,
                         denoised_input=objective.value_head_reads_denoised)  # fmt: skip
    objective.check_compatible(reward)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    context = ObjectiveContext(policy, reward, SAMPLER, head, generator)
    objective.warm_up(context, [""])
    with policy.reference():
        rollout = sample_rollout(policy, [""] * 512, reward, SAMPLER, torch.Generator().manual_seed(1))
    exact = exact_flow_scores(policy, reward)
    errors = []
    for k in (2, 8, 14, 18):
        x, t = rollout.latents[:, k], rollout.timesteps[k].repeat(512)
        step = policy.transition_step(t, rollout.prev_timesteps[k].repeat(512), SAMPLER.eta)
        denoise = objective.pretrained_denoiser(context, t, rollout.prompt_embeds, rollout.negative_embeds, step, False)
        options = {} if denoise is None else {"denoise": denoise}
        fitted = head(x, t, rollout.prompt_embeds.embeds, **options).flatten(1).to(F64)
        curvature, slope = exact[k]
        truth = slope - x.flatten(1).to(F64) @ curvature.T  # ∇ log F̃_k(x) = h_k − H_k x
        errors.append(float((fitted - truth).norm(dim=1).mean() / truth.norm(dim=1).mean()))
    # A flat (untrained) head's relative error is 1.0.
    assert max(errors) < 0.3, errors


def test_value_fit_needs_a_bounded_reward_and_the_whole_flow_score():
    with pytest.raises(ValueError, match="flow_head_fit value makes the flow head the whole flow score"):
        ResidualNablaDB(flow_head_fit="value")  # the guess and the reverse condition are on by default
    objective = ResidualNablaDB(flow_head_fit="value", reward_guess_weighting="off", reverse_loss_scale=0.0)
    with pytest.raises(ValueError, match="needs a reward with a known upper bound"):
        objective.check_compatible(QuadraticReward(**QUADRATIC))


def test_a_head_reading_the_denoised_sample_differentiates_through_the_denoiser():
    """With denoised_input the flow score is the total derivative ∇_x log σ(logit(x, D(x))), D's Jacobian included."""
    torch.manual_seed(0)
    head = ValueFlowHead(channels=1, sample_size=8, cross_attention_dim=4, denoised_input=True)
    torch.nn.init.normal_(head.head[-1].weight, std=0.3)  # not flat
    weight = torch.randn(64, 64) / 8

    def denoise(x):  # a nonlinear stand-in for x̂0_#(x)
        return torch.tanh(x.flatten(1) @ weight).view_as(x)

    x, t, embeds = torch.randn(3, 1, 8, 8), torch.tensor([901, 401, 21]), torch.randn(3, 2, 4)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        torch.nn.functional.logsigmoid(head.logit(leaf, t, embeds, denoise(leaf))).sum(), leaf
    )
    torch.testing.assert_close(head(x, t, embeds, denoise=denoise), expected)
    partial = torch.autograd.grad(  # holding D(x) fixed gives a different field
        torch.nn.functional.logsigmoid(head.logit(leaf, t, embeds, denoise(x))).sum(), leaf
    )[0]
    assert (partial - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="denoised_input"):
        head(x, t, embeds)


def test_value_fit_loss_is_the_soft_label_cross_entropy():
    head = ValueFlowHead(channels=1, sample_size=8, cross_attention_dim=4)
    with torch.no_grad():
        head.head[-1].bias.fill_(0.5)  # logit 0.5 everywhere
    labels = torch.tensor([0.0, 1.0, 0.25])
    p = torch.sigmoid(torch.tensor(0.5))
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log())
    loss = value_fit_loss(head, torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.randn(3, 2, 4), labels)
    torch.testing.assert_close(loss, expected.mean())


def test_the_demo_config_with_its_value_head_resumes_exactly(tiny_sd_path, tmp_path, monkeypatch):
    # The fit before the first step must not run again on resume (the fitted head is in the checkpoint), and the
    # resumed run must end with the uninterrupted run's weights, flow head included.

    from gflowdiff.cli import main
    from tests.training.test_module import DIGITS_CONFIG
    from tests.training.test_resume import fit_args, killed_after_checkpoint, trainable

    demo = str(DIGITS_CONFIG).replace("residual_nabla_db_paper.yaml", "residual_nabla_db.yaml")
    small = ["--model.objective.value_warmup_trajectories", "8", "--model.objective.value_warmup_epochs", "1"]

    def args(root, *extra):
        values = fit_args(tiny_sd_path, root, *small, *extra)
        return [demo if value == str(DIGITS_CONFIG) else value for value in values]

    monkeypatch.chdir(tmp_path)
    uninterrupted = main(args(tmp_path / "a"))
    assert isinstance(uninterrupted.model.flow_head, ValueFlowHead)
    with killed_after_checkpoint(monkeypatch, step=2):
        main(args(tmp_path / "b"))
    warm_ups = []
    original = ResidualNablaDB.warm_up
    monkeypatch.setattr(ResidualNablaDB, "warm_up", lambda self, *a: warm_ups.append(1) or original(self, *a))
    resumed = main(args(tmp_path / "b", "--ckpt_path", "last"))
    assert not warm_ups  # resumed at step 2: the head comes from the checkpoint
    expected, actual = trainable(uninterrupted), trainable(resumed)
    assert any(key.startswith("flow_head.") for key in expected)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_the_x0_reading_head_and_the_mean_evaluation_point_train_and_check_their_options(
    tiny_sd_path, tmp_path, monkeypatch
):
    """value_head_input: state_and_denoised builds a head on [x, x̂0_#] whose flow score runs through the frozen UNet;
    flow_score_point: step_mean evaluates it at μ_#(x); both train on the tiny SD; bad values are refused."""
    from gflowdiff.cli import main
    from tests.training.test_module import DIGITS_CONFIG
    from tests.training.test_resume import fit_args

    with pytest.raises(ValueError, match="value_head_input must be state or state_and_denoised"):
        ResidualNablaDB(flow_head_fit="value", reward_guess_weighting="off", reverse_loss_scale=0.0,
                        value_head_input="x0")  # fmt: skip
    with pytest.raises(ValueError, match="flow_score_point step_mean .* flow_head_fit: value"):
        ResidualNablaDB(flow_score_point="step_mean")
    with pytest.raises(ValueError, match="flow_score_point must be next_state or step_mean"):
        ResidualNablaDB(flow_score_point="mean")
    demo = str(DIGITS_CONFIG).replace("residual_nabla_db_paper.yaml", "residual_nabla_db.yaml")
    options = [
        "--model.objective.value_warmup_trajectories", "8", "--model.objective.value_warmup_epochs", "1",
        "--model.objective.value_head_input", "state_and_denoised",
        "--model.objective.flow_score_point", "step_mean",
    ]  # fmt: skip
    points = []
    original = ResidualNablaDB.flow_from_guess_next

    def recording(self, chunk, guess, ctx, step, head_point=None):
        points.append((head_point, chunk.x_next))
        return original(self, chunk, guess, ctx, step, head_point)

    monkeypatch.setattr(ResidualNablaDB, "flow_from_guess_next", recording)
    monkeypatch.chdir(tmp_path)
    args = [demo if value == str(DIGITS_CONFIG) else value for value in fit_args(tiny_sd_path, tmp_path, *options)]
    cli = main(args)
    head = cli.model.flow_head
    assert head.denoised_input and head.convs[0].in_channels == 2 * cli.model.policy.latent_channels
    assert points and cli.trainer.global_step > 0
    for mean, x_next in points:  # μ_#(x), not the sampled x'
        assert mean is not None and mean.shape == x_next.shape and not torch.equal(mean, x_next)
    assert torch.isfinite(torch.tensor(cli.trainer.logged_metrics["loss"]))
