"""The strategy interface: pure tensor math over ``fedpeft.state`` values, no Flower."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fedpeft.state import ClientPlan, ClientUpdate, GlobalState


@runtime_checkable
class Strategy(Protocol):
    """An aggregation rule. See DESIGN.md §4 and ``docs/strategies.md``."""

    name: str

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan: ...

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
