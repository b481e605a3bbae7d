"""Lossy codecs for LoRA factors on the wire, and the client's error feedback.

- ``fp16``: half precision (2 bytes per value).
- ``int8``: one byte per value plus one float32 absmax scale per rank component (a row of A, a
  column of B; a row of a dense 2-D extra such as a classifier head; one scale for any other
  tensor): ``q = round(x / s)``, ``s = max|x| / 127``, so ``|x - s q| <= s / 2`` everywhere.

What a client compresses is its update, the delta of its factors from the adapter it received
(small next to the factors themselves, so the same relative error costs far less). Error
feedback keeps what compression lost and adds it to the next round's delta before compressing:
the sum over rounds of what was sent then differs from the sum of the true deltas by one
round's residual only, instead of an error that grows with the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CODECS = ("none", "fp16", "int8")


@dataclass
class Packed:
    """A compressed tensor: ``values`` (float32, float16 or int8) and, for int8, ``scale``
    (float32, broadcastable to ``values``)."""

    values: Tensor
    scale: Tensor | None = None


def pack(tensor: Tensor, codec: str, rank_dim: int | None) -> Packed:
    """Compress ``tensor`` whose rank components run along ``rank_dim`` (0 for A, 1 for B; None:
    one int8 scale for the whole tensor)."""
    if codec == "none":
        return Packed(tensor.float())
    if codec == "fp16":
        return Packed(tensor.to(torch.float16))
    if codec == "int8":
        other = tuple(d for d in range(tensor.ndim) if d != rank_dim)
        absmax = tensor.float().abs().amax(dim=other, keepdim=True)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        return Packed(torch.round(tensor.float() / scale).to(torch.int8), scale)
    raise ValueError(f"unknown compression {codec!r}; choose one of {', '.join(CODECS)}")


def unpack(packed: Packed) -> Tensor:
    """The float32 tensor ``packed`` stands for."""
    values = packed.values.float()
    return values if packed.scale is None else values * packed.scale


class ErrorFeedback:
    """A client's residuals: what compression lost, per tensor, added back next round."""

    def __init__(self, residuals: dict[str, Tensor] | None = None) -> None:
        self.residuals: dict[str, Tensor] = dict(residuals or {})

    def pack(self, name: str, delta: Tensor, codec: str, rank_dim: int | None) -> Packed:
        """Compress ``delta`` plus the residual kept for ``name``; keep the new residual."""
        target = delta.float()
        residual = self.residuals.get(name)
        if residual is not None and residual.shape == target.shape:
            target = target + residual
        packed = pack(target, codec, rank_dim)
        self.residuals[name] = target - unpack(packed)
        return packed
