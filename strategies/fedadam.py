"""FedAdam (Reddi et al. 2021, Algorithm 2): v_t = β2 v_{t-1} + (1 - β2) Δ_t².

The first moment, the step and the defaults are ``AdaptiveServerOptimizer``'s
(``strategies/fedopt.py``).
"""

from __future__ import annotations

from torch import Tensor

from strategies.fedopt import AdaptiveServerOptimizer


class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.mul_(self.beta_2).add_(delta_sq, alpha=1 - self.beta_2)
