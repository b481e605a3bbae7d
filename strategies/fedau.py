"""FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
Averaging", ICLR 2024): FedAvg that weighs each participating client by an online estimate of
1 / (its participation probability), so that clients who take part rarely count as much as those
who take part often, without knowing anyone's probability.

With N clients in the population, S_t those whose updates arrived in round t, x_t the global
state they started from and x_n their trained tensors (A, B and the dense extras, each averaged
separately as fedavg does):

    x_{t+1} = x_t + server_lr / N * sum_{n in S_t} w_n (x_n - x_t)

w_n is the mean of client n's participation intervals seen so far (rounds from one participation
to the next, an interval closed after ``cutoff`` rounds without one), 1 before any is seen. After
the round, each participant closes an interval of (rounds since its last participation + 1), and
each known absentee counts one more round without. A client first heard of in round t is taken to
have been absent since round 1, as the authors' code tracks every client from the start. This is
their ``weighting_method = 'adaptive'`` (``main.py`` of github.com/IBM/fedau), including that a
round's intervals are recorded after its weights are used.

A round in which no client takes part (``server.min_replies = 0``: the server passes it) makes no
step and counts as a round every known client was absent (``empty_round``), as in the authors' loop.

With ``probabilities`` (client id -> p), w_n = 1 / p_n instead: the paper's "known participation
probabilities" oracle. Clients are told apart by their stable id (``ClientUpdate.client_id``),
so the estimates survive reconnects and resumes (they are in ``state_dict``).

Not linear in the sense of ``Strategy.linear``: the weights are per client and known only to the
server, so neither secure aggregation nor ``dp`` can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, split_trained, trained_tensors
from strategies.accumulate import WeightedSum
from strategies.base import Strategy, aggregate_stream, require_updates
from strategies.fedavg import check_same_ranks
from strategies.registry import StrategyError


@dataclass
class Participation:
    """One client's participation history: the running mean of its closed intervals."""

    mean_interval: float = 0.0
    intervals: int = 0
    absent: int = 0  # rounds since its last participation (or the last interval closed at the cutoff)

    def close(self, interval: int) -> None:
        self.mean_interval += (interval - self.mean_interval) / (self.intervals + 1)
        self.intervals += 1
        self.absent = 0


class FedAU(Strategy):
    """FedAvg weighted by online estimates of each client's 1 / participation probability."""

    name = "fedau"

    def __init__(
        self,
        num_clients: int,
        cutoff: int = 50,
        server_lr: float = 1.0,
        probabilities: dict[str, float] | None = None,
    ) -> None:
        if num_clients < 1:
            raise StrategyError("fedau's num_clients (the population N) must be at least 1")
        if cutoff < 1:
            raise StrategyError("fedau's cutoff (K, the longest interval it records) must be at least 1")
        if server_lr <= 0:
            raise StrategyError("fedau's server_lr must be positive")
        if probabilities and not all(0 < p <= 1 for p in probabilities.values()):
            raise StrategyError("fedau's probabilities must each be in (0, 1]")
        self.num_clients, self.cutoff, self.server_lr = num_clients, cutoff, server_lr
        self.probabilities = dict(probabilities or {})
        self.clients: dict[str, Participation] = {}

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan(weighting="uniform")

    def weight(self, client: str, rnd: int) -> float:
        """w_n for round ``rnd``: 1 / p_n when known, else the mean interval (1 before any)."""
        if client in self.probabilities:
            return 1.0 / self.probabilities[client]
        history = self._history(client, rnd)
        return history.mean_interval if history.intervals else 1.0

    def _history(self, client: str, rnd: int) -> Participation:
        """Client ``client``'s history; one first seen in round ``rnd`` has been absent since round 1
        (intervals of ``cutoff`` closed on the way, as if it had been tracked all along)."""
        if client not in self.clients:
            history = Participation()
            for _ in range((rnd - 1) // self.cutoff):
                history.close(self.cutoff)
            history.absent = (rnd - 1) % self.cutoff
            self.clients[client] = history
        return self.clients[client]

    def record(self, rnd: int, participants: set[str]) -> None:
        """After round ``rnd``: participants close an interval, known absentees count a round."""
        for client in participants:
            self._history(client, rnd)
        for client, history in self.clients.items():
            if client in participants:
                history.close(history.absent + 1)
                continue
            history.absent += 1
            if history.absent >= self.cutoff:
                history.close(history.absent)

    def empty_round(self, rnd: int) -> None:
        """A round no client took part in: every known client was absent (no step, as in the paper)."""
        self.record(rnd, set())

    def start(self, rnd: int, state: GlobalState) -> UnbiasedStep:
        if state.adapter is None:
            raise StrategyError(
                "fedau steps from the global adapter the clients started from (one LoRA rank for all, "
                "lora.init = 'shared')"
            )
        return UnbiasedStep(self, rnd, state)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        return aggregate_stream(self, rnd, state, updates)

    def state_dict(self) -> dict[str, Any]:
        return {
            "clients": {
                client: {"mean_interval": h.mean_interval, "intervals": h.intervals, "absent": h.absent}
                for client, h in self.clients.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clients = {
            client: Participation(float(h["mean_interval"]), int(h["intervals"]), int(h["absent"]))
            for client, h in state["clients"].items()
        }


class UnbiasedStep:
    """The round's fold: sum_n w_n x_n and sum_n w_n, then x_t + lr (sum w / N) (mean_w - x_t),
    which is x_t + lr / N sum_n w_n (x_n - x_t)."""

    def __init__(self, strategy: FedAU, rnd: int, state: GlobalState) -> None:
        self.strategy, self.rnd, self.state = strategy, rnd, state
        self.sum = WeightedSum()
        self.participants: set[str] = set()
        self.ranks: set[tuple[int, float]] = set()

    def add(self, update: ClientUpdate) -> None:
        if update.client_id in self.participants:
            raise ValueError(f"fedau got two updates from client {update.client_id!r} in one round")
        self.ranks.add((update.rank, update.alpha))
        check_same_ranks(self.strategy.name, self.ranks)
        self.participants.add(update.client_id)
        weight = self.strategy.weight(update.client_id, self.rnd)
        self.sum.add(trained_tensors(update.factors, update.extras, trains_A=True), weight)

    def result(self) -> GlobalState:
        if self.sum.count == 0:
            raise ValueError("strategy 'fedau' was given no client updates to aggregate")
        assert self.state.adapter is not None
        strategy = self.strategy
        coefficient = strategy.server_lr * self.sum.total * self.sum.unit / strategy.num_clients
        current = trained_tensors(self.state.adapter, self.state.extras, trains_A=True)
        stepped = {}
        for key, mean in self.sum.mean().items():
            x = current[key].float()
            stepped[key] = x + coefficient * (mean - x)
        strategy.record(self.rnd, self.participants)
        strategy.last_metrics = {"fedau_weight_sum": self.sum.total * self.sum.unit}
        factors, extras = split_trained(stepped, self.state.adapter)
        return GlobalState(round=self.rnd, merged=self.state.merged, adapter=factors, extras=extras)
