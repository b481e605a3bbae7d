"""Differential privacy primitives: L2 clipping of a whole update, Gaussian noise, and an (ε, δ)
accountant over rounds (opacus' RDP accountant, with its state made persistable)."""

from __future__ import annotations

from typing import Any

import torch
from opacus.accountants import RDPAccountant
from torch import Tensor


def global_norm(tensors: dict[str, Tensor]) -> float:
    """The L2 norm of all tensors taken together as one vector.

    Per-tensor norms in one fused call (float32 accumulation, relative error ~1e-6, far below
    what a noise calibration depends on), combined in float64.
    """
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t.float() for t in tensors.values()])
    return float(torch.stack(norms).double().norm())


def clip_factor(norm: float, max_norm: float) -> float:
    """The factor that brings a vector of L2 norm ``norm`` down to at most ``max_norm``."""
    return max_norm / norm if norm > max_norm else 1.0


def clip_update(tensors: dict[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], bool]:
    """Scale the whole update down to L2 norm ``max_norm`` if it is longer; returns (clipped, was_clipped)."""
    factor = clip_factor(global_norm(tensors), max_norm)
    if factor == 1.0:
        return dict(tensors), False
    return {k: t * factor for k, t in tensors.items()}, True


def gaussian_noise(shape: torch.Size, std: float, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


class PrivacyAccountant:
    """(ε, δ) after repeated rounds of the subsampled Gaussian mechanism (client-level DP).

    ``sample_rate`` is the fraction of clients sampled per round; ``noise_multiplier`` z is the noise
    standard deviation divided by the clipping norm.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.rounds = 0

    def step(self) -> None:
        self.rounds += 1

    def epsilon(self, rounds: int | None = None) -> float:
        """ε after ``rounds`` rounds (default: the rounds taken so far)."""
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, rounds)]
        return float(accountant.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
