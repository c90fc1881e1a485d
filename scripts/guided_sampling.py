"""How far the value-fitted flow head alone takes the pretrained sampler: guidance with ∇ log F̃_φ, no policy training.

The ∇-DB forward condition trains the policy's mean to μ_#(x) + σ²·∇_{x'} log F̃(x') (x' one step on). This script
fits F̃_φ exactly as ``flow_head_fit: value`` does before training (the objective's own ``warm_up``) and then samples
with that shift applied directly (classifier guidance with the fitted head; docs/why-residual-nabla-db-stalled.md):
- ``at-mean``: x' ~ N(μ_# + σ²·∇ log F̃_φ(μ_#), σ²), the first-order tilt of the Gaussian step;
- ``tilted``: the exact tilted kernel P_F^#(x'|x)·F̃_φ(x')/Z(x), by resampling ``--candidates`` pretrained candidates
  of each step by F̃_φ: what any policy satisfying the forward condition with this head samples, Gaussian or not;
- ``fixed-point``: the mean μ solving μ = μ_# + σ²·E_{x'~N(μ, σ²)}[∇ log F̃_φ(x')] (``--draws`` draws, a few
  iterations), which is what the forward condition's regression converges to for a Gaussian policy of fixed σ.
The last step uses the exact terminal flow score β·∇r. If these samples already miss the target, the limit is the
fitted head (or the Gaussian steps), not the policy's training; the samples are scored like ``make demo``'s.

Usage: python scripts/guided_sampling.py [--trajectories 8192] [--epochs 6] [--steps 20] [--samples 512]
       [--modes none at-mean tilted fixed-point] [--model embedded:digits_flow --eta 0.7]
"""

from __future__ import annotations

import argparse

import torch

from gflowdiff.diffusion.sampling import SamplerConfig, initial_noise
from gflowdiff.evaluation.metrics.target_fidelity import target_fidelity
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.rewards import DigitClassifierReward
from gflowdiff.training.module import GFlowDiffModule


def flow_score(module, x: torch.Tensor, t_next: torch.Tensor, embeds: torch.Tensor, prompts: list[str], last: bool,
               denoise=None):  # fmt: skip
    """∇ log F̃ at states x of time t_next: the fitted head's, or β·∇r(x) after the last step. ``denoise``: x ↦ x̂0_#(x)
    for a head that reads it (``value_head_input: state_and_denoised``)."""
    if not last:
        return module.flow_head(x, t_next, embeds, **({} if denoise is None else {"denoise": denoise}))
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(module.reward(module.policy.decode(leaf), prompts).sum(), leaf)
    return gradient.detach()


def flow_value(module, x: torch.Tensor, t_next: torch.Tensor, embeds: torch.Tensor, prompts: list[str], last: bool,
               denoise=None):  # fmt: skip
    """log F̃ at states x of time t_next (up to a constant): the fitted head's log σ(logit), or β·r(x) at the end."""
    if not last:
        denoised = None if denoise is None else denoise(x)
        return torch.nn.functional.logsigmoid(module.flow_head.logit(x, t_next, embeds, denoised))
    return module.reward(module.policy.decode(x), prompts)


def tilted_step(module, step, base, t_next, embeds, prompts, last, denoise, draws: int, generator) -> torch.Tensor:
    """One draw of P_F^#(x'|x)·F̃_φ(x')/Z(x) per state: ``draws`` pretrained candidates, one kept with probability
    ∝ F̃_φ (sampling-importance-resampling; exact as draws → ∞). What a policy with any transition shape, not only
    a Gaussian one, would sample under the forward condition with this head."""
    candidates = torch.stack([step.sample(base, torch.randn(base.shape, generator=generator)) for _ in range(draws)])
    log_weights = torch.stack([flow_value(module, c, t_next, embeds, prompts, last, denoise) for c in candidates], 1)
    choice = torch.multinomial(torch.softmax(log_weights.double(), 1), 1, generator=generator).squeeze(1)
    return candidates[choice, torch.arange(base.shape[0])]


