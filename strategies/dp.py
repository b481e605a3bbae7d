"""Client-level differential privacy around a linear strategy (central DP at the server).

Each client's whole update (every tensor it trained, as a delta from what it received) is clipped
to L2 norm ``clip_norm``; the server sums the clipped deltas, adds N(0, (z C)^2) per coordinate,
and divides by the fixed number of sampled clients m (not by the replies that arrived, so one
client's presence changes the result by at most C/m). The noised mean delta is handed to the
inner strategy as a single virtual client, which for a linear strategy returns it unchanged.

Noise amplification: with FedAvg both A and B get noise, and the product
(B + N_B)(A + N_A) = BA + N_B A + B N_A + N_B N_A multiplies it; FFA (A frozen, only B noised)
avoids this and is the recommended inner strategy.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import Tensor

from fedpeft.privacy import PrivacyAccountant, clip_update, gaussian_noise, global_norm
from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState
from strategies.base import StopFederation, Strategy, require_updates
from strategies.registry import StrategyError, create_strategy


class DifferentialPrivacy:
    """``dp(inner)``: clipping, Gaussian noise and (ε, δ) accounting with an optional budget."""

    name = "dp"
    linear = True

    def __init__(
        self,
        clients_per_round: int,
        num_clients: int,
        inner: str = "ffa",
        inner_options: dict[str, Any] | None = None,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        epsilon_budget: float | None = None,
        seed: int = 0,
        allow_nonlinear: bool = False,
    ) -> None:
        self.inner: Strategy = create_strategy(inner, inner_options)
        if not getattr(self.inner, "linear", False) and not allow_nonlinear:
            raise StrategyError(
                f"dp wraps strategies whose aggregate is linear in the client updates (fedavg, ffa); "
                f"'{inner}' is not, so its noise calibration would not hold; set allow_nonlinear = true "
                "in [strategy] to wrap it anyway"
            )
        if clip_norm <= 0 or noise_multiplier < 0:
            raise StrategyError("dp needs clip_norm > 0 and noise_multiplier >= 0")
        self.clients_per_round = clients_per_round
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.epsilon_budget = epsilon_budget
        self.accountant = PrivacyAccountant(noise_multiplier, clients_per_round / num_clients, delta)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_metrics: dict[str, float] = {}

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        if self.epsilon_budget is not None:
            after = self.accountant.epsilon(self.accountant.rounds + 1)
            if after > self.epsilon_budget:
                raise StopFederation(
                    f"privacy budget: one more round would bring epsilon to {after:.3f}, above "
                    f"epsilon_budget = {self.epsilon_budget} (delta = {self.accountant.delta}); raise the "
                    "budget or the noise_multiplier to train longer"
                )
        return self.inner.client_instructions(rnd, state)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        if state.adapter is None:
            raise StrategyError(
                "dp needs the global adapter the clients started from (one LoRA rank for all)"
            )
        trains_A = self.inner.client_instructions(rnd, state).train_lora_A
        reference = _trained_tensors(state.adapter, state.extras, trains_A)
        total = {k: torch.zeros_like(t, dtype=torch.float32) for k, t in reference.items()}
        clipped = 0
        norms = []
        for update in updates:
            sent = _trained_tensors(update.factors, update.extras, trains_A)
            delta = {k: sent[k].float() - reference[k].float() for k in reference}
            norms.append(global_norm(delta))
            delta, was_clipped = clip_update(delta, self.clip_norm)
            clipped += was_clipped
            for k, t in delta.items():
                total[k].add_(t)
        std = self.noise_multiplier * self.clip_norm
        noised = {
            k: reference[k].float()
            + (t + gaussian_noise(t.shape, std, self.generator)) / self.clients_per_round
            for k, t in total.items()
        }
        self.accountant.step()
        self.last_metrics = {
            "epsilon": self.accountant.epsilon(),
            "delta": self.accountant.delta,
            "clipped_fraction": clipped / len(updates),
            "median_update_norm": statistics.median(norms),  # what clip_norm is tuned against
        }
        virtual = _as_update(noised, state, updates[0], trains_A)
        return self.inner.aggregate(rnd, state, [virtual])

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_rng": self.generator.get_state(),
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.generator.set_state(state["noise_rng"])
        self.inner.load_state_dict(state["inner"])


def _trained_tensors(
    factors: dict[str, AdapterFactors], extras: dict[str, Tensor], trains_A: bool
) -> dict[str, Tensor]:
    out = {f"extra/{k}": t for k, t in extras.items()}
    for module, f in factors.items():
        out[f"B/{module}"] = f.B
        if trains_A:
            out[f"A/{module}"] = f.A
    return out


def _as_update(
    tensors: dict[str, Tensor], state: GlobalState, like: ClientUpdate, trains_A: bool
) -> ClientUpdate:
    """The noised mean as one client's update (A kept from the state when it is not trained)."""
    assert state.adapter is not None
    factors = {
        module: AdapterFactors(
            A=tensors[f"A/{module}"] if trains_A else f.A, B=tensors[f"B/{module}"], scale=f.scale
        )
        for module, f in state.adapter.items()
    }
    extras = {k.removeprefix("extra/"): t for k, t in tensors.items() if k.startswith("extra/")}
    return ClientUpdate(factors, extras, num_examples=1, round=like.round, rank=like.rank, alpha=like.alpha)
