"""Deliberate misbehaviour, for checking the server's fault handling: Flower client mods that wrap
the ClientApp's ``train`` (the training code itself knows nothing of them).

- ``simulated_faults``, installed only by ``fedpeft simulate`` (``client.app.simulation_app``) from
  the run's ``[faults]`` (which never travels to clients): each sampled client fails a round with
  probability ``rate``, as one of ``kinds``, drawn from an RNG seeded by (run seed, round, partition
  id), so a run fails the same way every time (a retried round too); and the ``poisoned``
  partitions send every tensor as received + ``poison_scale`` x (trained - received).
- with ``availability_beta = [a, b]``, each partition is available with its own probability p_k
  (``availability``, drawn once from Beta(a, b)) and sits out a round it is sampled in with
  probability 1 - p_k (``unavailable``): it replies with an error, which the server drops as
  "simulated unavailability". This is the heterogeneous, unknown participation FedAU is for.
- ``injected_fault``, in the deployed ClientApp: a node setting ``inject-fault``
  (``fedpeft client --inject-fault nan|wrong-shape``) corrupts every update it sends, so an operator
  can watch the server reject it and carry on; without the setting it does nothing.

The simulated kinds:

- ``crash``: the client raises before training; Flower turns that into an error reply, which the
  server drops with its reason.
- ``timeout``: the client trains, then replies ``TIMEOUT_MARGIN`` seconds after the server's
  deadline (the round message's creation time + ``server.round_timeout``), when the server has
  stopped waiting: it is dropped as "no reply within", and its late reply is never read. In
  simulation the sleeping client holds its Ray worker until then (never into the next round): the
  round's other clients run on the remaining workers, so with W workers up to W - 1 late clients
  in a round leave the others unaffected, while W of them at once starve the clients still queued,
  which then miss the deadline too (``benchmarks/soak.py`` counts these).
- ``garbage``: the reply's records are malformed: random bytes in place of the arrays, truncated
  arrays, or a record missing.

Editing an update (poisoning, ``inject-fault``) decodes the reply and encodes it again, so it needs a
plain reply: the configuration refuses ``poisoned`` under secure aggregation.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from torch import Tensor

from client.settings import FAULT_KINDS, INJECT_FAULT
from fedpeft.config import FaultsSection
from fedpeft.secagg.messages import RECORD as SECAGG
from fedpeft.state import AdapterFactors, ClientUpdate
from fedpeft.wire import decode_instructions, decode_state, decode_update, encode_update

TIMEOUT_MARGIN = 1.0  # seconds past the server's deadline that a "timeout" client replies
UNAVAILABLE = "simulated unavailability (faults.availability_beta)"  # the reason a sitting-out client gives


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


def availability(faults: FaultsSection, seed: int, partition: int) -> float:
    """Partition ``partition``'s probability of being available in a round (1 without
    ``availability_beta``); the same in every process, so a benchmark can pass it to an oracle."""
    if faults.availability_beta is None:
        return 1.0
    return random.Random(f"fedpeft-availability/{seed}/{partition}").betavariate(*faults.availability_beta)


def unavailable(faults: FaultsSection, seed: int, rnd: int, partition: int) -> bool:
    """Whether partition ``partition`` sits out round ``rnd`` (drawn independently each round)."""
    p = availability(faults, seed, partition)
    return random.Random(f"fedpeft-unavailable/{seed}/{rnd}/{partition}").random() >= p


def simulated_faults(faults: FaultsSection, seed: int, round_timeout: float) -> Mod:
    """The mod that makes simulated clients misbehave as ``faults`` says."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        rnd = decode_instructions(msg.content).round
        partition = int(context.node_config["partition-id"])
        if unavailable(faults, seed, rnd, partition):  # a declined round, not a failure: no traceback
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, UNAVAILABLE), reply_to=msg)
        fault = simulated_fault(faults, seed, rnd, partition)
        if fault == "crash":
            raise SimulatedCrash("simulated crash (faults.rate in the run configuration)")
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if partition in faults.poisoned:
            reply.content = _edited(
                msg,
                reply.content,
                lambda u, factors, extras: _amplify(u, factors, extras, faults.poison_scale),
            )
        if fault == "garbage":
            rng = random.Random(f"fedpeft-garbage/{seed}/{rnd}/{partition}")
            rng.choice(GARBAGE)(reply.content, rng)
        if fault == "timeout":
            time.sleep(max(0.0, msg.metadata.created_at + round_timeout + TIMEOUT_MARGIN - time.time()))
        return reply

    return mod


def injected_fault(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The mod of a deployed client's ``inject-fault`` node setting: every update it sends is
    corrupted as the setting says (nothing without it)."""
    kind = context.node_config.get(INJECT_FAULT)
    if kind is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if kind not in UPDATE_FAULTS:
        raise ValueError(f"unknown inject-fault {kind!r}; use one of {', '.join(UPDATE_FAULTS)}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    reply.content = _edited(msg, reply.content, lambda update, *_: UPDATE_FAULTS[str(kind)](update))
    return reply


def _edited(msg: Message, content: RecordDict, edit: Callable[..., None]) -> RecordDict:
    """``content``, a plain reply to the train message ``msg``, decoded, edited by
    ``edit(update, received factors, received extras)`` and encoded again as the client had."""
    if SECAGG in msg.content:
        raise ValueError("a simulated or injected update fault needs plain replies, not secure aggregation")
    received = decode_state(msg.content)
    instructions = decode_instructions(msg.content)
    update = decode_update(content, frozen=received.adapter, frozen_extras=received.extras)
    edit(update, received.adapter or {}, received.extras)
    return encode_update(
        update,
        send_A=instructions.plan.send_lora_A,
        send_B=instructions.plan.send_lora_B,
        send_extras=instructions.plan.send_extras,
        compression=instructions.client_config.train.compression,
        reference=received.adapter,
        reference_extras=received.extras,
    )


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
