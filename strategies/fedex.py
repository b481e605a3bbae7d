"""FedEx-LoRA: FedAvg of the factors plus the exact residual in the frozen ``merged`` delta.

The residual s (sum_k p_k B_k A_k - B̄ Ā) is kept factored as
[s p_1 B_1, ..., s p_K B_K, -s B̄] @ [A_1; ...; A_K; Ā] (rank <= (K + 1) r), then re-compressed, so
W0' + s B̄ Ā = W0 + s sum_k p_k B_k A_k.
"""

from __future__ import annotations

import torch

from fedpeft.state import ClientUpdate, GlobalState, LowRankDelta
from strategies.base import require_updates
from strategies.fedavg import FedAvg
from strategies.lowrank import MergedDeltaStrategy


class FedEx(MergedDeltaStrategy):
    """FedEx-LoRA; ``rank_cap`` bounds the width of the merged delta per module."""

    name = "fedex"
    linear = False

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        averaged = FedAvg(self.weighting).aggregate(rnd, state, updates)
        p = self.weights(updates)
        residuals = {}
        for module, mean in averaged.adapter.items():
            s = mean.scale
            Us = [s * pk * u.factors[module].B.float() for pk, u in zip(p, updates, strict=True)] + [
                -s * mean.B
            ]
            Vs = [u.factors[module].A.float() for u in updates] + [mean.A]
            residuals[module] = LowRankDelta(U=torch.cat(Us, dim=1), V=torch.cat(Vs, dim=0))
        merged = self.merge(state.merged, residuals)
        return GlobalState(round=rnd, merged=merged, adapter=averaged.adapter, extras=averaged.extras)
