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

from typing import Any

import torch
from torch import Tensor

from fedpeft.privacy import PrivacyAccountant, gaussian_noise
from fedpeft.state import ClientPlan, ClientUpdate, GlobalState
from strategies.base import StopFederation, Strategy, aggregate_stream, require_updates
from strategies.clip import DeltaClipper, untrained_split
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
        if epsilon_budget is not None and self.accountant.epsilon(1) > epsilon_budget:
            raise StrategyError(
                f"dp: epsilon_budget = {epsilon_budget} cannot pay for a single round (epsilon after "
                f"round 1 would be {self.accountant.epsilon(1):.3f}); raise epsilon_budget or "
                "noise_multiplier"
            )
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

    def start(self, rnd: int, state: GlobalState) -> PrivateSum:
        return PrivateSum(self, rnd, state)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        return aggregate_stream(self, rnd, state, updates)

    def aggregate_clipped_sum(
        self,
        rnd: int,
        state: GlobalState,
        clipped_sum: dict[str, Tensor],
        count: int,
        rank: int,
        alpha: float,
    ) -> GlobalState:
        """The round's result from the sum of ``count`` deltas the clients clipped themselves to
        ``clip_norm`` (secure aggregation: the server sees only the sum, so it reports no
        per-client norms), named as ``start``'s accumulator names them."""
        accumulator = self.start(rnd, state)
        accumulator.add_sum(clipped_sum, (rnd, rank, alpha))
        return accumulator.result()

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


class PrivateSum:
    """dp's accumulator: the sum of the clients' clipped deltas from the global adapter, all
    tensors of an update taken as one flat vector."""

    def __init__(self, dp: DifferentialPrivacy, rnd: int, state: GlobalState) -> None:
        self.dp, self.rnd, self.state = dp, rnd, state
        self.trains_A = dp.inner.client_instructions(rnd, state).train_lora_A
        self.clipper = DeltaClipper(dp.name, state, self.trains_A)
        self.total = torch.zeros(self.clipper.layout.numel)
        self.client: tuple[int, int, float] | None = None  # (round, rank, alpha) of the first update

    def add(self, update: ClientUpdate) -> None:
        factor = self.clipper.clip(update, self.dp.clip_norm)
        self.total.add_(self.clipper.delta, alpha=factor)
        self.client = self.client or (update.round, update.rank, update.alpha)

    def add_sum(self, clipped: dict[str, Tensor], client: tuple[int, int, float]) -> None:
        """Fold in a sum of deltas already clipped (by the clients themselves)."""
        self.total.add_(self.clipper.layout.gather([clipped[k] for k in self.clipper.layout.keys]))
        self.client = self.client or client

    def result(self) -> GlobalState:
        if self.client is None:
            raise ValueError(f"strategy {self.dp.name!r} was given no client updates to aggregate")
        dp, layout = self.dp, self.clipper.layout
        std = dp.noise_multiplier * dp.clip_norm
        for view in layout.views(self.total):
            view.add_(gaussian_noise(view.shape, std, dp.generator))
        self.total.div_(dp.clients_per_round).add_(self.clipper.reference)
        self.clipper.delta = torch.empty(0)  # not needed any more: free it before the inner strategy copies
        dp.accountant.step()
        dp.last_metrics = {
            "epsilon": dp.accountant.epsilon(),
            "delta": dp.accountant.delta,
            **self.clipper.metrics(),
        }
        noised = dict(zip(layout.keys, layout.views(self.total), strict=True))
        factors, extras = untrained_split(noised, self.state, self.trains_A)
        rnd, rank, alpha = self.client
        virtual = ClientUpdate(factors, extras, 1, round=rnd, rank=rank, alpha=alpha, num_trained=1)
        return dp.inner.aggregate(self.rnd, self.state, [virtual])
