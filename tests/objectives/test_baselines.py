"""The baselines (DDPO, ReFL, DRaFT, DB, residual DB): their math, and every registered objective end to end on the
tiny random SD pipeline (finite loss, what trains and what stays frozen, checkpoint round trip, CLI registration)."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

import gflowdiff.objectives as objectives
from gflowdiff.cli import main
from gflowdiff.diffusion.math import backward_kernel_sample, ddim_mean, ddim_std, per_sample
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.evaluation.evaluator import EvaluationConfig
from gflowdiff.objectives import DB, DDPO, DRaFT, NablaDB, Objective, ReFL, ResidualDB, ResidualNablaDB
from gflowdiff.objectives._pathwise import reward_loss, window_bounds
from gflowdiff.objectives._scalar_db import (
    backward_log_prob,
    db_residual,
    reduced_gaussian_log_prob,
)
from gflowdiff.objectives.ddpo import PromptStatTracker, per_prompt_advantages, ppo_clip_loss, reduce_log_prob
from gflowdiff.objectives.flow_head import FlowHeadConfig
from gflowdiff.rewards import DigitClassifierReward, Reward
from gflowdiff.training.data import PromptDataModule
from gflowdiff.training.module import GFlowDiffModule
from gflowdiff.training.optimization import OptimizationConfig
from tests.package_walk import concrete_classes_defined_in

REPO = Path(__file__).resolve().parents[2]
TINY_SAMPLER = SamplerConfig(num_inference_steps=4, guidance_scale=2.0)
TINY_FLOW_HEAD = FlowHeadConfig(block_out_channels=[8, 16], norm_num_groups=4, attention_head_dim=4)
PROMPTS = ["a cat", "a dog"]


def concrete_objectives() -> list[type[Objective]]:
    """Every concrete Objective subclass defined in any module of the package (all imported: package_walk.py)."""
    return concrete_classes_defined_in(objectives, Objective)


def tiny_module(tiny_sd_path, objective: Objective, reward: Reward | None = None, **kwargs) -> GFlowDiffModule:
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0))
    return GFlowDiffModule(
        objective=objective,
        reward=reward or DigitClassifierReward(),
        pretrained_model=str(tiny_sd_path),
        sampler=TINY_SAMPLER,
        flow_head=TINY_FLOW_HEAD,
        evaluation=EvaluationConfig(log_images_every_n_steps=0),
        **kwargs,
    )


def perturb_lora(module: GFlowDiffModule, scale: float = 0.05, seed: int = 0) -> None:
    """LoRA B starts at 0 (so the LoRA A gradients vanish at step 0); give it a value so every gradient is non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


# ---- DDPO: clipped surrogate and advantages ----------------------------------------------------------------------
def test_clipped_surrogate_equals_unclipped_at_ratio_one():
    advantages = torch.tensor([1.5, -0.5, 2.0])
    log_prob_old = torch.tensor([-3.0, 1.0, 0.2])
    log_prob = log_prob_old.clone().requires_grad_(True)
    loss = ppo_clip_loss(advantages, log_prob, log_prob_old, clip_range=0.2)
    # ρ = 1: both branches are −A, so the loss is −mean(A) = −(1.5 − 0.5 + 2)/3 = −1, and dL/dlogπ = −A·ρ/N = −A/3.
    assert loss.item() == pytest.approx(-1.0)
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -advantages / 3)


@pytest.mark.parametrize(
    ("advantage", "log_ratio", "zero_gradient"),
    [
        (1.0, math.log(1.5), True),  # A > 0, ρ above 1 + ε: the surrogate stops rewarding a larger ρ
        (1.0, math.log(0.5), False),  # A > 0, ρ below 1 − ε: the pessimistic (unclipped) branch still pushes ρ up
        (-1.0, math.log(0.5), True),  # A < 0, ρ below 1 − ε: no reward for pushing ρ further down
        (-1.0, math.log(1.5), False),  # A < 0, ρ above 1 + ε: the unclipped branch pushes ρ back down
        (1.0, math.log(1.1), False),  # inside the clip range: the ordinary importance-weighted gradient
    ],
)
def test_clipped_surrogate_gradient_outside_the_clip_range(advantage, log_ratio, zero_gradient):
    log_prob = torch.tensor([log_ratio], requires_grad=True)
    loss = ppo_clip_loss(torch.tensor([advantage]), log_prob, torch.zeros(1), clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, log_prob)
    if zero_gradient:
        assert grad.item() == 0
    else:  # −A·ρ: descending it moves log π in the direction of the advantage's sign
        assert grad.item() == pytest.approx(-advantage * math.exp(log_ratio))


