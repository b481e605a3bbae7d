"""What one client contributes to the secure sum, as one flat vector, and the sum back as tensors.

The layout comes from the global state both ends hold: per adapted module A (when the plan sends
A) and B, then the dense extras, named as the linear strategies name them (``A/<module>``,
``B/<module>``, ``extra/<name>``), plus one trailing coordinate for the training loss, so that
only the example-weighted mean loss reaches the server.

Two ways to weight (``docs/security.md``):
- by the strategy's weighting (fedavg, ffa): the client sends w_k * x_k; the server divides the sum
  by sum w_k (w_k: the example count, the examples trained this round, or 1);
- clipped (dp): the client sends its delta from the global state, clipped to L2 norm C, with
  weight 1 (the server cannot clip what it cannot see); the server adds the noise to the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedpeft.privacy import clip_factor
from fedpeft.secagg.ring import FixedPoint
from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, trained_tensors

LOSS_SCALE = 1024.0  # the loss travels divided by this, so losses up to clip_range * 1024 fit


@dataclass(frozen=True)
class Summand:
    """An encoded contribution: uint64 over Z_2^64, and how many values the range clipped."""

    vector: np.ndarray
    clipped: int


class SummandLayout:
    """Named tensor shapes laid end to end, then the loss coordinate."""

    def __init__(
        self, adapter: dict[str, AdapterFactors], extras: dict[str, Tensor], plan: ClientPlan
    ) -> None:
        """What ``plan`` has clients send of ``adapter`` and ``extras`` (no frozen head)."""
        sent_extras = extras if plan.send_extras else {}
        tensors = trained_tensors(adapter, sent_extras, plan.send_lora_A, plan.send_lora_B)
        self.shapes = {key: tuple(t.shape) for key, t in tensors.items()}
        self.numel = sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def size(self) -> int:
        """Length of the vector that travels: the tensors and the loss."""
        return self.numel + 1

    def flatten(self, factors: dict[str, AdapterFactors], extras: dict[str, Tensor]) -> np.ndarray:
        """The tensors of ``factors``/``extras`` in this layout, as one float32 vector."""
        parts = []
        for key, shape in self.shapes.items():
            kind, _, name = key.partition("/")
            try:
                tensor = extras[name] if kind == "extra" else getattr(factors[name], kind)
            except KeyError as exc:
                raise ValueError(f"the update lacks {key!r}, which the global state has") from exc
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the global state {shape}")
            parts.append(tensor.detach().to(torch.float32).reshape(-1))
        return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)

    def unflatten(self, vector: np.ndarray) -> dict[str, Tensor]:
        """The tensor part of ``vector`` as named float32 tensors."""
        flat = torch.from_numpy(vector[: self.numel].astype(np.float32))
        out, offset = {}, 0
        for key, shape in self.shapes.items():
            size = math.prod(shape)
            out[key] = flat[offset : offset + size].view(shape)
            offset += size
        return out

    def loss(self, vector: np.ndarray) -> float:
        return float(vector[self.numel]) * LOSS_SCALE

    def encode(
        self,
        update: ClientUpdate,
        received: tuple[dict[str, AdapterFactors], dict[str, Tensor]],
        codec: FixedPoint,
        clip_norm: float,
        weight: int,
    ) -> Summand:
        """``update`` times ``weight`` (its weight under the strategy's weighting, when
        ``clip_norm == 0``), or its delta from ``received`` (the global adapter and extras) clipped
        to L2 norm ``clip_norm`` with weight 1; the loss coordinate is always weighted by the
        example count."""
        values = self.flatten(update.factors, update.extras)
        if clip_norm > 0:
            values = values - self.flatten(*received)
            values *= clip_factor(float(np.linalg.norm(values.astype(np.float64))), clip_norm)
            weight = 1
        tensors, clipped = codec.encode(values, weight)
        loss = np.array([update.metrics.get("train_loss", 0.0) / LOSS_SCALE])
        encoded_loss, loss_clipped = codec.encode(loss, update.num_examples)
        return Summand(np.concatenate([tensors, encoded_loss]), clipped + loss_clipped)
