"""FedAvg over LoRA factors: A and B averaged separately, weighted by examples.

Inexact by design: mean(B) mean(A) != mean(B A); the error is sum_k p_k (B_k - B̄)(A_k - Ā).
Kept because it is the baseline every paper compares against.
"""

from __future__ import annotations

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies.base import StatelessStrategy, example_weights, require_updates, weighted_sum


class FedAvg(StatelessStrategy):
    """Example-weighted average of A, B and the dense extras."""

    name = "fedavg"
    linear = True

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        check_same_ranks(self.name, updates)
        p = example_weights(updates)
        first = updates[0]
        adapter = {
            module: AdapterFactors(
                A=weighted_sum((u.factors[module].A for u in updates), p),
                B=weighted_sum((u.factors[module].B for u in updates), p),
                scale=first.factors[module].scale,
            )
            for module in first.factors
        }
        extras = {name: weighted_sum((u.extras[name] for u in updates), p) for name in first.extras}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)


def check_same_ranks(strategy: str, updates: list[ClientUpdate]) -> None:
    """Averaging factors needs one rank and alpha across clients."""
    ranks = {(u.rank, u.alpha) for u in updates}
    if len(ranks) > 1:
        raise ValueError(
            f"{strategy} needs every client at the same LoRA rank and alpha, got {sorted(ranks)}; "
            "use the 'stacking' strategy for heterogeneous ranks"
        )