def test_log_prob_mean_reduction_divides_by_the_element_count():
    assert reduce_log_prob(torch.tensor([64.0]), 64, "mean").item() == 1.0
    assert reduce_log_prob(torch.tensor([64.0]), 64, "sum").item() == 64.0


def test_per_prompt_advantages_use_prompt_history_or_the_batch():
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0])
    prompts = ["a", "a", "b", "b"]
    history = {"a": torch.tensor([1.0, 3.0, 0.0, 4.0]), "b": torch.tensor([10.0, 20.0])}
    advantages = per_prompt_advantages(rewards, prompts, history, min_count=3)
    # "a" has 4 ≥ 3 rewards: its own mean 2 and population std √((1+1+4+4)/4) = √2.5.
    a_std = math.sqrt(2.5)
    assert advantages[:2].tolist() == pytest.approx([(1 - 2) / a_std, (3 - 2) / a_std], rel=1e-5)
    # "b" has 2 < 3: the batch's mean 8.5 and population std √((56.25 + 30.25 + 2.25 + 132.25)/4) = √55.25.
    b_std = math.sqrt(55.25)
    assert advantages[2:].tolist() == pytest.approx([(10 - 8.5) / b_std, (20 - 8.5) / b_std], rel=1e-5)


def test_stat_tracker_keeps_the_last_rewards_and_round_trips():
    tracker = PromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "a", "b"], torch.tensor([1.0, 2.0, 5.0]))
    advantages = tracker.update(["a", "a"], torch.tensor([3.0, 4.0]))
    assert tracker.history["a"].tolist() == [2.0, 3.0, 4.0]  # the oldest reward (1) fell out of the buffer
    # mean 3, population std √(2/3): advantages ∓1/√(2/3).
    assert advantages.tolist() == pytest.approx([0.0, 1 / math.sqrt(2 / 3)], abs=1e-5)
    restored = PromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(tracker.state_dict())
    assert {k: v.tolist() for k, v in restored.history.items()} == {"a": [2.0, 3.0, 4.0], "b": [5.0]}


def test_ddpo_transitions_repeat_each_pass_and_carry_clipped_advantages():
    objective = DDPO(num_inner_epochs=2, timestep_fraction=0.5, adv_clip_max=0.5, per_prompt_stat_tracking=False)
    rollout = fake_rollout(batch_size=3, num_steps=4)
    transitions = objective.transitions(rollout, torch.Generator().manual_seed(0))
    assert len(transitions) == 2 * 3 * 2  # passes × trajectories × int(4 · 0.5)
    for half in (transitions.select(torch.arange(6)), transitions.select(torch.arange(6, 12))):
        pairs = sorted(zip(half.trajectory.tolist(), half.step.tolist(), strict=True))
        assert [p[0] for p in pairs] == [0, 0, 1, 1, 2, 2]  # each pass: every trajectory, two distinct steps
        assert len(set(pairs)) == 6
    assert transitions.advantages.abs().max() <= 0.5
    torch.testing.assert_close(transitions.log_prob_old, rollout.log_probs[transitions.trajectory, transitions.step])


# ---- ReFL / DRaFT: pathwise pieces -------------------------------------------------------------------------------
def test_reward_loss_and_refl_margin():
    rewards = torch.tensor([1.0, 3.0])
    assert reward_loss(rewards).item() == -2.0
    assert reward_loss(rewards, margin=2.0).item() == 0.5  # mean(ReLU(2 − 1), ReLU(2 − 3)) = (1 + 0)/2


def test_window_bounds():
    assert window_bounds(40, 0.75, 1.0) == (30, 40)  # ReFL's steps 30..39 of 40
    assert window_bounds(4, 0.75, 1.0) == (3, 4)
    assert window_bounds(4, 0.99, 1.0) == (3, 4)  # never empty


def test_the_ddpm_backward_sample_is_the_one_step_noising_kernel():
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    abar_t, abar_prev = torch.tensor([0.64, 0.64]), torch.tensor([0.8, 0.8])
    # ᾱ_t/ᾱ_prev = 0.8: √0.8·x + √0.2·z
    torch.testing.assert_close(backward_kernel_sample(x, abar_t, abar_prev, noise), 0.8**0.5 * x + 0.2**0.5 * noise)


