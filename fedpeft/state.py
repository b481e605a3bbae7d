"""The value types that flow between clients and server.

Pure tensors and plain Python values: no Flower, no model. Conventions: for an
adapted module with base weight W0 of shape (d_out, d_in), a LoRA adapter holds A (r x d_in) and
B (d_out x r) with delta ``scale * B @ A``; the frozen ``merged`` delta holds U (d_out x R) and
V (R x d_in) with delta ``U @ V``. A client's effective weight is ``W0 + U V + scale * B A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from torch import Tensor

# How a weighted rule weighs client k (``update_weight``):
# - "examples": n_k, the rows the client holds (the objective sum_k n_k f_k / n, as FedAvg defines it);
# - "steps": the examples the client actually trained on this round (batch x steps);
# - "uniform": 1 for every client.
WEIGHTINGS = ("examples", "steps", "uniform")


@dataclass(frozen=True)
class ClientPlan:
    """What a strategy asks clients to do this round, beyond applying the global state.

    ``weighting`` is the strategy's weighting (``WEIGHTINGS``): a client under secure aggregation
    weighs its masked summand with it, since the server never sees the update alone.
    """

    train_lora_A: bool = True
    send_lora_A: bool = True
    train_lora_B: bool = True  # a B that is not trained is not sent either
    personal_B: bool = False  # B stays on each client across rounds; only A (and extras) travel
    personal_extras: bool = False  # the dense extras (a head) stay on each client too
    train_extras: bool = True  # False (train.freeze_head): the extras stay at the global ones, unsent
    weighting: str = "examples"
    # Instead of training, send a sketch of G, the mean loss gradient w.r.t. each adapted base
    # weight (Fed-SB's initialisation, strategies/fedsb.py): "range" sends B := G Aᵀ, "project"
    # sends A := Bᵀ G; "" (the default): train.
    init_gradient: str = ""
    # Server side, not sent: ask the clients whose replies made the previous round's result, not a
    # fresh sample (Fed-SB's project round must sketch the gradient its range round sketched).
    same_clients: bool = False
    options: dict[str, bool | int | float | str] = field(default_factory=dict)

    @property
    def send_lora_B(self) -> bool:
        """Whether clients send B: when they train it and keep no personal one."""
        return self.train_lora_B and not self.personal_B

    @property
    def send_extras(self) -> bool:
        """Whether clients send the dense extras: when they train them and keep no personal ones."""
        return self.train_extras and not self.personal_extras


class FactorShapes(NamedTuple):
    """One module's factor shapes: what the server checks of a reply's layout, known without
    building per-module views of a reply that decoded whole."""

    A: tuple[int, ...]
    B: tuple[int, ...]
    R: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        return self.A[0]


@dataclass
class AdapterFactors:
    """One module's LoRA factors: ``delta = scale * B @ A``, or with LoRA-SB's r x r core ``R``
    (Fed-SB: A and B frozen, only R trained) ``delta = scale * B @ R @ A``."""

    A: Tensor
    B: Tensor
    scale: float
    R: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def outer_B(self) -> Tensor:
        """B, or B R with a core: the B of the standard LoRA adapter with the same delta."""
        return self.B if self.R is None else self.B @ self.R

    def delta(self) -> Tensor:
        return self.scale * (self.outer_B() @ self.A)

    def delta_norm(self) -> float:
        """||delta||_F in factored form, s sqrt(<Bᵀ B, A Aᵀ>) with B R for B under a core: two
        r x r products, never the d_out x d_in delta."""
        B = self.outer_B()
        gram = float((B.T @ B).mul_(self.A @ self.A.T).sum())
        return abs(self.scale) * math.sqrt(max(gram, 0.0))

    def truncated(self, rank: int, scale: float) -> AdapterFactors:
        """The leading ``rank`` components at LoRA scale ``scale``: A's first rows and B's first
        columns, B rescaled so that ``scale B' A' = self.scale B[:, :rank] A[:rank]``. What a client
        of a smaller rank starts from under the strategies that allow mixed ranks (HetLoRA,
        FlexLoRA)."""
        if rank > self.rank:
            raise ValueError(f"cannot truncate a rank-{self.rank} adapter to rank {rank}")
        if self.R is not None:
            raise ValueError("an adapter with a LoRA-SB core cannot be truncated to a smaller rank")
        if rank == self.rank and scale == self.scale:
            return self
        return AdapterFactors(A=self.A[:rank].clone(), B=self.B[:, :rank] * (self.scale / scale), scale=scale)


@dataclass
class LowRankDelta:
    """A frozen low-rank weight delta ``U @ V`` kept factored."""

    U: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    def delta(self) -> Tensor:
        return self.U @ self.V


@dataclass(frozen=True, eq=False)  # one object per wire layout, compared by identity
class SpanLayout:
    """Named tensors of the given shapes laid back to back in one 1-D buffer, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.sizes[:i]) for i in range(len(self.sizes)))

    @property
    def numel(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class FlatTensors:
    """What a client trained (``trained_tensors``' names and order) as one 1-D float32 ``span``,
    as ``fedpeft.wire`` decodes a float32 reply in place: a streaming fold takes it in one op."""

    layout: SpanLayout
    span: Tensor


@dataclass
class ClientUpdate:
    """What one client sends back after a round of local training.

    ``num_examples`` is the size of the client's training data; ``num_trained`` the examples it
    trained on this round (local steps x batch size, fewer for a client with less than a batch).
    ``flat``, when set, holds the trained tensors whole (the factors and extras are views of it).
    """

    factors: Mapping[str, AdapterFactors]
    extras: dict[str, Tensor]
    num_examples: int
    round: int
    rank: int
    alpha: float
    metrics: dict[str, float] = field(default_factory=dict)
    client_id: str = ""  # stable across reconnects and resumes (client/runtime.py client_id), not a node id
    num_trained: int = 0
    flat: FlatTensors | None = None

    def scales(self) -> dict[str, float]:
        """Each module's LoRA scale (a decoded reply knows them without building its factors)."""
        known = getattr(self.factors, "scales", None)
        return dict(known) if known is not None else {m: f.scale for m, f in self.factors.items()}

    def factor_shapes(self) -> dict[str, FactorShapes]:
        """Each module's factor shapes (a decoded reply knows them without building its factors)."""
        known = getattr(self.factors, "shapes", None)
        if known is not None:
            return known()
        return {
            m: FactorShapes(tuple(f.A.shape), tuple(f.B.shape), None if f.R is None else tuple(f.R.shape))
            for m, f in self.factors.items()
        }


@dataclass
class GlobalState:
    """What the server owns and sends each round.

    ``adapter`` is ``None`` when clients must start from a fresh (seeded) LoRA init.
    ``strategy_state`` is opaque to everything but the strategy that wrote it.
    """

    round: int = 0
    merged: dict[str, LowRankDelta] = field(default_factory=dict)
    adapter: dict[str, AdapterFactors] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    strategy_state: dict[str, Any] = field(default_factory=dict)

    def module_names(self) -> list[str]:
        names = set(self.merged) | set(self.adapter or {})
        return sorted(names)


def update_weight(update: ClientUpdate, weighting: str) -> float:
    """The raw (unnormalised) weight of ``update`` under ``weighting`` (one of ``WEIGHTINGS``)."""
    if weighting == "examples":
        return float(update.num_examples)
    if weighting == "steps":
        if update.num_trained <= 0:
            raise ValueError("weighting 'steps' needs the examples each client trained on (num_trained)")
        return float(update.num_trained)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def trained_tensors(
    factors: dict[str, AdapterFactors], extras: dict[str, Tensor], trains_A: bool, trains_B: bool = True
) -> dict[str, Tensor]:
    """What a client trained, named and ordered as ``fedpeft.wire`` lays a reply out: per module
    ``A/<module>`` (when A is trained), ``B/<module>`` (when B is), ``R/<module>`` (a LoRA-SB
    core, always trained), then ``extra/<name>``."""
    out: dict[str, Tensor] = {}
    for module, f in factors.items():
        if trains_A:
            out[f"A/{module}"] = f.A
        if trains_B:
            out[f"B/{module}"] = f.B
        if f.R is not None:
            out[f"R/{module}"] = f.R
    out.update({f"extra/{k}": t for k, t in extras.items()})
    return out


def split_trained(
    tensors: dict[str, Tensor], template: dict[str, AdapterFactors]
) -> tuple[dict[str, AdapterFactors], dict[str, Tensor]]:
    """The inverse of ``trained_tensors``: per module of ``template``, each of A, B and the core R
    from ``tensors`` when they hold it, else the template's (a frozen factor); the scale from the
    template; and the extras."""
    factors = {
        module: AdapterFactors(
            A=tensors.get(f"A/{module}", f.A),
            B=tensors.get(f"B/{module}", f.B),
            scale=f.scale,
            R=tensors.get(f"R/{module}", f.R),
        )
        for module, f in template.items()
    }
    extras = {k.removeprefix("extra/"): t for k, t in tensors.items() if k.startswith("extra/")}
    return factors, extras


def started_from(update: ClientUpdate, adapter: dict[str, AdapterFactors]) -> dict[str, AdapterFactors]:
    """The adapter ``update``'s client started from: each module of the global ``adapter``,
    truncated to the update's rank and scale where the client trains at a smaller rank."""
    return {
        name: adapter[name].truncated(f.rank, f.scale) if f.rank < adapter[name].rank else adapter[name]
        for name, f in update.factors.items()
    }
