"""What the denoiser is conditioned on, one row per prompt: the text embeddings it cross-attends to, and for the
model families that have them a pooled embedding and extra per-row conditions (SDXL's time ids). Stored in rollouts and
transitions, indexed and concatenated by rows like a tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(eq=False)  # tensors: no element-wise ==
class Conditioning:
    """What the denoiser is conditioned on, one row per prompt.

    Args:
        embeds: the text embeddings the denoiser cross-attends to (B, L, D).
        pooled: a pooled text embedding per prompt (B, P): SDXL's ``text_embeds``, SD3's ``pooled_projections``.
        extra: other per-row conditioning tensors, each (B, ...): SDXL's ``time_ids`` (B, 6).
    """

    embeds: Tensor
    pooled: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = self.embeds.shape[0]
        for name, value in self.tensors().items():
            if value.shape[0] != rows:
                raise ValueError(f"Conditioning.{name} has {value.shape[0]} rows, embeds has {rows}")

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by name (``pooled`` and the ``extra`` ones only where present)."""
        found = {"embeds": self.embeds} | ({"pooled": self.pooled} if self.pooled is not None else {})
        return found | {f"extra[{name!r}]": value for name, value in self.extra.items()}

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, rows: int | slice | Tensor | Sequence[int]) -> Conditioning:
        """The rows ``rows`` (an int keeps its row dimension: ``cond[0]`` has one row)."""
        rows = slice(rows, rows + 1 or None) if isinstance(rows, int) else rows
        return self.map(lambda value: value[rows])

    def map(self, function) -> Conditioning:
        """The same conditioning with ``function`` applied to every tensor."""
        pooled = None if self.pooled is None else function(self.pooled)
        return Conditioning(function(self.embeds), pooled, {name: function(v) for name, v in self.extra.items()})

    def to(self, *args, **kwargs) -> Conditioning:
        return self.map(lambda value: value.to(*args, **kwargs))

    def repeat(self, times: int) -> Conditioning:
        """Each row ``times`` times in a row-block order: [c_0..c_{B-1}; c_0..c_{B-1}; ...] (as ``cat([c] * n)``)."""
        return Conditioning.cat([self] * times)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of ``parts`` one after another (e.g. the CFG batch [uncond; cond]); all must have the same
        fields."""
        first = parts[0]
        if any((p.pooled is None) != (first.pooled is None) or p.extra.keys() != first.extra.keys() for p in parts):
            raise ValueError("Conditioning.cat: the parts have different fields (pooled / extra)")
        pooled = None if first.pooled is None else torch.cat([p.pooled for p in parts])
        extra = {name: torch.cat([p.extra[name] for p in parts]) for name in first.extra}
        return Conditioning(torch.cat([p.embeds for p in parts]), pooled, extra)

    def repeat_interleave(self, times: int) -> Conditioning:
        """Each row ``times`` times, next to itself: [c_0, c_0, ..., c_1, c_1, ...]."""
        return self.map(lambda value: value.repeat_interleave(times, dim=0))

    def to_state(self) -> dict:
        """Plain tensors for a checkpoint (``torch.load(weights_only=True)`` reads no custom classes)."""
        return {"embeds": self.embeds, "pooled": self.pooled, "extra": dict(self.extra)}

    @classmethod
    def from_state(cls, state: dict) -> Conditioning:
        return cls(state["embeds"], state.get("pooled"), dict(state.get("extra") or {}))
