"""``clip(inner)``: each client's update bounded in L2 norm before the inner strategy sees it.

A client's update is everything it trained (A unless the inner strategy freezes it, B, the dense
extras) taken as one flat vector, as a delta from the global state it received. A delta longer
than the bound is scaled down to it: the inner strategy gets ``reference + min(1, bound / norm) *
delta``. The bound is fixed (``clip_norm``) or a multiple of the round's median update norm
(``median_multiple``), which needs every norm before any update is handed on. With a fixed bound
and an inner strategy that streams (fedavg, ffa), clipping streams too: each reply is clipped and
folded in as it arrives.

``DeltaClipper`` is the clipping of one whole update that ``dp`` (strategies/dp.py) shares.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

import torch

from fedpeft.kernels import squared_distance
from fedpeft.privacy import clip_factor
from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, split_trained, trained_tensors
from strategies.accumulate import FlatLayout
from strategies.base import Accumulator, Strategy, require_updates
from strategies.registry import StrategyError, create_strategy


class DeltaClipper:
    """One round's updates as flat deltas from the global state the clients started from: their L2
    norms, and each scaled down to a bound. Keeps one reused delta buffer, never K of them."""

    def __init__(
        self, who: str, state: GlobalState, trains_A: bool, trains_B: bool = True, trains_extras: bool = True
    ) -> None:
        if state.adapter is None:
            raise StrategyError(
                f"{who} needs the global adapter the clients started from (one LoRA rank for all, "
                "lora.init = 'shared')"
            )
        self.state, self.trains, self.trains_extras = state, (trains_A, trains_B), trains_extras
        reference = trained_tensors(state.adapter, self._extras(state.extras), *self.trains)
        self.layout = FlatLayout(reference)
        self.reference = self.layout.gather(list(reference.values()))  # read only: a view if it can be
        self.span = self.reference  # the last update measured, in this layout
        self.own_bytes = False  # whether that span is the reply's own bytes (else a gathered copy)
        self.norms: list[float] = []
        self.clipped = 0

    def measure(self, update: ClientUpdate) -> float:
        """Lay ``update`` out in ``self.span`` (its own bytes when it decoded whole in this layout,
        else a gathered copy) and return the L2 norm of its delta, in one compiled pass."""
        span = self.layout.span_of(update.flat)
        self.own_bytes = span is not None
        if span is None:
            sent = trained_tensors(update.factors, self._extras(update.extras), *self.trains)
            span = self.layout.gather([sent[k] for k in self.layout.keys])
        self.span = span
        return math.sqrt(squared_distance(span, self.reference))

    def _extras(self, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The dense extras that count in an update: none when the clients keep them frozen."""
        return extras if self.trains_extras else {}

    def clip(self, update: ClientUpdate, max_norm: float) -> float:
        """Measure ``update`` (it is left in ``self.span``) and return the factor that brings
        the delta within ``max_norm``; the norm and whether it was clipped go into the metrics."""
        return self.record(self.measure(update), max_norm)

    def record(self, norm: float, max_norm: float) -> float:
        """Count an update of L2 norm ``norm`` (its delta's) in the metrics; its clipping factor."""
        factor = clip_factor(norm, max_norm)
        self.norms.append(norm)
        self.clipped += factor < 1.0
        return factor

    def clipped_update(self, update: ClientUpdate, factor: float) -> ClientUpdate:
        """``update`` with the delta just measured scaled by ``factor`` (itself when 1)."""
        if factor == 1.0:
            return update
        buffer = torch.add(self.reference, torch.sub(self.span, self.reference), alpha=factor)
        tensors = dict(zip(self.layout.keys, self.layout.views(buffer), strict=True))
        factors, clipped_extras = split_trained(tensors, self.state.adapter)
        return dataclasses.replace(
            update, factors=factors, extras={**update.extras, **clipped_extras}, flat=None
        )

    def metrics(self) -> dict[str, float]:
        """Clipping statistics over the updates measured (none under secure aggregation, where
        the clients clip and the server sees only the sum)."""
        if not self.norms:
            return {}
        return {
            "clipped_fraction": self.clipped / len(self.norms),
            "median_update_norm": statistics.median(self.norms),  # what a bound is tuned against
        }


