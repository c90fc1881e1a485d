"""Per sampler step: how far a fine-tuned policy tilts, against the exact residual flow score it should follow.

For states x_j of the fine-tuned policy's own trajectories, at a few sampler steps j, it prints (norms per state,
averaged):
- the exact flow score ∇_x log F̃(x_j), estimated from ``--continuations`` pretrained continuations of each state:
  the pathwise estimates a_j (objectives/gradient_db/pathwise_flow.py) of the continuations, weighted by R(x_T)^β / Σ
  R^β (the target's paths from x_j are the pretrained ones reweighted by R^β);
- the policy's tilt (μ_θ(x_j) − μ_#(x_j))/σ_j², which at the optimum equals the flow score at x_{j+1} (one step on);
- the learned g_φ(x_j) and the forward-looking guess β·γ_j·∇_x r(D(x̂0_θ(x_j))), the two parts of the flow score the
  objective parameterises (zero where the objective has none);
- the cosine between the policy's tilt and the exact flow score at x_j;
- the share of the final even/odd outcome decided by x_j: Var_j(E[even | x_j]) / Var(even) over the states.

Usage: python scripts/diagnose_flow.py CHECKPOINT [--steps 2 4 6 8 12 16] [--states 32] [--continuations 64]
"""

from __future__ import annotations

import argparse

import torch

from gflowdiff.diffusion.math import ddim_mean, ddim_std, per_sample, predicted_x0
from gflowdiff.diffusion.sampling import sample_rollout
from gflowdiff.diffusion.types import Rollout
from gflowdiff.objectives.gradient_db.math import guess_weight
from gflowdiff.objectives.gradient_db.pathwise_flow import pathwise_flow_scores
from gflowdiff.training.loading import load_trained_module


def norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


@torch.no_grad()
def continue_from(module, x: torch.Tensor, step: int, generator: torch.Generator) -> Rollout:
    """Pretrained trajectories that start at x (before sampler step ``step``): a Rollout over steps step..T−1."""
    policy, sampler = module.policy, module.sampler
    timesteps = policy.inference_timesteps(sampler.num_inference_steps)[step:]
    from gflowdiff.diffusion.math import previous_timesteps

    prev = previous_timesteps(timesteps, policy.num_train_timesteps, sampler.num_inference_steps)
    prompts = ["a handwritten digit"] * len(x)
    embeds, negative = policy.encode_prompts(prompts), policy.encode_prompts([""] * len(x))
    latents = [x]
    with policy.reference():
        for t, t_prev in zip(timesteps, prev, strict=True):
            tb, pb = t.repeat(len(x)), t_prev.repeat(len(x))
            eps = policy.kernel_output(x, tb, embeds, negative, sampler.guidance_scale)
            abar_t, abar_prev = policy.alpha_bar(tb), policy.alpha_bar(pb)
            std = ddim_std(abar_t, abar_prev, sampler.eta)
            noise = torch.randn(x.shape, generator=generator)
            x = ddim_mean(x, eps, abar_t, abar_prev, std) + per_sample(std, x) * noise
            latents.append(x)
    images = policy.decode(x)
    empty = torch.zeros(len(x), 0)
    return Rollout(torch.stack(latents, 1), timesteps, prev, empty, empty, embeds, negative, prompts, images,
                   module.reward(images, prompts))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16])
    parser.add_argument("--states", type=int, default=32)
    parser.add_argument("--continuations", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    module = load_trained_module(args.checkpoint)
    policy, sampler, objective = module.policy, module.sampler, module.objective
    beta = float(objective.target_beta or 1.0)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = ["a handwritten digit"] * args.states
    rollout = sample_rollout(policy, prompts, module.reward, sampler, generator)
    print(f"checkpoint {args.checkpoint}: {args.states} states per step, {args.continuations} continuations each")
    print("step  ᾱ_t    decided  exact flow  policy tilt  g_φ     guess   cos(tilt, exact)")
    for step in args.steps:
        x = rollout.latents[:, step]
        t = rollout.timesteps[step].repeat(args.states)
        t_prev = rollout.prev_timesteps[step].repeat(args.states)
        abar_t, abar_prev = policy.alpha_bar(t), policy.alpha_bar(t_prev)
        std = ddim_std(abar_t, abar_prev, sampler.eta)
        exact, p_even = [], []
        for i in range(args.states):  # the exact flow score at x_i from its pretrained continuations
            start = x[i : i + 1].expand(args.continuations, *x.shape[1:]).contiguous()
            continuation = continue_from(module, start, step, generator)
            scores = pathwise_flow_scores(policy, module.reward, sampler, continuation, beta)[0][:, 0]
            weights = torch.softmax(beta * continuation.rewards.double(), 0).float()
            exact.append((per_sample(weights, scores) * scores).sum(0))
            p_even.append(continuation.rewards.exp().mean())
        exact, p_even = torch.stack(exact), torch.stack(p_even)
        with torch.no_grad():
            embeds, negative = rollout.prompt_embeds, rollout.negative_embeds
            eps = policy.kernel_output(x, t, embeds, negative, sampler.guidance_scale)
            with policy.reference():
                eps_ref = policy.kernel_output(x, t, embeds, negative, sampler.guidance_scale)
            tilt = (ddim_mean(x, eps, abar_t, abar_prev, std) - ddim_mean(x, eps_ref, abar_t, abar_prev, std)) / (
                per_sample(std, x) ** 2
            )
            g = module.flow_head(x, t, embeds.embeds) if module.flow_head is not None else torch.zeros_like(x)
        weighting = getattr(objective, "reward_guess_weighting", "off")
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            eps_leaf = policy.kernel_output(leaf, t, embeds, negative, sampler.guidance_scale)
            x0 = predicted_x0(leaf, eps_leaf, abar_t)
            (guess,) = torch.autograd.grad(module.reward(policy.decode(x0), prompts).sum(), leaf)
        guess = per_sample(beta * guess_weight(abar_t, weighting), guess) * guess
        even = (rollout.rewards.exp() > 0.5).double()
        decided = float(p_even.double().var() / even.var().clamp(min=1e-9))
        cosine = torch.nn.functional.cosine_similarity(tilt.flatten(1), exact.flatten(1), dim=1).mean()
        print(f"{step:>4}  {float(abar_t[0]):.3f}  {decided:>7.2f}  {float(norm(exact).mean()):>10.3f}  "
              f"{float(norm(tilt).mean()):>11.3f}  {float(norm(g).mean()):.3f}  {float(norm(guess).mean()):.3f}  "
              f"{float(cosine):>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
