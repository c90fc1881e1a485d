"""Pure math of the gradient-informed detailed-balance objectives (docs/method.md §2.2–2.7): tensors in, tensors out.

Notation: a transition x → x' of the sampler; P_F the policy, the prior P_B (∇-DB) or ρ·P_F^# (residual ∇-DB);
F the flow, parameterised forward-looking as g_φ + β·γ_t·∇r(D(x̂0_θ)) (docs/method.md §2.4).

Paper: Liu et al., "Efficient Diversity-Preserving Diffusion Alignment via Gradient-Informed GFlowNets", ICLR 2025,
arXiv 2412.07775: the ∇-DB conditions are its Eq. 7, the residual target p^#·R^β its Eq. 10 and the forward-looking
("predicted reward") flow its Eq. 15 in the ICLR submission. These equation numbers come from secondary sources and
are not checked against the PDF (docs/method.md §0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

GuessWeighting = Literal["alpha_bar", "sqrt_alpha_bar", "one", "off"]
TransitionWeighting = Literal["none", "variance"]


def guess_weight(abar: Tensor, mode: GuessWeighting) -> Tensor:
    """γ_t of the forward-looking reward guess (the paper's γ_t, arXiv 2412.07775; docs/method.md §2.4).
    ``alpha_bar`` is the reference default ('squared': (√ᾱ_t)² = ᾱ_t), ``sqrt_alpha_bar`` its other mode; both
    switch the one-step guess off at high noise, where x̂0 is unreliable."""
    if mode == "alpha_bar":
        return abar
    if mode == "sqrt_alpha_bar":
        return abar.sqrt()
    if mode == "one":
        return torch.ones_like(abar)
    return torch.zeros_like(abar)


def nabla_db_residuals(
    policy_fwd: Tensor,
    prior_fwd: Tensor,
    flow_next: Tensor,
    policy_rev: Tensor | None,
    prior_rev: Tensor | None,
    flow_cur: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Residuals of the forward and reverse ∇-DB conditions (arXiv 2412.07775, Eq. 7 and its residual form;
    docs/method.md §2.2–2.3); zero when detailed balance holds.

    Notation: ``policy_*`` → ∇ log P_F(x'|x); ``prior_*`` → ∇ log P_B(x|x') or ρ·∇ log P_F^#(x'|x);
    ``flow_next`` → ∇_{x'} log F(x') (β·∇ log R(x_T) on terminal transitions); ``flow_cur`` → ∇_x log F(x).
    """
    forward = policy_fwd - prior_fwd - flow_next
    reverse = None if policy_rev is None else policy_rev - prior_rev + flow_cur
    return forward, reverse


def transition_weight(std: Tensor, mode: TransitionWeighting) -> Tensor:
    """Per-transition scale of the residuals (gflowdiff's option; neither the paper nor the reference code has it).
    ``none`` is the reference. ``variance`` multiplies each residual by σ_t²,
    which turns a score residual into a mean-shift residual: (μ_θ − μ_#) − σ_t²·∇log F̃. Score residuals grow like
    1/σ_t², so without it the last steps dominate the loss ~10³-fold (docs/method.md §2.7) and Adam's update follows
    them alone; steps that decide coarse content (a digit's class) then barely train. A positive per-transition
    weight leaves the optimum (every residual zero) and so the target distribution unchanged. Shape (N,)."""
    return std**2 if mode == "variance" else torch.ones_like(std)


def shared_state_order(trajectory: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """Where two transitions of a batch meet at one state (x' of row i is x of row k: same trajectory, next step),
    the reward guess at that state is needed twice (row i's x' guess, row k's x guess) and is computed once.
    Returns (order, source): ``select(order)`` puts the S rows whose x ends another row's transition first, and in
    that order ``source[k]`` (k < S, length S) is a row whose x' is row k's x."""
    ends_at = (trajectory[:, None] == trajectory[None, :]) & (step[:, None] + 1 == step[None, :])  # [i, k]: x'_i = x_k
    is_shared = ends_at.any(dim=0)
    order = torch.cat([is_shared.nonzero(), (~is_shared).nonzero()]).squeeze(1)
    ends_at = ends_at[order][:, order]
    source = ends_at[:, : int(is_shared.sum())].int().argmax(dim=0)  # the first row ending at each shared state
    return order, source


def mean_square(x: Tensor) -> Tensor:
    """Mean over all elements, as the reference does (not a sum: the scale is independent of the image size;
    docs/method.md §2.6)."""
    return x.pow(2).mean()