class Clip(Strategy):
    """``clip(inner)``: with a fixed bound around a streaming inner strategy, each update is clipped
    and handed on as it arrives (O(adapter) memory); with an adaptive bound, on the whole round."""

    name = "clip"
    # The server must see each update to clip it, so no secure aggregation; and dp clips itself.
    linear = False

    def __init__(self, inner: Strategy, clip_norm: float | None, median_multiple: float | None) -> None:
        self.inner = inner
        self.clip_norm, self.median_multiple = clip_norm, median_multiple

    def initial_state(self, state: GlobalState, seed: int) -> GlobalState:
        return self.inner.initial_state(state, seed)

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return self.inner.client_instructions(rnd, state)

    def empty_round(self, rnd: int) -> None:
        self.inner.empty_round(rnd)

    def start(self, rnd: int, state: GlobalState) -> ClippedStream | None:
        if self.clip_norm is None:
            return None  # the bound needs every norm of the round first
        inner = self.inner.start(rnd, state)
        return None if inner is None else ClippedStream(self, self.clipper(rnd, state), inner)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        clipper = self.clipper(rnd, state)
        if self.clip_norm is not None:
            bound = self.clip_norm
        else:
            assert self.median_multiple is not None
            bound = self.median_multiple * statistics.median(clipper.measure(u) for u in updates)
        clipped = [clipper.clipped_update(u, clipper.clip(u, bound)) for u in updates]
        result = self.inner.aggregate(rnd, state, clipped)
        self.record(clipper, bound)
        return result

    def clipper(self, rnd: int, state: GlobalState) -> DeltaClipper:
        plan = self.inner.client_instructions(rnd, state)
        return DeltaClipper(self.name, state, plan.train_lora_A, plan.train_lora_B)

    def record(self, clipper: DeltaClipper, bound: float) -> None:
        self.last_metrics = {**self.inner.last_metrics, **clipper.metrics(), "clip_bound": bound}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])


class ClippedStream:
    """The inner strategy's accumulator, fed clipped updates."""

    def __init__(self, clip: Clip, clipper: DeltaClipper, inner: Accumulator) -> None:
        self.clip, self.clipper, self.inner = clip, clipper, inner
        assert clip.clip_norm is not None
        self.bound = clip.clip_norm

    def add(self, update: ClientUpdate) -> None:
        factor = self.clipper.clip(update, self.bound)
        self.inner.add(self.clipper.clipped_update(update, factor))

    def result(self) -> GlobalState:
        result = self.inner.result()
        self.clip.record(self.clipper, self.bound)
        return result


def create_clip(
    inner: str = "fedavg",
    inner_options: dict[str, Any] | None = None,
    clip_norm: float | None = None,
    median_multiple: float | None = None,
) -> Clip:
    """``clip(inner)`` with a fixed L2 bound ``clip_norm`` or a bound of ``median_multiple`` times
    the round's median update norm."""
    if (clip_norm is None) == (median_multiple is None):
        raise StrategyError(
            "clip needs exactly one of clip_norm (a fixed L2 bound on each update) and "
            "median_multiple (the bound as a multiple of the round's median update norm) in [strategy]"
        )
    bound = clip_norm if clip_norm is not None else median_multiple
    if bound is not None and bound <= 0:
        raise StrategyError("clip's clip_norm or median_multiple must be > 0")
    wrapped = create_strategy(inner, inner_options)
    if wrapped.private:
        raise StrategyError(
            "clip around dp would bound each update by the others' norms (or clip twice): dp clips "
            "every update itself; set clip_norm (or target_quantile) in dp instead"
        )
    return Clip(wrapped, clip_norm, median_multiple)
