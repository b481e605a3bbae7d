"""Stacking (FLoRA): exact aggregation for any mix of client ranks.

A_st = [p_1 s_1 A_1; ...; p_K s_K A_K] and B_st = [B_1 ... B_K], so B_st A_st = sum_k p_k s_k B_k A_k
exactly. The stacked product is added to the frozen ``merged`` delta (re-compressed to
``rank_cap``); clients restart from a fresh, seeded adapter every round.
"""

from __future__ import annotations

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState, LowRankDelta
from strategies.base import require_updates, weighted_sum
from strategies.lowrank import MergedDeltaStrategy


class Stacking(MergedDeltaStrategy):
    """FLoRA stacking; ``rank_cap`` bounds the width of the merged delta per module."""

    name = "stacking"
    linear = False

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        p = self.weights(updates)
        terms = (
            (module, [term(u.factors[module], pk) for pk, u in zip(p, updates, strict=True)])
            for module in updates[0].factors
        )
        merged = self.merge(state.merged, terms)
        extras = {name: weighted_sum((u.extras[name] for u in updates), p) for name in updates[0].extras}
        return GlobalState(round=rnd, merged=merged, adapter=None, extras=extras)


def term(factors: AdapterFactors, weight: float) -> LowRankDelta:
    """weight s_k B_k A_k as B_k @ (weight s_k A_k)."""
    return LowRankDelta(U=factors.B.float(), V=(weight * factors.scale) * factors.A.float())
