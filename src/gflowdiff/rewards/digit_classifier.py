"""Log-probability that a digit belongs to a target set of classes, under the embedded digit classifier."""

from __future__ import annotations

import torch
from torch import Tensor

from gflowdiff.rewards.base import Reward
from gflowdiff.zoo.digits import CLASSIFIER_PATH, load_classifier


class DigitClassifierReward(Reward):
    """r(x) = log Σ_{c ∈ S} p(c | x) for the embedded digits model.

    With β = 1 the residual ∇-DB target p_pretrained(x)·p(S|x) is the pretrained model conditioned on "the digit is
    in S": the digits of S, in their pretrained proportions. That makes the target known, which the evaluation uses.

    Args:
        target_classes: the set S of rewarded digits.
        weights: path to the classifier's safetensors; default: the packaged one.
    """

    upper_bound = 0.0  # a log-probability

    def __init__(self, target_classes: list[int] = [0, 2, 4, 6, 8], weights: str | None = None):  # noqa: B006
        super().__init__()
        if not target_classes or any(not 0 <= c <= 9 for c in target_classes):
            raise ValueError("--model.reward.target_classes must be a non-empty list of digits 0..9")
        self.classifier = load_classifier(weights or CLASSIFIER_PATH)
        self.register_buffer("target_mask", torch.zeros(10, dtype=torch.bool), persistent=False)
        self.target_mask[list(target_classes)] = True
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        log_probs = self.classifier(images).log_softmax(dim=-1)
        return log_probs[:, self.target_mask].logsumexp(dim=-1)

    @torch.no_grad()
    def predict_classes(self, images: Tensor) -> Tensor:
        return self.classifier(images.float()).argmax(dim=-1)
