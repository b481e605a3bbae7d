"""Deliberate misbehaviour, for checking a deployment's fault handling (node setting ``inject-fault``).

``fedpeft client --inject-fault KIND`` makes an otherwise honest client corrupt its reply, so an
operator can see the server reject it with the reason and carry on with the others.
"""

from __future__ import annotations

import torch

from client.settings import FAULT_KINDS
from fedpeft.state import ClientUpdate


def _nan(update: ClientUpdate) -> None:
    first = next(iter(update.factors.values()))
    first.B = first.B.clone()
    first.B[0, 0] = float("nan")


def _wrong_shape(update: ClientUpdate) -> None:
    first = next(iter(update.factors.values()))
    first.B = torch.zeros(first.B.shape[0] + 1, first.B.shape[1])


FAULTS = dict(zip(FAULT_KINDS, (_nan, _wrong_shape), strict=True))


def inject_fault(update: ClientUpdate, kind: object) -> None:
    """Corrupt ``update`` in place as ``kind`` says (``None``: leave it honest)."""
    if kind is None:
        return
    if kind not in FAULTS:
        raise ValueError(f"unknown inject-fault {kind!r}; use one of {', '.join(FAULTS)}")
    FAULTS[str(kind)](update)
