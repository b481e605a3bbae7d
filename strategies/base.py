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
    weighted sum of the client updates, so DP and secure aggregation may wrap it) and
    ``last_metrics`` (dict of floats describing the last aggregation, logged per round).
    """

    name: str

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan: ...

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
