"""Deliberate misbehaviour, for checking the server's fault handling.

Two ways in, one mechanism (a ``Misbehaviour`` per round, which the ClientApp applies):

- a deployed client's node setting ``inject-fault`` (``fedpeft client --inject-fault nan|wrong-shape``)
  corrupts every update it sends, so an operator can watch the server reject it and carry on;
- a simulation's ``[faults]`` section makes each sampled client fail a round with probability
  ``rate``, as one of ``kinds``, drawn from an RNG seeded by (run seed, round, partition id), so a
  run fails the same way every time (a retried round too); and it makes the ``poisoned``
  partitions send every tensor as received + ``poison_scale`` x (trained - received).

The simulated kinds:

- ``crash``: the ClientApp raises before training; Flower turns that into an error reply, which
  the server drops with its reason.
- ``timeout``: the client trains, then replies ``TIMEOUT_MARGIN`` seconds after the server's
  deadline (the round message's creation time + ``server.round_timeout``), when the server has
  stopped waiting: it is dropped as "no reply within", and its late reply is never read. In
  simulation the sleeping client holds its Ray worker until then (never into the next round): the
  round's other clients run on the remaining workers, so with W workers up to W - 1 late clients
  in a round leave the others unaffected, while W of them at once starve the clients still queued,
  which then miss the deadline too (``benchmarks/soak.py`` counts these).
- ``garbage``: the reply's records are malformed: random bytes in place of the arrays, truncated
  arrays, or a record missing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, Context, RecordDict
from torch import Tensor

from client import runtime
from client.settings import FAULT_KINDS, INJECT_FAULT
from fedpeft.config import ClientConfig, FaultsSection
from fedpeft.lora import AdapterHost
from fedpeft.state import AdapterFactors, ClientUpdate

TIMEOUT_MARGIN = 1.0  # seconds past the server's deadline that a "timeout" client replies


class SimulatedCrash(RuntimeError):
    """What a client with a simulated ``crash`` fault raises."""


def _nan(update: ClientUpdate) -> None:
    first = next(iter(update.factors.values()))
    first.B = first.B.clone()
    first.B[0, 0] = float("nan")


def _wrong_shape(update: ClientUpdate) -> None:
    first = next(iter(update.factors.values()))
    first.B = first.B.new_zeros(first.B.shape[0] + 1, first.B.shape[1])


UPDATE_FAULTS: dict[str, Callable[[ClientUpdate], None]] = dict(
    zip(FAULT_KINDS, (_nan, _wrong_shape), strict=True)
)


def _random_bytes(content: RecordDict, rng: random.Random) -> None:
    arrays = content.array_records
    for name, record in arrays.items():
        arrays[name] = ArrayRecord({k: _with_data(a, rng.randbytes(len(a.data))) for k, a in record.items()})


def _truncated(content: RecordDict, rng: random.Random) -> None:
    arrays = content.array_records
    for name, record in arrays.items():
        arrays[name] = ArrayRecord({k: _with_data(a, a.data[: len(a.data) // 2]) for k, a in record.items()})


def _missing_record(content: RecordDict, rng: random.Random) -> None:
    del content[rng.choice(sorted(content.keys()))]


def _with_data(array: Array, data: bytes) -> Array:
    return Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=data)


GARBAGE: tuple[Callable[[RecordDict, random.Random], None], ...] = (
    _random_bytes,
    _truncated,
    _missing_record,
)


def simulated_fault(faults: FaultsSection, seed: int, rnd: int, partition: int) -> str | None:
    """The fault partition ``partition`` simulates in round ``rnd`` (``None``: it behaves); the same
    in every process and run, so a benchmark can tell which drops to expect."""
    rng = random.Random(f"fedpeft-faults/{seed}/{rnd}/{partition}")  # str seeds hash with SHA-512
    if rng.random() >= faults.rate:
        return None
    return rng.choice(faults.kinds)


@dataclass
class Misbehaviour:
    """What one client does wrong in one round; the default does nothing."""

    fault: str | None = None
    poison_scale: float | None = None
    reply_at: float = 0.0  # when a late (``timeout``) client replies, as a ``time.time()``
    rng: random.Random | None = None
    _received: tuple[dict[str, AdapterFactors], dict[str, Tensor]] | None = field(
        default=None, init=False, repr=False
    )

    def start(self, host: AdapterHost) -> None:
        """Call once the received state is loaded, before training."""
        if self.fault == "crash":
            raise SimulatedCrash("simulated crash (faults.rate in the run configuration)")
        self._received = host.read_update() if self.poison_scale is not None else None

    def edit_update(self, update: ClientUpdate) -> None:
        """Amplify (poisoned client) or corrupt (``inject-fault``) the trained update in place."""
        if self._received is not None:
            _amplify(update, *self._received, self.poison_scale)  # type: ignore[arg-type]
        if self.fault in UPDATE_FAULTS:
            UPDATE_FAULTS[self.fault](update)

    def edit_reply(self, content: RecordDict) -> RecordDict:
        """Malform the encoded reply (``garbage``), or hold it until after the deadline (``timeout``)."""
        if self.fault == "garbage":
            rng = self.rng or random.Random()
            rng.choice(GARBAGE)(content, rng)
        if self.fault == "timeout":
            time.sleep(max(0.0, self.reply_at - time.time()))
        return content


def _amplify(
    update: ClientUpdate,
    factors: dict[str, AdapterFactors],
    extras: dict[str, Tensor],
    scale: float,
) -> None:
    """Every tensor becomes received + scale x (trained - received)."""
    for name, f in update.factors.items():
        f.A = factors[name].A + scale * (f.A - factors[name].A)
        f.B = factors[name].B + scale * (f.B - factors[name].B)
    for name, t in update.extras.items():
        update.extras[name] = extras[name] + scale * (t - extras[name])


def for_round(config: ClientConfig, rnd: int, sent_at: float, context: Context) -> Misbehaviour:
    """This client's misbehaviour in round ``rnd`` (whose message the server created at
    ``sent_at``, a ``time.time()``): its ``inject-fault`` node setting when deployed, the
    ``[faults]`` draw in simulation."""
    faults = config.faults
    if runtime.is_deployed(context):
        faults.refuse_deployment()
        kind = context.node_config.get(INJECT_FAULT)
        if kind is not None and kind not in UPDATE_FAULTS:
            raise ValueError(f"unknown inject-fault {kind!r}; use one of {', '.join(UPDATE_FAULTS)}")
        return Misbehaviour(fault=None if kind is None else str(kind))
    partition = int(context.node_config["partition-id"])
    return Misbehaviour(
        fault=simulated_fault(faults, config.seed, rnd, partition),
        poison_scale=faults.poison_scale if partition in faults.poisoned else None,
        reply_at=sent_at + config.round_timeout + TIMEOUT_MARGIN,
        rng=random.Random(f"fedpeft-garbage/{config.seed}/{rnd}/{partition}"),
    )
