"""Secure aggregation on the server: one attempt at a round in four stages (``client.secure``
describes the client's side, ``docs/security.md`` the protocol and threat model).

1. keys: sampled clients send two public keys each; those who answer are the participants U1;
2. shares: U1 get everyone's public keys and return encrypted Shamir shares, routed here; those
   who answer (U2) are the ones whose secrets can be recovered;
3. train: U2 get the train message plus the masking set U2; each masked vector is folded into a
   running uint64 sum as it arrives (no masked vector is kept); those who answer are U3;
4. unmask: U3 get the survivor and dropout lists and the shares addressed to them, and return
   shares of the survivors' self-mask seeds and of the dropouts' mask keys; with at least the
   threshold t of them the masks come off, the sum is decoded and handed to the strategy.

The server only ever sees the sum of U3's contributions, each client's example count, and who
answered each stage. Any stage ending with fewer than t clients fails the attempt (no update
accepted), and the round loop retries it with a fresh sample and fresh keys.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft.config import RunConfig
from fedpeft.errors import UserError
from fedpeft.secagg import masks, shares
from fedpeft.secagg.messages import (
    KEYS,
    RECORD,
    SHARES,
    UNMASK,
    EncryptedShares,
    KeysRequest,
    MaskingRequest,
    PublicKeys,
    RevealedShares,
    SharesRequest,
    UnmaskRequest,
    decode_masked,
)
from fedpeft.secagg.ring import FixedPoint
from fedpeft.secagg.summand import SummandLayout
from fedpeft.state import ClientPlan, GlobalState
from fedpeft.wire import NUM_EXAMPLES, UPDATE_METRICS, WEIGHT, WireError, record_nbytes
from server.replies import client_error, receive
from strategies import Strategy

SESSION_BYTES = 16


class SecureModeError(UserError):
    """A configuration that secure aggregation cannot run with."""


class AttemptFailed(Exception):
    """Fewer than the threshold of clients are left at some stage of the attempt."""


def check_strategy(strategy: Strategy) -> None:
    """Secure aggregation reveals only a sum: it serves strategies whose aggregate is one."""
    if not strategy.linear:
        raise SecureModeError(
            f"strategy '{strategy.name}' needs each client's factors, which secure aggregation hides; "
            "use fedavg, ffa or dp (around either), or set server.secure_aggregation = false"
        )
    if strategy.client_instructions(1, GlobalState()).personal_B:
        raise SecureModeError(
            f"strategy '{strategy.name}' keeps each client's B on the client, while a masked summand carries "
            "every trained tensor; set server.secure_aggregation = false"
        )
    strategy.secure_clip_norm  # noqa: B018 (a rule that cannot say how clients clip refuses here)


@dataclass
class SecureSum:
    """One attempt's result, read by the round loop as it reads ``RoundReplies``."""

    aggregate_fn: Callable[[], GlobalState] | None = None
    accepted: list[tuple[str, int, float | None]] = field(default_factory=list)  # (node, examples, None)
    train_loss: float = 0.0
    rejected: int = 0  # masked replies of the wrong type or size (all the server can check)
    norms: list[float] = field(default_factory=list)  # always empty: no single update is visible

    @property
    def count(self) -> int:
        return len(self.accepted)

    def aggregate(self) -> GlobalState:
        assert self.aggregate_fn is not None, "aggregate() of an attempt that failed"
        return self.aggregate_fn()


@dataclass
class SecureAttempt:
    """What one attempt leaves for the round loop, and each stage's cost (for benchmarks)."""

    replies: SecureSum = field(default_factory=SecureSum)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> seconds, bytes


class SecureAggregation:
    """Runs attempts at rounds for a linear strategy, learning only the sum of the updates."""

    def __init__(self, config: RunConfig, strategy: Strategy) -> None:
        check_strategy(strategy)
        self.strategy = strategy
        self.codec = FixedPoint(config.secure.clip_range, config.secure.fraction_bits)
        self.threshold = config.secure.threshold
        self.max_examples = config.secure.max_examples
        self.timeout = config.server.round_timeout
        self.alpha = config.lora.alpha

    def attempt(
        self,
        grid: Grid,
        rnd: int,
        nodes: list[int],
        content: RecordDict,
        state: GlobalState,
        plan: ClientPlan,
    ) -> SecureAttempt:
        """One attempt at round ``rnd`` with the sampled ``nodes``; ``content`` is the train message."""
        run = _Attempt(self, grid, rnd, state, plan)
        try:
            run.execute(nodes, content)
        except AttemptFailed as failure:
            run.result.dropped += [(node, f"secure aggregation: {failure}") for node in run.alive]
            if self.strategy.private:  # never retried: the round releases noise only
                run.result.replies.aggregate_fn = lambda: self.strategy.aggregate(rnd, state, [])
        return run.result


