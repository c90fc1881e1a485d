"""LoRA on some rows of a batch only: the pretrained and the fine-tuned UNet in one call.

The pretrained policy P_F^# is the UNet with its LoRA off; the policy P_F is the same UNet with it on. Within
:meth:`LoraRowMask.only`, every LoRA update s·B(A(x)) is multiplied row by row by a 0/1 mask, so one batched UNet call
computes P_F^# on the masked-out rows and P_F on the others. Rows never interact in the UNet (its norms and attention
are per sample), so each row's output and input gradient are those of a call on that row alone, and the masked-out
rows give the LoRA parameters exactly zero gradient. Larger calls use a GPU better: at SD-1.5 size, a UNet forward +
input gradient on twice the batch costs much less than two calls (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class LoraRowMask:
    """A per-row switch for the LoRA of ``unet``: a forward hook on every LoRA ``B`` layer, registered once.

    Outside :meth:`only` the hooks return the output unchanged. The hooks stay the same objects for the module's
    life, so ``torch.compile`` traces them once; the mask reaches the graph as an input, not as a new hook.
    """

    def __init__(self, unet: nn.Module):
        from peft.tuners.lora import LoraLayer

        self.rows_on: Tensor | None = None
        for layer in unet.modules():
            if isinstance(layer, LoraLayer):
                for lora_b in layer.lora_B.values():
                    lora_b.register_forward_hook(self._mask_update)

    def _mask_update(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """B(A(x)) of the rows with the LoRA off → 0 (an exact zero: the layer adds s·0 to its base output)."""
        if self.rows_on is None:
            return None
        if output.shape[0] != self.rows_on.shape[0]:
            raise ValueError(
                f"LoraRowMask: a mask of {self.rows_on.shape[0]} rows for a LoRA layer output of {output.shape[0]} rows"
            )
        return output * self.rows_on.to(output.dtype).reshape(-1, *([1] * (output.dim() - 1)))  # (N, 1, …)

    @contextmanager
    def only(self, rows_on: Tensor) -> Iterator[None]:
        """Within the context, the LoRA acts only on the batch rows where ``rows_on`` ((N,) bool) is True."""
        self.rows_on = rows_on
        try:
            yield
        finally:
            self.rows_on = None


def all_rows(rows_on: Tensor | None) -> bool:
    """True when no mask is needed: no mask, or every row on."""
    return rows_on is None or bool(torch.all(rows_on))
