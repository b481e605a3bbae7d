"""FedYogi (Reddi et al. 2021, Algorithm 2): v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²).

The first moment, the step and the defaults are ``AdaptiveServerOptimizer``'s
(``strategies/fedopt.py``).
"""

from __future__ import annotations

from torch import Tensor

from strategies.fedopt import AdaptiveServerOptimizer


class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.sub_((1 - self.beta_2) * delta_sq * (v - delta_sq).sign())