def test_draft_k1_gradient_equals_autograd_through_one_step_by_hand(tiny_sd_path):
    module = tiny_module(tiny_sd_path, DRaFT(backprop_steps=1))
    perturb_lora(module)
    policy, reward = module.policy, module.reward
    rollout = sample_rollout(policy, PROMPTS, reward, TINY_SAMPLER, torch.Generator().manual_seed(1))
    chunk = module.objective.transitions(rollout, torch.Generator().manual_seed(2))
    params = policy.lora_parameters()
    output = module.objective.loss(chunk, module.context(torch.Generator().manual_seed(3)))
    grads = torch.autograd.grad(output.loss, params)

    # By hand: x_{T−1} from the rollout → one reparameterised DDPM step with the same noise → decode → −mean r.
    last = rollout.num_steps - 1
    x = rollout.latents[:, last]
    t, t_prev = rollout.timesteps[last].repeat(2), rollout.prev_timesteps[last].repeat(2)
    eps = policy.kernel_output(x, t, rollout.prompt_embeds, rollout.negative_embeds, TINY_SAMPLER.guidance_scale)
    abar_t, abar_prev = policy.alpha_bar(t), policy.alpha_bar(t_prev)
    std = ddim_std(abar_t, abar_prev, TINY_SAMPLER.eta)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_final = ddim_mean(x, eps, abar_t, abar_prev, std) + per_sample(std, x) * noise
    expected_loss = -reward(policy.decode(x_final), PROMPTS).mean()
    expected = torch.autograd.grad(expected_loss, params)

    torch.testing.assert_close(output.loss, expected_loss)
    assert any(g.abs().sum() > 0 for g in expected)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_draft_gradient_checkpointing_gives_the_same_gradient(tiny_sd_path):
    module = tiny_module(tiny_sd_path, DRaFT(backprop_steps=4))
    perturb_lora(module)
    rollout = sample_rollout(module.policy, PROMPTS, module.reward, TINY_SAMPLER, torch.Generator().manual_seed(1))
    params = module.policy.lora_parameters()
    results = []
    for checkpointing in (False, True):
        objective = DRaFT(backprop_steps=4, gradient_checkpointing=checkpointing)
        chunk = objective.transitions(rollout, torch.Generator().manual_seed(2))
        loss = objective.loss(chunk, module.context(torch.Generator().manual_seed(3))).loss
        results.append((loss, torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_refl_gradient_equals_one_x0_prediction_by_hand(tiny_sd_path):
    module = tiny_module(tiny_sd_path, ReFL(window_start=0.5, window_end=1.0))
    perturb_lora(module)
    policy = module.policy
    rollout = sample_rollout(policy, PROMPTS, module.reward, TINY_SAMPLER, torch.Generator().manual_seed(1))
    chunk = module.objective.transitions(rollout, torch.Generator().manual_seed(2))
    assert all(2 <= k < 4 for k in chunk.step.tolist())  # the window [0.5, 1) of 4 steps
    output = module.objective.loss(chunk, module.context(torch.Generator().manual_seed(3)))

    x, t = rollout.latents[torch.arange(2), chunk.step], rollout.timesteps[chunk.step]
    eps = policy.kernel_output(x, t, rollout.prompt_embeds, rollout.negative_embeds, TINY_SAMPLER.guidance_scale)
    abar = per_sample(policy.alpha_bar(t), x)
    x0_hat = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    expected = -module.reward(policy.decode(x0_hat), PROMPTS).mean()
    params = policy.lora_parameters()
    for got, want in zip(torch.autograd.grad(output.loss, params), torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(got, want)


# ---- DB / residual DB --------------------------------------------------------------------------------------------
def test_db_residual_is_zero_for_a_consistent_gaussian_flow():
    """A Gaussian chain where detailed balance holds exactly: x' ~ N(0, v'), P_B(x|x') = N(a·x', s²) (the DDPM
    kernel, a = √(ᾱ_t/ᾱ_prev), s² = 1 − a²), so x ~ N(0, v = a²v' + s²), and P_F(x'|x) is the exact posterior
    N(a·v'/v·x, v'·s²/v). With F = the marginal densities, F(x)·P_F(x'|x) = F(x')·P_B(x|x') element-wise, so the
    residual of the per-element mean log-terms vanishes."""
    generator = torch.Generator().manual_seed(0)
    x, x_next = torch.randn(5, 2, 3, 3, generator=generator), torch.randn(5, 2, 3, 3, generator=generator)
    abar_t, abar_prev = torch.full((5,), 0.5), torch.full((5,), 0.8)
    a2 = 0.5 / 0.8
    v_next = torch.full((5,), 1.7)
    v = a2 * v_next + (1 - a2)
    log_pb = backward_log_prob(x, x_next, abar_t, abar_prev)
    post_mean = per_sample(a2**0.5 * v_next / v, x) * x
    log_pf = reduced_gaussian_log_prob(x_next, post_mean, (v_next * (1 - a2) / v).sqrt())
    log_flow = reduced_gaussian_log_prob(x, torch.zeros_like(x), v.sqrt())
    log_flow_next = reduced_gaussian_log_prob(x_next, torch.zeros_like(x_next), v_next.sqrt())
    residual = db_residual(log_flow, log_pf, log_pb, log_flow_next)
    torch.testing.assert_close(residual, torch.zeros(5), atol=1e-5, rtol=0)
    # ... and a wrong flow breaks it.
    assert db_residual(log_flow + 0.1, log_pf, log_pb, log_flow_next).abs().min() > 0.05


def test_backward_log_prob_is_the_ddpm_noising_density():
    x, x_next = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    abar_t, abar_prev = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0.5, 0.7, 0.95])
    ratio = per_sample(abar_t / abar_prev, x)
    normal = torch.distributions.Normal(ratio.sqrt() * x_next, (1 - ratio).sqrt())
    expected = normal.log_prob(x).flatten(1).mean(dim=1)
    torch.testing.assert_close(backward_log_prob(x, x_next, abar_t, abar_prev), expected)
    # "sum" is the true log-density: the mean times the 2·4·4 = 32 elements.
    torch.testing.assert_close(backward_log_prob(x, x_next, abar_t, abar_prev, "sum"), 32 * expected)


def test_residual_db_residual_vanishes_when_policy_is_pretrained_and_flows_match(tiny_sd_path):
    objective = ResidualDB()
    module = tiny_module(tiny_sd_path, objective)
    policy = module.policy
    rollout = sample_rollout(policy, PROMPTS, module.reward, TINY_SAMPLER, torch.Generator().manual_seed(1))
    chunk = rollout.transitions(torch.tensor([0, 1, 0]), torch.tensor([0, 2, 3]))
    ctx = module.context(torch.Generator().manual_seed(2))

    def log_pf_and_prior() -> tuple[Tensor, Tensor]:
        abar_t, abar_prev = policy.alpha_bar(chunk.t), policy.alpha_bar(chunk.t_prev)
        std = ddim_std(abar_t, abar_prev, TINY_SAMPLER.eta)
        with torch.no_grad():
            eps = policy.kernel_output(chunk.x, chunk.t, chunk.prompt_embeds, chunk.negative_embeds, 2.0)
        log_pf = reduced_gaussian_log_prob(chunk.x_next, ddim_mean(chunk.x, eps, abar_t, abar_prev, std), std)
        return log_pf, objective.prior_log_prob(chunk, ctx, std, abar_t, abar_prev)

    # LoRA B = 0: the policy is the pretrained one, log P_F = log P_F^#, and equal flows give a zero residual.
    log_pf, log_prior = log_pf_and_prior()
    flow = torch.tensor([0.3, -1.2, 2.0])
    torch.testing.assert_close(db_residual(flow, log_pf, log_prior, flow), torch.zeros(3), atol=1e-6, rtol=0)
    # A different policy: zero exactly when the flow drop log F̃(x) − log F̃(x') equals −(log P_F − log P_F^#).
    perturb_lora(module)
    log_pf, log_prior = log_pf_and_prior()
    assert (log_pf - log_prior).abs().max() > 1e-4
    matched = flow - (log_pf - log_prior)
    torch.testing.assert_close(db_residual(matched, log_pf, log_prior, flow), torch.zeros(3), atol=1e-6, rtol=0)


# ---- every objective, end to end ---------------------------------------------------------------------------------
def all_objective_cases() -> list:
    """(id, factory) for every registered objective, with a few variants of the baselines' code paths."""
    cases = [
        pytest.param(lambda: ResidualNablaDB(timestep_fraction=0.5), id="ResidualNablaDB"),
        pytest.param(lambda: NablaDB(timestep_fraction=0.5), id="NablaDB"),
        pytest.param(lambda: DDPO(num_inner_epochs=2, timestep_fraction=0.5, clip_range=0.2), id="DDPO"),
        pytest.param(lambda: ReFL(), id="ReFL"),
        pytest.param(lambda: ReFL(reuse_rollout_states=False, margin=2.0), id="ReFL-resample-margin"),
        pytest.param(lambda: DRaFT(), id="DRaFT-1"),
        pytest.param(
            lambda: DRaFT(backprop_steps=3, gradient_checkpointing=True, reuse_rollout_states=False), id="DRaFT-3-ckpt"
        ),
        pytest.param(lambda: DRaFT(lv_samples=2), id="DRaFT-LV"),
        pytest.param(lambda: DB(timestep_fraction=0.5, trust_region_scale=1.0), id="DB"),
        pytest.param(lambda: ResidualDB(timestep_fraction=0.5), id="ResidualDB"),
    ]
    covered = {type(case.values[0]()) for case in cases}
    assert covered == set(concrete_objectives()), "add a case for every registered objective"
    return cases


@pytest.mark.parametrize("make_objective", all_objective_cases())
def test_objective_trains_lora_keeps_frozen_weights_and_round_trips(make_objective, tiny_sd_path, tmp_path):
    objective = make_objective()
    module = tiny_module(
        tiny_sd_path, objective, optimization=OptimizationConfig(train_batch_size=4, optimizer_steps_per_rollout=2)
    )
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if n in module.trainable_names}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if n not in module.trainable_names}
    assert any("lora_" in n for n in trainable) and frozen
    losses = []

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["objective/loss"]))

    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[RecordLoss()],
    )  # fmt: skip
    trainer.fit(module, PromptDataModule(train_prompts="animals", batch_size=2))

    # max_steps counts optimizer steps: one or two rollouts, depending on how many chunks the objective yields.
    assert trainer.global_step == 2 and losses and all(math.isfinite(v) for v in losses)
    params = dict(module.named_parameters())
    unchanged = [n for n, before in trainable.items() if torch.equal(before, params[n])]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not change, e.g. {unchanged[:3]}"
    moved = [n for n, before in frozen.items() if not torch.equal(before, params[n])]
    assert not moved, f"frozen tensors changed: {moved[:3]}"

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    fresh = tiny_module(tiny_sd_path, make_objective())
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    fresh.on_load_checkpoint(checkpoint)
    fresh_params = dict(fresh.named_parameters())
    for name in module.trainable_names:
        torch.testing.assert_close(fresh_params[name], params[name], rtol=0, atol=0)
    assert fresh.rollouts_done == module.rollouts_done == len(losses)
    if isinstance(objective, DDPO):  # the per-prompt reward statistics survive the checkpoint
        assert "objective._extra_state" in checkpoint["state_dict"]
        saved = module.objective.stat_tracker.history
        assert saved and {k: v.tolist() for k, v in fresh.objective.stat_tracker.history.items()} == {
            k: v.tolist() for k, v in saved.items()
        }


