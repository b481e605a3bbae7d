"""FedAvg over LoRA factors: A and B averaged separately, weighted by ``weighting``.

Inexact by design: mean(B) mean(A) != mean(B A); the error is sum_k p_k (B_k - B̄)(A_k - Ā).
Kept because it is the baseline every paper compares against.
"""

from __future__ import annotations

import math

from torch import Tensor

from fedpeft.state import (
    AdapterFactors,
    ClientUpdate,
    GlobalState,
    SpanLayout,
    trained_tensors,
    update_weight,
)
from strategies.accumulate import Probe, WeightedSum
from strategies.base import WeightedStrategy, aggregate_stream, require_updates


class FedAvg(WeightedStrategy):
    """Weighted average of A, B and the dense extras (``weighting``: examples, steps or uniform)."""

    name = "fedavg"
    linear = True

    def start(self, rnd: int, state: GlobalState) -> FactorAverage:
        return FactorAverage(self.name, rnd, state, self.weighting)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        return aggregate_stream(self, rnd, state, updates)


class FactorAverage:
    """The running weighted mean of the clients' factors and extras.

    With ``frozen`` (FFA), A is not averaged: the result keeps the frozen A and its scale.
    """

    def __init__(
        self,
        strategy: str,
        rnd: int,
        state: GlobalState,
        weighting: str,
        frozen: dict[str, AdapterFactors] | None = None,
    ) -> None:
        self.strategy, self.rnd, self.state, self.frozen = strategy, rnd, state, frozen
        self.weighting = weighting
        self.sum = WeightedSum()
        self.ranks: set[tuple[int, float]] = set()
        self.scales: dict[str, float] = {}

    def add(self, update: ClientUpdate) -> None:
        self._note(update)
        weight = update_weight(update, self.weighting)
        if not self._add_flat(update, weight):
            self.sum.add(self._trained(update), weight)

    def add_probed(self, update: ClientUpdate, probe: Probe) -> bool:
        """Hold ``update`` for a fold that measures it before it is judged; False (nothing taken)
        where it did not decode whole in the sum's layout, or ``probe`` has no finite cap (the fold
        takes it before measuring it: a refused reply's part in the sum must be bounded to be taken
        back). ``settle`` it once ``probe`` is filled."""
        if not math.isfinite(probe.cap):
            return False
        return self._add_flat(update, update_weight(update, self.weighting), probe)

    def _add_flat(self, update: ClientUpdate, weight: float, probe: Probe | None = None) -> bool:
        """Hold ``update``'s span if it decoded whole in the sum's layout (False otherwise)."""
        if self.sum.layout is None and update.flat is not None:  # so that the first span is held too
            self.sum.start(self._layout_of(update.flat.layout) or self._trained(update), weight)
        return self.sum.add_flat(update.flat, weight, probe)

    def _layout_of(self, layout: SpanLayout) -> dict[str, Tensor] | None:
        """What a client trains as the sent state holds it, if a reply in ``layout`` lies so (every
        valid reply of a streaming round: the server checks names, shapes and ranks against the
        sent state): the sum's layout without building a reply's per-module views."""
        if self.state.adapter is None:
            return None
        sent = trained_tensors(self.state.adapter, self.state.extras, trains_A=self.frozen is None)
        shapes = [tuple(t.shape) for t in sent.values()]
        return sent if tuple(sent) == layout.names and shapes == list(layout.shapes) else None

    def fold_held(self) -> None:
        self.sum.fold_held()

    def settle(self, update: ClientUpdate, probe: Probe, accepted: bool) -> None:
        """Keep or take back a probed update once the server has judged it."""
        assert update.flat is not None
        if accepted:
            self._note(update)
        self.sum.settle(update.flat, update_weight(update, self.weighting), probe, accepted)

    def _note(self, update: ClientUpdate) -> None:
        """Record the rank, alpha and scales of an update that counts."""
        self.ranks.add((update.rank, update.alpha))
        check_same_ranks(self.strategy, self.ranks)
        if not self.scales:
            self.scales = update.scales()

    def _trained(self, update: ClientUpdate) -> dict[str, Tensor]:
        return trained_tensors(update.factors, update.extras, trains_A=self.frozen is None)

    def result(self) -> GlobalState:
        if self.sum.count == 0:
            raise ValueError(f"strategy {self.strategy!r} was given no client updates to aggregate")
        mean = self.sum.mean()
        if self.frozen is None:
            adapter = {
                module: AdapterFactors(A=mean[f"A/{module}"], B=mean[f"B/{module}"], scale=scale)
                for module, scale in self.scales.items()
            }
        else:
            adapter = {
                module: AdapterFactors(A=f.A, B=mean[f"B/{module}"], scale=f.scale)
                for module, f in self.frozen.items()
            }
        extras = {k.removeprefix("extra/"): t for k, t in mean.items() if k.startswith("extra/")}
        return GlobalState(round=self.rnd, merged=self.state.merged, adapter=adapter, extras=extras)


def check_same_ranks(strategy: str, ranks: set[tuple[int, float]]) -> None:
    """Averaging factors needs one (rank, alpha) across clients."""
    if len(ranks) > 1:
        raise ValueError(
            f"{strategy} needs every client at the same LoRA rank and alpha, got {sorted(ranks)}; "
            "use the 'stacking' strategy for heterogeneous ranks"
        )
