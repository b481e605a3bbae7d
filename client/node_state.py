"""What a client carries from one round to its next, kept in a file as well as in Flower's
``Context.state``, so that it survives a restart of the client's process and of the server.

Flower keeps ``Context.state`` in memory for one Flower run. A deployed SuperNode that restarts, or
a server resumed with ``--resume`` (a new Flower run: the restarted server starts the SuperNodes
again), would start from an empty one, and with it lose:
- FedSA's personal B and head (the client would restart from the global ones),
- the example-level DP step count (its epsilon would restart from zero: under-reported),
- compression's error-feedback residuals.
So after each training round the client writes these records to
``<state dir>/<client id>/<run key>.records`` (atomically: a crash leaves the previous file), and a
process that finds none of them in its ``Context.state`` reads them back first. The run key comes
with the server's instructions and is the same across ``--resume`` (``server.loop.run_key``): a new
run never inherits another's state. Flower's protobuf serialization of a ``RecordDict`` is the
format. Secure aggregation's per-round secrets are not in the list: they must not outlive their
round.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client.personal import PERSONAL_B, PERSONAL_EXTRAS
from client.runtime import EXAMPLE_DP_STEPS, client_id
from client.settings import STATE_DIR
from fedpeft.wire import decode_instructions
from fedpeft.wire.records import FEEDBACK

KEPT = (PERSONAL_B, PERSONAL_EXTRAS, EXAMPLE_DP_STEPS, FEEDBACK)
SUFFIX = ".records"
RUN_KEY = re.compile(r"[0-9a-f]{1,64}")  # what ``server.loop.run_key`` draws: nothing that walks a path


class BadRunKey(ValueError):
    """A server's run key that cannot name a file."""


def state_file(root: Path, client: str, run_key: str) -> Path:
    """Where ``client`` keeps its state for the run ``run_key`` (a name the server chose: checked)."""
    if not RUN_KEY.fullmatch(run_key):
        raise BadRunKey(f"the server sent run key {run_key[:80]!r}, not 1 to 64 lowercase hex digits")
    return root / client / f"{run_key}{SUFFIX}"


def load(path: Path, node_state: RecordDict) -> None:
    """Put the records saved in ``path`` into ``node_state`` (nothing if there is no file)."""
    if not path.is_file():
        return
    saved = recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
    for key, record in saved.items():
        node_state[key] = record


def save(path: Path, node_state: RecordDict) -> None:
    """Write the ``KEPT`` records of ``node_state`` to ``path``, atomically; nothing if it has none."""
    kept = RecordDict({key: node_state[key] for key in KEPT if key in node_state})
    if not kept:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    with staging.open("wb") as f:
        f.write(recorddict_to_proto(kept).SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def kept_state(root: Path | None = None) -> Mod:
    """The mod that keeps a client's ``KEPT`` records in a file under ``root`` (a simulation's run
    directory), or under its node setting ``state-dir`` (a deployed client; ``fedpeft client
    --state-dir``); with neither, or before a server that sends no run key, it does nothing."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        directory = root or context.node_config.get(STATE_DIR)
        if msg.metadata.message_type != MessageType.TRAIN or not directory:
            return call_next(msg, context)
        run_key = decode_instructions(msg.content).run_key
        if not run_key:
            return call_next(msg, context)
        path = state_file(Path(str(directory)), client_id(context), run_key)
        if not any(key in context.state for key in KEPT):
            load(path, context.state)  # a fresh process (a restart): pick up where this client was
        reply = call_next(msg, context)
        if not reply.has_error():
            save(path, context.state)
        return reply

    return mod