class NonDifferentiableReward(Reward):
    """A reward without a meaningful image gradient (e.g. a classifier behind a threshold)."""

    differentiable = False

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (images.mean(dim=(1, 2, 3)) > 0.5).float()


@pytest.mark.parametrize("objective", [ReFL(), DRaFT(), DRaFT(lv_samples=2), ResidualNablaDB(), NablaDB()])
def test_gradient_objectives_reject_a_non_differentiable_reward(objective):
    with pytest.raises(ValueError, match=f"--model.objective {type(objective).__name__} needs the reward's gradient"):
        GFlowDiffModule(objective=objective, reward=NonDifferentiableReward(), pretrained_model="/nonexistent")


@pytest.mark.parametrize("objective", [DDPO(), DB(), ResidualDB()])
def test_gradient_free_objectives_accept_a_non_differentiable_reward(objective):
    objective.check_compatible(NonDifferentiableReward())


@pytest.mark.parametrize(
    ("build", "option"),
    [
        (lambda: DDPO(clip_range=0), "clip_range"),
        (lambda: DDPO(num_inner_epochs=0), "num_inner_epochs"),
        (lambda: DDPO(stat_min_count=64, stat_buffer_size=32), "stat_min_count"),
        (lambda: ReFL(window_start=0.9, window_end=0.5), "window_start"),
        (lambda: DRaFT(backprop_steps=0), "backprop_steps"),
        (lambda: DRaFT(lv_samples=2, backprop_steps=2), "lv_samples"),
        (lambda: DB(reward_scale=-1), "reward_scale"),
        (lambda: ResidualDB(timestep_fraction=0), "timestep_fraction"),
    ],
)
def test_bad_options_name_the_flag(build, option):
    with pytest.raises(ValueError, match=f"--model.objective.{option}"):
        build()


