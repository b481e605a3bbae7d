"""The strategy interface: an aggregation rule as pure tensor math over ``fedpeft.state``
values, no Flower. A rule subclasses ``Strategy`` and implements ``aggregate``; every other method
has a default, overridden only when the rule needs it (see ``docs/strategies.md``)."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fedpeft.state import WEIGHTINGS, ClientPlan, ClientUpdate, GlobalState, split_trained, update_weight
from strategies.accumulate import Probe


class StopFederation(Exception):
    """Raised by ``client_instructions`` when no further round may run (e.g. a privacy budget
    would be exceeded). The server ends the run cleanly with this message."""


class Accumulator(Protocol):
    """One round's aggregation, folding client updates in one at a time.

    ``add`` keeps nothing of the update it is given beyond running sums, so a server that frees
    each reply after ``add`` holds O(adapter) memory for any number of clients.
    """

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> GlobalState: ...


@runtime_checkable
class ProbedAccumulator(Accumulator, Protocol):
    """An accumulator that can take an update before the server has judged it, measuring it in the
    same pass over its bytes as the fold (``strategies.accumulate.Probe``), and take it back if the
    server refuses it (``strategies.fedavg.FactorAverage``). The server offers this to a streaming
    rule whose accumulator has these methods; no rule needs them."""

    def add_probed(self, update: ClientUpdate, probe: Probe) -> bool: ...

    def fold_held(self) -> None: ...

    def settle(self, update: ClientUpdate, probe: Probe, accepted: bool) -> None: ...


class ForwardsProbes:
    """For an accumulator that wraps another (``inner``): ``ProbedAccumulator``'s methods, handed
    to the inner one where it has them (``add_probed`` is False where it has not)."""

    inner: Accumulator | None

    @functools.cached_property
    def _probed(self) -> ProbedAccumulator | None:
        return self.inner if isinstance(self.inner, ProbedAccumulator) else None

    def add_probed(self, update: ClientUpdate, probe: Probe) -> bool:
        return self._probed is not None and self._probed.add_probed(update, probe)

    def fold_held(self) -> None:
        if self._probed is not None:
            self._probed.fold_held()

    def settle(self, update: ClientUpdate, probe: Probe, accepted: bool) -> None:
        assert self._probed is not None, "settle() follows an add_probed() that returned True"
        self._probed.settle(update, probe, accepted)


class Strategy(ABC):
    """An aggregation rule: ``aggregate`` turns a round's client updates into the next global state.

    Class attributes the server reads:
    - ``name``: the registry name;
    - ``linear``: the aggregate depends on the updates only through their weighted mean, so
      ``dp`` may wrap the rule and secure aggregation may serve it (``aggregate_sum``);
    - ``private``: the rule samples its own clients (``select_clients``), each round runs once
      with whatever arrives, and nothing per client is logged (``dp``).
    - ``mixed_ranks``: clients may train at ranks up to the global adapter's, each starting from
      its leading components (``AdapterFactors.truncated``; ``hetlora``, ``flexlora``); their
      updates arrive at their own rank and scale.
    ``last_metrics`` (floats describing the last aggregation) is logged each round.
    """

    name: str = "strategy"
    linear: bool = False
    private: bool = False
    mixed_ranks: bool = False
    last_metrics: Mapping[str, float] = MappingProxyType({})

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        """What clients do in round ``rnd`` beyond applying ``state`` (default: train and send A and
        B; weigh by examples under secure aggregation)."""
        return ClientPlan()

    def initial_state(self, state: GlobalState, seed: int) -> GlobalState:
        """The state round 1 sends, from the clients' seeded initial adapter ``state`` (``seed``: the
        run's, for anything random the rule adds). Default: ``state`` itself."""
        return state

    @abstractmethod
    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        """The next global state from ``state`` (what the clients started from) and their updates."""

    def start(self, rnd: int, state: GlobalState) -> Accumulator | None:
        """A fold of the round's updates one at a time, for rules that can (the server then frees
        each reply as it arrives: O(adapter) memory); None (the default): the server collects the
        updates for one ``aggregate``."""
        return None

    def aggregate_sum(
        self, rnd: int, state: GlobalState, summed: dict[str, Tensor], weight: float
    ) -> GlobalState:
        """The round's result from only the sum of the clients' contributions, as secure
        aggregation reveals it: each client's trained tensors (``fedpeft.state.trained_tensors``)
        times its weight, and the sum of the weights. The default, for a ``linear`` rule, hands the
        weighted mean to ``aggregate`` as one virtual client."""
        if not self.linear:
            raise TypeError(f"strategy {self.name!r} is not linear: it cannot aggregate a sum")
        if weight <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        assert state.adapter is not None, "secure aggregation needs the global adapter"
        factors, extras = split_trained({key: t / weight for key, t in summed.items()}, state.adapter)
        extras = {**state.extras, **extras}  # what the clients did not send (a frozen head): the global
        first = next(iter(factors.values()))
        virtual = ClientUpdate(factors, extras, 1, rnd, first.rank, first.scale * first.rank, num_trained=1)
        return self.aggregate(rnd, state, [virtual])

    @property
    def secure_clip_norm(self) -> float:
        """Under secure aggregation, the L2 bound each client clips its delta from the global state
        to before it is summed (``dp``'s clipping norm); 0 (the default): clients send their
        weighted update."""
        return 0.0

    def select_clients(self, rnd: int, candidates: list[int]) -> list[int] | None:
        """The clients to train in round ``rnd`` among the connected ``candidates``; None (the
        default): the server samples ``server.fraction`` of them."""
        return None

    def empty_round(self, rnd: int) -> None:  # noqa: B027 (a default, not abstract)
        """Round ``rnd`` passed without a valid reply (``server.min_replies = 0``): the global state
        stays as it was. A strategy that counts rounds (FedAU's participation intervals) counts it."""

    def state_dict(self) -> dict[str, Any]:
        """What a restarted server needs to continue exactly: nested dicts of tensors and scalars
        (saved with the checkpoint). Default: nothing (a stateless rule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a default, not abstract)
        """Restore ``state_dict``'s output."""


def aggregate_stream(
    strategy: Strategy, rnd: int, state: GlobalState, updates: Iterable[ClientUpdate]
) -> GlobalState:
    """``aggregate`` on top of ``start``: one code path for the batch and the streaming server."""
    accumulator = strategy.start(rnd, state)
    assert accumulator is not None, f"strategy {strategy.name!r} does not stream"
    for update in updates:
        accumulator.add(update)
    return accumulator.result()


class WeightedStrategy(Strategy):
    """A rule that weighs its clients: ``weighting`` is one of ``fedpeft.state.WEIGHTINGS``
    (examples, steps, uniform), told to clients in the plan."""

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
