"""FedEx-LoRA: FedAvg of the factors plus the exact residual in the frozen ``merged`` delta.

The residual s (sum_k p_k B_k A_k - B̄ Ā) is kept factored as
[s p_1 B_1, ..., s p_K B_K, -s B̄] @ [A_1; ...; A_K; Ā] (rank <= (K + 1) r), then re-compressed, so
W0' + s B̄ Ā = W0 + s sum_k p_k B_k A_k.
"""

from __future__ import annotations

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState, LowRankDelta
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
        residuals = (
            (module, residual_terms(module, mean, updates, p)) for module, mean in averaged.adapter.items()
        )
        merged = self.merge(state.merged, residuals)
        return GlobalState(round=rnd, merged=merged, adapter=averaged.adapter, extras=averaged.extras)


def residual_terms(
    module: str, mean: AdapterFactors, updates: list[ClientUpdate], p: list[float]
) -> list[LowRankDelta]:
    """The residual's terms s p_k B_k A_k, one per client, and -s B̄ Ā."""
    s = mean.scale
    return [
        LowRankDelta(U=s * pk * u.factors[module].B.float(), V=u.factors[module].A.float())
        for pk, u in zip(p, updates, strict=True)
    ] + [LowRankDelta(U=-s * mean.B, V=mean.A)]