@torch.no_grad()
def guided_samples(module, count: int, mode: str, draws: int, iterations: int, seed: int) -> tuple:
    policy, sampler = module.policy, module.sampler
    generator = torch.Generator().manual_seed(seed)
    context = module.context(generator)
    prompts = ["a handwritten digit"] * count
    embeds, negative = policy.encode_prompts(prompts), policy.unconditional(count)
    timesteps, prev_timesteps = policy.step_times(sampler.num_inference_steps)
    x = initial_noise(policy, count, generator)
    with policy.reference():
        for j, (t, t_prev) in enumerate(zip(timesteps, prev_timesteps, strict=True)):
            tb, pb, last = t.repeat(count), t_prev.repeat(count), j == len(timesteps) - 1
            eps = policy.kernel_output(x, tb, embeds, negative, sampler.guidance_scale)
            step = policy.transition_step(tb, pb, sampler.eta)
            base = step.mean(x, eps)
            denoise = module.objective.pretrained_denoiser(context, pb, embeds, negative, step, at_next=True)
            variance = step.std.view(-1, *[1] * (x.dim() - 1)) ** 2
            if mode == "none":
                mean = base
            elif mode == "tilted":  # the exact tilted kernel P_F^#(x'|x)·F̃_φ(x') / Z(x), by resampling candidates
                x = tilted_step(module, step, base, pb, embeds.embeds, prompts, last, denoise, draws, generator)
                continue
            elif mode == "at-mean":
                mean = base + variance * flow_score(module, base, pb, embeds.embeds, prompts, last, denoise)
            else:
                mean = base.clone()
                for _ in range(iterations):
                    scores = torch.stack([
                        flow_score(module, mean + variance.sqrt() * torch.randn(x.shape, generator=generator), pb,
                                   embeds.embeds, prompts, last, denoise)
                        for _ in range(draws)
                    ]).mean(0)  # fmt: skip
                    mean = base + variance * scores
            x = step.sample(mean, torch.randn(x.shape, generator=generator))
        images = policy.decode(x)
    return module.reward(images, prompts), module.reward.predict_classes(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--target-samples", type=int, default=4096)
    parser.add_argument("--modes", nargs="+", default=["none", "at-mean", "fixed-point"])
    parser.add_argument("--draws", type=int, default=4, help="noise draws per fixed-point iteration")
    parser.add_argument("--candidates", type=int, default=64, help="pretrained candidates per tilted step")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-input", default="state", choices=["state", "state_and_denoised"])
    parser.add_argument("--model", default="embedded:digits", help="embedded:digits_flow: the flow model's SDE")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM η, or the flow SDE's noise level (0.7)")
    args = parser.parse_args()

    objective = ResidualNablaDB(
        flow_head_fit="value",
        reward_guess_weighting="off",
        reverse_loss_scale=0.0,
        value_warmup_trajectories=args.trajectories,
        value_warmup_epochs=args.epochs,
        value_head_input=args.head_input,
    )
    reward = DigitClassifierReward(target_classes=[0, 2, 4, 6, 8])
    sampler = SamplerConfig(args.steps, 1.0, args.eta)
    module = GFlowDiffModule(objective, reward, pretrained_model=args.model, sampler=sampler, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    metrics = objective.warm_up(module.context(generator), ["a handwritten digit"])
    print(f"value head ({args.head_input}) fitted on {args.trajectories} trajectories × {args.epochs} epochs, "
          f"T = {args.steps}: {metrics}")  # fmt: skip

    pool_rewards, pool_classes, accepted = [], [], 0.0
    while accepted < args.target_samples:  # exact target samples by rejection from pretrained draws
        rewards, classes = guided_samples(module, 512, "none", 0, 0, 10_000 + len(pool_rewards))
        pool_rewards.append(rewards), pool_classes.append(classes)
        accepted += float(rewards.double().exp().sum())
    pool_rewards, pool_classes = torch.cat(pool_rewards), torch.cat(pool_classes)
    for mode in args.modes:
        draws = args.candidates if mode == "tilted" else args.draws
        rewards, classes = guided_samples(module, args.samples, mode, draws, args.iterations, 1)
        result = target_fidelity(classes, pool_classes, pool_rewards, 1.0, 0.0, seed=0)
        histogram = torch.bincount(classes, minlength=10).float() / len(classes)
        even = float(histogram[0::2].sum())
        print(
            f"{mode:>11}: TV {result['tv']:.3f} (floor {result['tv_floor']:.3f}) p(even) {even:.3f} "
            f"shares 0 2 4 6 8: {' '.join(f'{p:.3f}' for p in histogram[0::2].tolist())}",
            flush=True,
        )
    target = result["target_histogram"]
    print(
        f"     target: p(even) {float(sum(target[0::2])):.3f} shares 0 2 4 6 8: "
        f"{' '.join(f'{p:.3f}' for p in target[0::2])}"
    )


if __name__ == "__main__":
    main()
