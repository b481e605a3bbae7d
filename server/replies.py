"""One attempt's valid replies, folded into the strategy as they arrive when it can stream.

A strategy with ``start`` (a linear one) gets each valid update as soon as it is decoded and
validated; the server keeps no update, so its memory is O(adapter) for any number of clients.
Other strategies (or a round without a global adapter to validate shapes against) keep the
updates for one batch ``aggregate``, validated against the most common layout among replies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.state import ClientUpdate, GlobalState
from fedpeft.wire import DecodeBuffer
from server.validation import reference_signature, validate
from strategies.base import Accumulator, Strategy, StreamingStrategy

POLL_SECONDS = 0.1


def receive(grid: Grid, messages: Iterable[Message], timeout: float) -> Iterator[Message]:
    """Push ``messages`` and yield each reply as it arrives, until all have answered or
    ``timeout`` seconds have passed (what ``Grid.send_and_receive`` does, without holding every
    reply until the last one)."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    while waiting:
        replies = list(grid.pull_messages(waiting))
        replies.reverse()
        while replies:
            waiting.discard(replies[-1].metadata.reply_to_message_id)
            yield replies.pop()  # not kept here: the caller can free each reply
        if waiting:
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_SECONDS)


class RoundReplies:
    """Validates decoded updates and hands them to the strategy for one attempt at a round."""

    def __init__(self, strategy: Strategy, rnd: int, state: GlobalState) -> None:
        self.strategy, self.rnd, self.state = strategy, rnd, state
        self.accumulator: Accumulator | None = None
        self.decode_buffer: DecodeBuffer | None = None  # replies are folded one at a time: reuse it
        if isinstance(strategy, StreamingStrategy) and state.adapter is not None:
            self.accumulator = strategy.start(rnd, state)
            self.decode_buffer = DecodeBuffer()
        self.reference = reference_signature(state, []) if state.adapter is not None else None
        self.pending: list[ClientUpdate] = []
        self.accepted: list[tuple[str, int, float | None]] = []  # (node, examples, train loss)
        self.examples = 0
        self.loss_sum = 0.0

    def offer(self, update: ClientUpdate) -> str | None:
        """Take ``update`` if valid (folding it in now when streaming); else why to drop it."""
        if self.accumulator is None:
            self.pending.append(update)
            return None
        reason = validate(update, self.rnd, self.reference)
        if reason is not None:
            return f"invalid update: {reason}"
        self._accept(update)
        self.accumulator.add(update)
        return None

    def close(self) -> list[tuple[str, str]]:
        """Validate the kept updates (batch mode); returns (client id, reason) for each invalid one."""
        reference = reference_signature(self.state, self.pending)
        dropped, valid = [], []
        for update in self.pending:
            reason = validate(update, self.rnd, reference)
            if reason is None:
                self._accept(update)
                valid.append(update)
            else:
                dropped.append((update.client_id, reason))
        self.pending = valid
        return dropped

    def aggregate(self) -> GlobalState:
        if self.accumulator is not None:
            return self.accumulator.result()
        return self.strategy.aggregate(self.rnd, self.state, self.pending)

    @property
    def count(self) -> int:
        """How many valid updates this attempt took."""
        return len(self.accepted)

    @property
    def train_loss(self) -> float:
        """The example-weighted mean of the clients' reported training loss."""
        return self.loss_sum / self.examples if self.examples else 0.0

    def _accept(self, update: ClientUpdate) -> None:
        self.accepted.append((update.client_id, update.num_examples, update.metrics.get("train_loss")))
        self.examples += update.num_examples
        self.loss_sum += update.metrics.get("train_loss", 0.0) * update.num_examples