def test_draft_rejects_more_backprop_steps_than_sampler_steps():
    with pytest.raises(ValueError, match="--model.objective.backprop_steps"):
        DRaFT(backprop_steps=5).transitions(fake_rollout(batch_size=2, num_steps=4), torch.Generator())


# ---- CLI registration ---------------------------------------------------------------------------------------------
def test_fit_help_lists_every_objective(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    missing = [cls.__name__ for cls in concrete_objectives() if cls.__name__ not in out]
    assert not missing, f"not in `gflowdiff fit --help`: {missing}"


@pytest.mark.parametrize("cls", concrete_objectives(), ids=lambda c: c.__name__)
def test_objective_resolves_by_short_name(cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.objective", cls.__name__, "--model.reward", "DigitClassifierReward", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = re.search(r"objective:\n\s+class_path: (\S+)\n", capsys.readouterr().out)
    assert printed, "no model.objective.class_path in the printed config"
    module_name, _, class_name = printed.group(1).rpartition(".")
    assert getattr(importlib.import_module(module_name), class_name) is cls


BASELINE_CONFIGS = ["ddpo", "refl", "draft", "draft_lv", "db", "residual_db"]


@pytest.mark.parametrize("name", BASELINE_CONFIGS)
def test_digits_config_trains_on_the_tiny_pipeline(name, tiny_sd_path, tmp_path, monkeypatch):
    """Each baseline's digits config, through the CLI, with the tiny SD pipeline swapped in for the digits model."""
    monkeypatch.chdir(tmp_path)
    cli = main([
        "fit", "--config", str(REPO / "configs" / "digits" / f"{name}.yaml"),
        "--model.pretrained_model", str(tiny_sd_path),
        "--model.sampler.num_inference_steps", "4",
        "--data.batch_size", "2",
        "--trainer.max_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert cli.trainer.global_step == 1
    assert math.isfinite(float(cli.trainer.callback_metrics["objective/loss"]))


def test_public_objectives_are_exported():
    defined = concrete_objectives()
    assert {"DB", "DDPO", "DRaFT", "NablaDB", "ReFL", "ResidualDB", "ResidualNablaDB"} <= {c.__name__ for c in defined}
    for cls in defined:
        assert getattr(objectives, cls.__name__, None) is cls, f"{cls.__module__}.{cls.__name__} is not exported"
        assert cls.__name__ in objectives.__all__


def test_the_package_walk_sees_a_module_nothing_imports(tmp_path, monkeypatch):
    """The weakness of ``__subclasses__()``: a plugin module missing from ``__init__`` is never imported."""
    package = tmp_path / "walk_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "hidden.py").write_text("from gflowdiff.objectives import DB\n\n\nclass HiddenDB(DB):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("walk_probe")
    assert "HiddenDB" not in {c.__name__ for c in DB.__subclasses__()}
    assert [c.__name__ for c in concrete_classes_defined_in(probe, Objective)] == ["HiddenDB"]


# ---- helpers --------------------------------------------------------------------------------------------------------
def fake_rollout(batch_size: int, num_steps: int):
    """A Rollout with random tensors of the right shapes (for index bookkeeping; no model)."""
    from gflowdiff.diffusion.conditioning import Conditioning
    from gflowdiff.diffusion.types import Rollout

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch_size, num_steps + 1, 1, 2, 2, generator=generator)
    timesteps = torch.arange(num_steps - 1, -1, -1) * 10 + 1
    return Rollout(
        latents=latents,
        timesteps=timesteps,
        prev_timesteps=timesteps - 10,
        noise_preds=torch.randn(batch_size, num_steps, 1, 2, 2, generator=generator),
        log_probs=torch.randn(batch_size, num_steps, generator=generator),
        prompt_embeds=Conditioning(torch.randn(batch_size, 3, 4, generator=generator)),
        negative_embeds=Conditioning(torch.randn(batch_size, 3, 4, generator=generator)),
        prompts=[f"p{i % 2}" for i in range(batch_size)],
        images=torch.rand(batch_size, 1, 2, 2, generator=generator),
        rewards=torch.randn(batch_size, generator=generator),
    )
