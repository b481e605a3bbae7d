"""The server's side of CCVR after the last round: ask every client for its per-class moments of the
head's input, pool them, and retrain the head on virtual features (``fedpeft.calibration``)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.calibration import ClassMoments, calibrated_head
from fedpeft.config import CalibrationSection
from fedpeft.state import GlobalState
from fedpeft.wire import WireError, decode_moments
from server.replies import client_error, receive

MESSAGE_TYPE = "query.calibration"


class CalibrationFailed(RuntimeError):
    """No client answered the calibration query with usable moments."""


@dataclass
class Calibration:
    """What a calibration did: the clients whose moments were pooled, and why others were not."""

    clients: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, rnd: int) -> dict[str, Any]:
        """Its ``metrics.jsonl`` row (after round ``rnd``'s own)."""
        return {"round": rnd, "calibration": "ccvr", "calibration_clients": self.clients,
                "calibration_seconds": round(self.seconds, 2), "dropped": self.dropped}  # fmt: skip


def calibrate(
    grid: Grid,
    nodes: dict[int, str],
    content: Any,
    state: GlobalState,
    settings: CalibrationSection,
    seed: int,
    timeout: float,
) -> tuple[GlobalState, Calibration]:
    """Send ``content`` (the global state and instructions) to ``nodes`` (node id -> client id),
    pool the moments they reply with, and return the state with its head retrained."""
    started = time.perf_counter()
    messages = [Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=n) for n in nodes]
    total: ClassMoments | None = None
    head: str | None = None
    outcome = Calibration()
    unanswered = set(nodes)
    for reply in receive(grid, messages, timeout):
        node = reply.metadata.src_node_id
        unanswered.discard(node)
        try:
            name, moments = _decode(reply, state)
        except (WireError, ValueError) as exc:
            outcome.dropped.append({"client": nodes[node], "reason": str(exc)})
            continue
        if head not in (None, name):
            outcome.dropped.append({"client": nodes[node], "reason": f"moments of head {name}, not {head}"})
            continue
        head, total = name, moments if total is None else total + moments
        outcome.clients += 1
    outcome.dropped += [{"client": nodes[n], "reason": f"no reply within {timeout:g}s"} for n in unanswered]
    if total is None or head is None:
        reasons = "; ".join(sorted({d["reason"] for d in outcome.dropped})) or "no clients"
        raise CalibrationFailed(f"no client sent usable calibration moments ({reasons})")
    weight, bias = f"{head}.weight", f"{head}.bias"
    new_weight, new_bias = calibrated_head(total, state.extras[weight], state.extras[bias], settings, seed)
    calibrated = dataclasses.replace(state, extras={**state.extras, weight: new_weight, bias: new_bias})
    outcome.seconds = time.perf_counter() - started
    return calibrated, outcome


def _decode(reply: Message, state: GlobalState) -> tuple[str, ClassMoments]:
    """The head a client's moments are of, and the moments, checked against the global head."""
    if reply.has_error():
        raise ValueError(client_error(reply))
    name, moments = decode_moments(reply.content)
    weight = state.extras.get(f"{name}.weight")
    if weight is None or f"{name}.bias" not in state.extras:
        raise ValueError(f"moments of {name!r}, which is not a head in the global state")
    moments.check(*weight.shape)
    return name, moments
