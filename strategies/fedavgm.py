"""FedAvgM: server momentum on the mean update (Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification").

    v_t = β v_{t-1} + Δ_t,     x_{t+1} = x_t + η v_t

as Flower's ``FedAvgM`` computes it (there with the pseudo-gradient -Δ_t). With β = 0 and η = 1
it is the inner strategy itself. See ``strategies/fedopt.py`` for Δ_t and the composition rules.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from strategies.fedopt import ServerOptimizer
from strategies.registry import StrategyError


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def __init__(
        self,
        inner: str = "fedavg",
        inner_options: dict[str, Any] | None = None,
        server_lr: float = 1.0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(inner, inner_options, server_lr)
        if not 0 <= momentum < 1:
            raise StrategyError("fedavgm's momentum must be in [0, 1)")
        self.momentum = momentum

    def direction(self, key: str, delta: Tensor) -> Tensor:
        v = self.moment("v", key, delta)
        v.mul_(self.momentum).add_(delta)
        return self.server_lr * v
