"""Variance-corrected model averaging ("Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems"): average, then rescale each tensor around its mean so that its variance
equals the (example-weighted) mean of the clients' variances:

    w' = (w̄ - mean(w̄)) * sqrt((σ²_T + ε) / (var(w̄) + ε)) + mean(w̄),   σ²_T = sum_k p_k var(w_k)

ε is relative to the tensor's scale (``eps_rel`` x the clients' mean square value): a fixed 1e-4
would swamp LoRA-sized variances and make the correction a no-op. Tensors whose target variance
is zero (B at its zero init) are left as averaged.
"""

from __future__ import annotations

from torch import Tensor

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies.base import StatelessStrategy, example_weights, require_updates
from strategies.fedavg import FedAvg


class VCMA(StatelessStrategy):
    name = "vcma"
    linear = False

    def __init__(self, eps_rel: float = 1e-6) -> None:
        self.eps_rel = eps_rel

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        averaged = FedAvg().aggregate(rnd, state, updates)
        p = example_weights(updates)
        adapter = {
            module: AdapterFactors(
                A=self.correct(mean.A, [u.factors[module].A for u in updates], p),
                B=self.correct(mean.B, [u.factors[module].B for u in updates], p),
                scale=mean.scale,
            )
            for module, mean in averaged.adapter.items()
        }
        extras = {
            name: self.correct(t, [u.extras[name] for u in updates], p) for name, t in averaged.extras.items()
        }
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)

    def correct(self, mean: Tensor, client_tensors: list[Tensor], p: list[float]) -> Tensor:
        """Rescale ``mean`` so its variance is the weighted mean client variance."""
        target = sum(pk * t.float().var(unbiased=False) for pk, t in zip(p, client_tensors, strict=True))
        if float(target) == 0.0:
            return mean
        scale2 = sum(pk * t.float().pow(2).mean() for pk, t in zip(p, client_tensors, strict=True))
        eps = self.eps_rel * scale2
        center = mean.mean()
        return (mean - center) * ((target + eps) / (mean.var(unbiased=False) + eps)).sqrt() + center
