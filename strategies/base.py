"""The strategy interface: pure tensor math over ``fedpeft.state`` values, no Flower."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fedpeft.state import WEIGHTINGS, ClientPlan, ClientUpdate, GlobalState, update_weight


class StopFederation(Exception):
    """Raised by ``client_instructions`` when no further round may run (e.g. a privacy budget
    would be exceeded). The server ends the run cleanly with this message."""


@runtime_checkable
class Strategy(Protocol):
    """An aggregation rule. See ``docs/strategies.md``.

    Optional attributes the server reads when present: ``linear`` (bool: the aggregate is a
    weighted sum of the client updates, so DP and secure aggregation may wrap it),
    ``last_metrics`` (dict of floats describing the last aggregation, logged per round) and
    ``start`` (see ``StreamingStrategy``: the server then folds each reply in as it arrives).
    """

    name: str

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan: ...

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Accumulator(Protocol):
    """One round's aggregation, folding client updates in one at a time.

    ``add`` keeps nothing of the update it is given beyond running sums, so a server that frees
    each reply after ``add`` holds O(adapter) memory for any number of clients.
    """

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> GlobalState: ...


@runtime_checkable
class StreamingStrategy(Protocol):
    """A strategy whose aggregate can be computed incrementally (a linear one)."""

    def start(self, rnd: int, state: GlobalState) -> Accumulator: ...


def aggregate_stream(
    strategy: StreamingStrategy, rnd: int, state: GlobalState, updates: Iterable[ClientUpdate]
) -> GlobalState:
    """``aggregate`` on top of ``start``: one code path for the batch and the streaming server."""
    accumulator = strategy.start(rnd, state)
    for update in updates:
        accumulator.add(update)
    return accumulator.result()


class FlatLayout:
    """Named float32 tensors as views into one flat buffer, and a test of whether another set of
    tensors lies the same way in one buffer of its own (as ``fedpeft.wire`` decodes a reply), so
    that an operation on all of them is one vectorized op over one span of memory."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.keys = list(tensors)
        self.shapes = [t.shape for t in tensors.values()]
        self.strides = [contiguous_strides(shape) for shape in self.shapes]
        sizes = [t.numel() for t in tensors.values()]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numel = sum(sizes)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """One view of ``buffer`` (``numel`` long) per tensor, in order."""
        spans = zip(self.offsets, self.shapes, strict=True)
        return [buffer[o : o + math.prod(shape)].view(shape) for o, shape in spans]

    def gather(self, tensors: list[Tensor]) -> Tensor:
        """``tensors`` as one 1-D float32 tensor in this layout: a view if they already lie so,
        else a copy."""
        span = self.span(tensors)
        if span is None:
            span = torch.empty(self.numel)
            torch._foreach_copy_(self.views(span), tensors)
        return span

    def span(self, tensors: list[Tensor]) -> Tensor | None:
        """The 1-D view over ``tensors`` if they are float32, contiguous, in this layout and back to
        back in one storage; else None."""
        first = tensors[0]
        base = first.data_ptr()
        if (
            [(t.data_ptr() - base) // 4 for t in tensors] != self.offsets
            or [t.shape for t in tensors] != self.shapes
            or [t.stride() for t in tensors] != self.strides
            or any(t.dtype is not torch.float32 for t in tensors)
        ):
            return None
        storage = first.untyped_storage()
        if (first.storage_offset() + self.numel) * 4 > storage.nbytes():
            return None  # adjacent, but separate allocations
        return first.new_empty(0).set_(storage, first.storage_offset(), (self.numel,))


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class WeightedSum:
    """Running weighted sum ``sum_k w_k t_k`` over named float32 tensors, and ``sum_k w_k``.

    Raw weights (example counts), not normalized ones, are what lets replies be folded before the
    total is known; ``mean`` divides once at the end. Weights are taken relative to the first
    one, so a single update (or equal weights) averages to exactly itself. The sums live in one
    flat buffer: an update decoded into one buffer in the same layout is folded by one ``add_``;
    any other by one fused ``torch._foreach_add_`` (the multi-tensor kernel of torch's own
    optimizers), never by one Python-level op per tensor.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.total = 0.0
        self.count = 0
        self.unit = 1.0

    def add(self, tensors: dict[str, Tensor], weight: float) -> None:
        if self.count == 0:
            self.unit = weight if weight > 0 else 1.0
            self.layout = FlatLayout(tensors)
            self.buffer = torch.empty(self.layout.numel)
            views = self.layout.views(self.buffer)
            torch._foreach_copy_(views, list(tensors.values()))
            self.sums = dict(zip(self.layout.keys, views, strict=True))
            if weight != self.unit:
                self.buffer.mul_(weight / self.unit)
        else:
            if tensors.keys() != self.sums.keys():
                raise ValueError("an update's tensors differ from the first update's")
            incoming = [tensors[k] for k in self.layout.keys]
            span = self.layout.span(incoming)
            if span is not None:
                self.buffer.add_(span, alpha=weight / self.unit)
            else:
                incoming = [t.to(torch.float32) for t in incoming]
                torch._foreach_add_(list(self.sums.values()), incoming, alpha=weight / self.unit)
        self.total += weight / self.unit
        self.count += 1

    def mean(self) -> dict[str, Tensor]:
        """``sum_k w_k t_k / sum_k w_k``; the sums are consumed (divided in place)."""
        if self.total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        self.buffer.div_(self.total)
        return self.sums


class StatelessStrategy:
    """Defaults for a strategy that keeps no state between rounds and asks nothing special of
    clients (they train and send both factors)."""

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WeightedStrategy(StatelessStrategy):
    """Defaults for a stateless rule that weighs its clients: ``weighting`` is one of
    ``fedpeft.state.WEIGHTINGS`` (examples, steps, uniform), told to clients in the plan."""

    def __init__(self, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting)

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan(weighting=self.weighting)

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """p_k = w_k / sum_j w_j over this round's replies, w_k by ``weighting``."""
        raw = [update_weight(u, self.weighting) for u in updates]
        total = sum(raw)
        if total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        return [w / total for w in raw]


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return weighting


def check_rank_cap(name: str, rank_cap: int) -> int:
    if rank_cap < 1:
        raise ValueError(f"{name}'s rank_cap must be at least 1")
    return rank_cap


def weighted_sum(tensors: Iterable[Tensor], weights: Iterable[float]) -> Tensor:
    """sum_k w_k t_k, accumulated in place in float32 (one output buffer, never a stack of K)."""
    acc: Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if acc is None:
            acc = t.to(torch.float32) * w
        else:
            acc.add_(t.to(torch.float32), alpha=w)
    if acc is None:
        raise ValueError("weighted_sum of no tensors")
    return acc


def require_updates(name: str, updates: Sequence[ClientUpdate]) -> None:
    if not updates:
        raise ValueError(f"strategy {name!r} was given no client updates to aggregate")
