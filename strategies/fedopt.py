"""Server optimizers around a linear strategy (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2; FedAvgM from Hsu et al. 2019).

The inner strategy (fedavg or ffa) turns a round's replies into x̃, its weighted mean. With x_t the
global state the clients started from, the server's update direction is Δ_t = x̃ - x_t (the
negative of Flower's "pseudo-gradient" x_t - x̃), taken over every tensor the clients trained (A
unless the inner rule freezes it, B, the dense extras), and the server steps

    x_{t+1} = x_t + step_t(Δ_t)

with a rule per subclass (``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``). The optimizer's
moments are per tensor, kept in ``state_dict`` so that a resumed run continues identically.

It composes with privacy by sitting inside ``dp``: ``dp(inner = "fedadam")`` clips and noises the
clients' updates, and the optimizer then steps on the noised mean (post-processing, so the
guarantee is unchanged); under secure aggregation it steps on the unmasked mean. Since its result
depends on the replies only through their weighted mean, it is ``linear`` when its inner rule is.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, split_trained, trained_tensors
from strategies.base import Accumulator, ForwardsProbes, Strategy, aggregate_stream, require_updates
from strategies.registry import StrategyError, create_strategy


class ServerOptimizer(Strategy):
    """A server-side optimizer stepping on the inner strategy's mean update."""

    name: str

    def __init__(
        self,
        inner: str = "fedavg",
        inner_options: dict[str, Any] | None = None,
        server_lr: float = 1.0,
    ) -> None:
        around_dp = StrategyError(
            f"put {self.name} inside dp, not around it: name = 'dp', inner = '{self.name}' (dp then "
            "clips and noises the updates, and the optimizer steps on the noised mean)"
        )
        if inner == "dp":
            raise around_dp
        self.inner: Strategy = create_strategy(inner, inner_options)
        if self.inner.private:  # dp by its import path: around it, the rounds would not be private
            raise around_dp
        if not self.inner.linear:
            raise StrategyError(
                f"{self.name} steps on the weighted mean of the updates, so it wraps a linear strategy "
                f"(fedavg, ffa); '{inner}' is not one"
            )
        if server_lr <= 0:
            raise StrategyError(f"{self.name}'s server_lr must be positive")
        self.linear = True
        self.server_lr = server_lr
        self.moments: dict[str, dict[str, Tensor]] = {}  # moment name -> tensor name -> value
        self.steps = 0

    @abstractmethod
    def direction(self, key: str, delta: Tensor) -> Tensor:
        """The step for tensor ``key`` given its mean update ``delta`` (updating the moments);
        the server adds ``direction`` to the global tensor."""

    def moment(self, kind: str, key: str, like: Tensor, fill: float = 0.0) -> Tensor:
        """The running moment ``kind`` of tensor ``key``, created as ``fill`` the first time."""
        per_tensor = self.moments.setdefault(kind, {})
        if key not in per_tensor:
            per_tensor[key] = torch.full_like(like, fill)
        return per_tensor[key]

    def initial_state(self, state: GlobalState, seed: int) -> GlobalState:
        return self.inner.initial_state(state, seed)

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return self.inner.client_instructions(rnd, state)

    def empty_round(self, rnd: int) -> None:
        self.inner.empty_round(rnd)

    def start(self, rnd: int, state: GlobalState) -> Accumulator:
        inner = self.inner.start(rnd, state)
        if inner is not None and self.inner.client_instructions(rnd, state).init_gradient:
            return inner  # a gradient-sketch round (Fed-SB's initialisation) is not an update: no step
        return OptimizerStep(self, rnd, state, inner)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        return aggregate_stream(self, rnd, state, updates)

    def step(self, rnd: int, state: GlobalState, mean: GlobalState) -> GlobalState:
        """The next global state: ``state`` moved by the optimizer along ``mean - state``."""
        if state.adapter is None or mean.adapter is None:
            raise StrategyError(
                f"{self.name} needs the global adapter the clients started from (one LoRA rank for all, "
                "lora.init = 'shared')"
            )
        plan = self.inner.client_instructions(rnd, state)
        current = trained_tensors(state.adapter, state.extras, plan.train_lora_A, plan.train_lora_B)
        averaged = trained_tensors(mean.adapter, mean.extras, plan.train_lora_A, plan.train_lora_B)
        self.steps += 1
        stepped = {}
        for key, x in current.items():
            delta = averaged[key].float() - x.float()
            stepped[key] = x.float() + self.direction(key, delta)
        factors, extras = split_trained(stepped, state.adapter)
        self.last_metrics = self.inner.last_metrics
        return GlobalState(round=rnd, merged=mean.merged, adapter=factors, extras=extras)

    def state_dict(self) -> dict[str, Any]:
        """Copies of the moments (they are updated in place), the step count, the inner state."""
        return {"moments": _copy(self.moments), "steps": self.steps, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments = _copy(state["moments"])
        self.steps = int(state["steps"])
        self.inner.load_state_dict(state["inner"])


def _copy(moments: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    return {kind: {key: t.clone() for key, t in tensors.items()} for kind, tensors in moments.items()}


class OptimizerStep(ForwardsProbes):
    """The inner strategy's accumulator (or a list of updates, when it cannot stream); the
    optimizer steps when the round's result is asked for."""

    def __init__(
        self, optimizer: ServerOptimizer, rnd: int, state: GlobalState, inner: Accumulator | None
    ) -> None:
        self.optimizer, self.rnd, self.state, self.inner = optimizer, rnd, state, inner
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        if self.inner is not None:
            self.inner.add(update)
        else:
            self.updates.append(update)

    def result(self) -> GlobalState:
        if self.inner is not None:
            mean = self.inner.result()
        else:
            require_updates(self.optimizer.name, self.updates)
            mean = self.optimizer.inner.aggregate(self.rnd, self.state, self.updates)
        return self.optimizer.step(self.rnd, self.state, mean)


class AdaptiveServerOptimizer(ServerOptimizer):
    """The adaptive rules of Reddi et al. (Algorithm 2): a first moment
    m_t = β1 m_{t-1} + (1 - β1) Δ_t, a second moment v_t by subclass, and the step
    η m_t / (sqrt(v_t) + τ), from m_{-1} = 0 and v_{-1} = τ² as the paper sets them (no bias
    correction, as in the paper; Flower's FedAdam corrects it)."""

    def __init__(
        self,
        inner: str = "fedavg",
        inner_options: dict[str, Any] | None = None,
        server_lr: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(inner, inner_options, server_lr)
        if not (0 <= beta_1 < 1 and 0 <= beta_2 < 1 and tau > 0):
            raise StrategyError(f"{self.name} needs 0 <= beta_1, beta_2 < 1 and tau > 0")
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau

    @abstractmethod
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        """Update v (in place) with Δ_t²."""

    def direction(self, key: str, delta: Tensor) -> Tensor:
        m = self.moment("m", key, delta)
        v = self.moment("v", key, delta, fill=self.tau**2)
        m.mul_(self.beta_1).add_(delta, alpha=1 - self.beta_1)
        self.second_moment(v, delta * delta)
        return self.server_lr * m / (v.sqrt() + self.tau)
