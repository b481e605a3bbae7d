"""The strategy interface: pure tensor math over ``fedpeft.state`` values, no Flower."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fedpeft.state import ClientPlan, ClientUpdate, GlobalState


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


class WeightedSum:
    """Running weighted sum ``sum_k w_k t_k`` over named float32 tensors, and ``sum_k w_k``.

    Raw weights (example counts), not normalized ones, are what lets replies be folded before the
    total is known; ``mean`` divides once at the end. Weights are taken relative to the first
    one, so a single update (or equal weights) averages to exactly itself. Each ``add`` is one
    fused ``torch._foreach_add_`` over all tensors (the multi-tensor kernel torch's own optimizers
    use): many small LoRA factors cost one call, not one Python-level op each.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.total = 0.0
        self.count = 0
        self.unit = 1.0

    def add(self, tensors: dict[str, Tensor], weight: float) -> None:
        if self.count == 0:
            self.unit = weight if weight > 0 else 1.0
            self.sums = {k: t.to(torch.float32, copy=True) for k, t in tensors.items()}
            if weight != self.unit:
                torch._foreach_mul_(list(self.sums.values()), weight / self.unit)
        else:
            if tensors.keys() != self.sums.keys():
                raise ValueError("an update's tensors differ from the first update's")
            incoming = [tensors[k].to(torch.float32) for k in self.sums]
            torch._foreach_add_(list(self.sums.values()), incoming, alpha=weight / self.unit)
        self.total += weight / self.unit
        self.count += 1

    def mean(self) -> dict[str, Tensor]:
        """``sum_k w_k t_k / sum_k w_k``; the sums are consumed (divided in place)."""
        if self.total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        torch._foreach_div_(list(self.sums.values()), self.total)
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


def check_rank_cap(name: str, rank_cap: int) -> int:
    if rank_cap < 1:
        raise ValueError(f"{name}'s rank_cap must be at least 1")
    return rank_cap


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j over this round's replies."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("cannot aggregate: the replies report no training examples in total")
    return [u.num_examples / total for u in updates]


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
