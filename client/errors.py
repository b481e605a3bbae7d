"""What a failing client tells the server: a category, never the failure's own words.

A client's exception message can carry its private details (file paths, field names, label values:
``has labels ['refund'] not in data.labels``). Flower would send it verbatim in the error reply,
into the server's log and ``metrics.jsonl``. The ``private_errors`` mod, innermost around every
handler, logs the whole failure in the client's own log and replies with its category only.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.runtime import ExampleBudgetSpent
from client.secure import ProtocolError
from fedpeft.data import DataError
from fedpeft.instructions import InstructionDataError
from fedpeft.models import ModelError

log = logging.getLogger("fedpeft.client")

CATEGORIES: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((DataError, InstructionDataError), "data error"),
    ((ModelError,), "model error"),
    ((ExampleBudgetSpent,), "example-level privacy budget spent"),
    ((MemoryError, torch.OutOfMemoryError), "out of memory"),
)


class ClientFailure(RuntimeError):
    """The error a client replies with: a category; the details stay in the client's log."""


def category(exc: BaseException) -> str:
    """The category of a failure, as the server may read it. A secure aggregation protocol
    refusal keeps its words: they describe the server's request, not the client's data."""
    if isinstance(exc, ProtocolError):
        return f"secure aggregation refused: {exc}"
    for kinds, name in CATEGORIES:
        if isinstance(exc, kinds):
            return name
    return f"{type(exc).__name__} (details in the client's log)"


def private_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler; on failure, log it here and reply with its category only."""
    try:
        return call_next(msg, context)
    except Exception as exc:
        kind = category(exc)
        log.error("round failed (%s): %s", kind, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        raise ClientFailure(kind) from None  # no chained context: it would carry the message
