"""FedAdagrad (Reddi et al. 2021, Algorithm 2): v_t = v_{t-1} + Δ_t².

The first moment, the step and the defaults are ``AdaptiveServerOptimizer``'s
(``strategies/fedopt.py``); β2 is unused.
"""

from __future__ import annotations

from torch import Tensor

from strategies.fedopt import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.add_(delta_sq)