class _Attempt:
    """The state of one attempt: who is still in, the routed shares, the running masked sum."""

    def __init__(self, secure: SecureAggregation, grid: Grid, rnd: int, state: GlobalState, plan: ClientPlan):
        if state.adapter is None:
            raise SecureModeError("secure aggregation needs a global adapter; unset lora.client_ranks")
        self.secure, self.grid, self.rnd, self.state = secure, grid, rnd, state
        self.session = os.urandom(SESSION_BYTES)
        self.layout = SummandLayout(state.adapter, state.extras, plan)
        self.result = SecureAttempt()
        self.alive: list[int] = []
        self.threshold = 2

    def execute(self, nodes: list[int], content: RecordDict) -> None:
        self.alive = nodes
        keys = self._stage("keys", KEYS, lambda n: KeysRequest(self.session, self.rnd), PublicKeys)
        participants = sorted(keys)
        self.threshold = max(2, math.ceil(self.secure.threshold * len(participants)))
        self._require()
        request = SharesRequest(
            self.session,
            self.threshold,
            participants,
            [keys[n].share_key for n in participants],
            [keys[n].mask_key for n in participants],
        )
        sealed = self._stage("shares", SHARES, lambda n: request, EncryptedShares)
        self._require()
        inbox = self._route(sealed)
        total, examples = self._masked_sum(content)
        survivors = sorted(examples)
        dropouts = sorted(set(sealed) - set(examples))
        revealed = self._stage(
            "unmask",
            UNMASK,
            lambda n: UnmaskRequest(self.session, survivors, dropouts, *inbox[n]),
            RevealedShares,
        )
        self._require()
        self._unmask(total, revealed, participants, keys, survivors, dropouts)
        self._finish(total, examples)

    def _stage(self, name: str, message_type: str, request: Callable[[int], Any], reply_type: type) -> dict:
        """Send ``request(node)`` to every client still in; keep those whose reply decodes."""
        started = time.perf_counter()
        messages = [
            Message(content=request(n).to_content(), message_type=message_type, dst_node_id=n)
            for n in self.alive
        ]
        down = sum(_nbytes(m.content) for m in messages)
        answers, up = {}, 0
        for reply in self.grid.send_and_receive(messages, timeout=self.secure.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.result.dropped.append((node, f"secure aggregation {name}: {client_error(reply)}"))
                continue
            up += _nbytes(reply.content)
            try:
                answer = reply_type.from_content(reply.content)
                if answer.session != self.session:
                    raise WireError("the reply belongs to another session")
            except WireError as exc:
                self.result.dropped.append((node, f"secure aggregation {name}: malformed reply: {exc}"))
                continue
            answers[node] = answer
        self._forget_silent(name, answers)
        self._cost(name, started, down, up)
        return answers

    def _masked_sum(self, content: RecordDict) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
        """Stage 3: the train message to every client still in; each masked vector is folded into
        the running sum as it arrives. Returns the sum and each survivor's (example count, weight)."""
        started = time.perf_counter()
        request = MaskingRequest(
            self.session,
            self.alive,
            self.secure.codec.clip_range,
            self.secure.codec.fraction_bits,
            self.secure.max_examples,
            self.secure.strategy.secure_clip_norm,
        )
        content = RecordDict({**content, RECORD: request.to_record()})
        down = _nbytes(content) * len(self.alive)
        messages = [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in self.alive
        ]
        total = np.zeros(self.layout.size, dtype=np.uint64)
        examples: dict[int, tuple[int, int]] = {}
        up = 0
        for reply in receive(self.grid, messages, self.secure.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.result.dropped.append((node, client_error(reply)))
                continue
            up += _nbytes(reply.content)
            try:
                vector = decode_masked(reply.content, self.layout.size)
                examples[node] = self._counts(reply.content)
            except WireError as exc:
                self.result.dropped.append((node, f"malformed reply: {exc}"))
                self.result.replies.rejected += 1
                continue
            np.add(total, vector, out=total)  # wraps modulo 2^64
        self._forget_silent("train", examples)
        self._cost("train", started, down, up)
        self._require()
        return total, examples

    def _counts(self, content: RecordDict) -> tuple[int, int]:
        """A masked reply's example count and weight (what its summand was multiplied by)."""
        metrics = content.get(UPDATE_METRICS)
        counts = []
        for key in (NUM_EXAMPLES, WEIGHT):
            value = metrics.get(key) if metrics is not None else None
            if not isinstance(value, int) or not 0 <= value <= self.secure.max_examples:
                raise WireError(f"'{key}' must be an integer in [0, secure.max_examples], got {value!r}")
            counts.append(value)
        return counts[0], counts[1]

    def _route(self, sealed: dict[int, EncryptedShares]) -> dict[int, tuple[list[int], list[bytes]]]:
        """For each client, the (senders, encrypted bundles) addressed to it."""
        inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in sealed}
        for sender, bundle in sealed.items():
            for recipient, data in zip(bundle.recipients, bundle.shares, strict=False):
                if recipient in inbox:
                    inbox[recipient][0].append(sender)
                    inbox[recipient][1].append(data)
        return inbox

    def _unmask(
        self,
        total: np.ndarray,
        revealed: dict[int, RevealedShares],
        participants: list[int],
        keys: dict[int, PublicKeys],
        survivors: list[int],
        dropouts: list[int],
    ) -> None:
        """Reconstruct the survivors' self-mask seeds and the dropouts' mask keys from the revealed
        shares (share index = the holder's place among the participants), and take the masks off."""
        started = time.perf_counter()
        held: dict[int, dict[int, bytes]] = {owner: {} for owner in survivors + dropouts}
        for holder, answer in revealed.items():
            index = participants.index(holder) + 1
            for owner, share in zip(answer.owners, answer.shares, strict=False):
                if owner in held:
                    held[owner][index] = share
        short = [owner for owner, got in held.items() if len(got) < self.threshold]
        if short:
            raise AttemptFailed(f"too few shares to unmask node(s) {short[:3]}")
        dropped_keys = {node: shares.combine(held[node]) for node in dropouts}
        for node, key in dropped_keys.items():
            if masks.public_key(key) != keys[node].mask_key:
                raise AttemptFailed(f"the mask key of dropped node {node} does not reconstruct")
        survivor_keys = {node: keys[node].mask_key for node in survivors}
        masks.unmask(total, (shares.combine(held[n]) for n in survivors), dropped_keys, survivor_keys)
        self._cost("unmask", started, 0, 0)

    def _finish(self, total: np.ndarray, counts: dict[int, tuple[int, int]]) -> None:
        """Decode the sum and hand it to the strategy (when the round loop asks to aggregate)."""
        decoded = self.secure.codec.decode(total)
        total_examples = sum(n for n, _ in counts.values())
        total_weight = sum(w for _, w in counts.values())
        replies = self.result.replies
        replies.accepted = [(str(node), n, None) for node, (n, _) in sorted(counts.items())]
        replies.train_loss = self.layout.loss(decoded) / total_examples if total_examples else 0.0
        summed = self.layout.unflatten(decoded)
        replies.aggregate_fn = lambda: self._aggregate(summed, total_weight)

    def _aggregate(self, summed: dict[str, torch.Tensor], total_weight: int) -> GlobalState:
        return self.secure.strategy.aggregate_sum(self.rnd, self.state, summed, total_weight)

    def _forget_silent(self, stage: str, answered: dict) -> None:
        for node in self.alive:
            if node not in answered and not any(d[0] == node for d in self.result.dropped):
                self.result.dropped.append((node, f"no {stage} reply within {self.secure.timeout:g}s"))
        self.alive = [n for n in self.alive if n in answered]

    def _require(self) -> None:
        if len(self.alive) < self.threshold:
            raise AttemptFailed(f"{len(self.alive)} clients left, fewer than the threshold {self.threshold}")

    def _cost(self, stage: str, started: float, down: int, up: int) -> None:
        cost = self.result.stages.setdefault(stage, {"seconds": 0.0, "bytes_down": 0, "bytes_up": 0})
        cost["seconds"] += time.perf_counter() - started
        cost["bytes_down"] += down
        cost["bytes_up"] += up
        self.result.bytes_down += down
        self.result.bytes_up += up


def _nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays, plus the bytes values of config records (keys, shares)."""
    config = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            config += sum(len(item) for item in items if isinstance(item, bytes))
    return record_nbytes(content) + config
