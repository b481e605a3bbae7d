"""One attempt's valid replies, folded into the strategy as they arrive when it can stream.

A strategy with ``start`` (a linear one) gets each valid update as soon as it is decoded and
validated; the server keeps no update, so its memory is O(adapter) for any number of clients.
Other strategies (or a round without a global adapter to validate shapes against) keep the
updates for one batch ``aggregate``, validated against the most common layout among replies.

Every reply passes, in order: the byte cap (before decoding), the decoder, the structural checks
of ``server.validation.validate``, then the norm screen (``server.validation.NormScreen``). A
reply refused at any step is counted in ``rejected`` and its reason returned to the caller;
nothing a client sends makes these methods raise.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, SpanLayout
from fedpeft.wire import DecodeBuffer, WireError, decode_update, record_nbytes
from server.validation import (
    NOT_FINITE,
    ReplyLimits,
    SpanDistance,
    all_finite,
    reference_signature,
    update_norm,
    update_tensors,
    validate,
)
from strategies.base import Accumulator, Strategy

POLL_SECONDS = 0.1
MAX_REASON_CHARS = 300
FLOWER_REASON = re.compile(r"^<class '[^']+'>:<'|'>$")  # Flower wraps it: <class 'Type'>:<'message'>


def client_error(reply: Message) -> str:
    """Why a client answered with an error, in one line: the last line of Flower's reason, i.e.
    the exception's message (a simulated client's reason embeds Ray's whole traceback)."""
    lines = [line.strip() for line in reply.error.reason.splitlines() if line.strip()]
    last = FLOWER_REASON.sub("", lines[-1]) if lines else f"error code {reply.error.code}"
    return f"client error: {textwrap.shorten(last, MAX_REASON_CHARS)}"


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


def a_variances(update: ClientUpdate) -> dict[str, float]:
    """The (unbiased) variance of each module's A from its sum and its sum of squares, the
    difference taken in float64: ``Tensor.var`` per module cost more than the rest of a small
    reply's server time, and stacking the A's a copy of half a large one. A reply that decoded
    whole takes a few strided reductions over its span (``a_runs``), else one fused multi-tensor
    norm over its A's."""
    if update.flat is not None and sends_A(update.flat.layout):
        modules, numel, views = [], [], []
        for run in a_runs(update.flat.layout):
            modules += run.modules
            numel += [run.numel] * len(run.modules)
            views.append(run.view(update.flat.span))
        squares = torch.cat([torch.linalg.vector_norm(v, dim=1) for v in views]).double().square()
        sums = torch.cat([v.sum(1) for v in views]).double()
    else:
        modules = list(update.factors)
        As = [update.factors[m].A for m in modules]
        squares = torch.stack(torch._foreach_norm(As)).double().square()
        sums = torch.stack([a.sum() for a in As]).double()
        numel = [a.numel() for a in As]
    n = torch.tensor(numel, dtype=torch.float64)
    return dict(zip(modules, ((squares - sums * sums / n) / (n - 1).clamp(min=1)).tolist(), strict=True))


@functools.lru_cache(maxsize=16)
def sends_A(layout: SpanLayout) -> bool:
    return any(name.startswith("A/") for name in layout.names)


@dataclass(frozen=True)
class StridedRun:
    """Equally sized tensors of a span at a constant stride: rows of one strided view."""

    modules: tuple[str, ...]
    offset: int
    stride: int
    numel: int

    def view(self, span: Tensor) -> Tensor:
        return span.as_strided(
            (len(self.modules), self.numel), (self.stride, 1), span.storage_offset() + self.offset
        )


@functools.lru_cache(maxsize=16)
def a_runs(layout: SpanLayout, lookahead: int = 8) -> tuple[StridedRun, ...]:
    """The A entries of ``layout`` as few strided runs: greedily, from the first entry not yet
    taken, the longest run whose stride is to one of the next ``lookahead`` entries of its size
    (the A's of a transformer's layers repeat at the layer's stride). Cached per layout."""
    entries = [
        (name[2:], offset, size)
        for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True)
        if name.startswith("A/")
    ]
    by_offset = {offset: (module, size) for module, offset, size in entries}
    taken: set[int] = set()
    runs = []
    for _, offset, size in entries:
        if offset in taken:
            continue
        later = [o for _, o, s in entries if o > offset and s == size and o not in taken][:lookahead]
        best = [offset]
        for stride in (o - offset for o in later):
            run = [offset]
            while (nxt := run[-1] + stride) in by_offset and by_offset[nxt][1] == size and nxt not in taken:
                run.append(nxt)
            best = max(best, run, key=len)
        taken.update(best)
        stride = best[1] - best[0] if len(best) > 1 else size
        runs.append(StridedRun(tuple(by_offset[o][0] for o in best), offset, stride, size))
    return tuple(runs)


class Replies(Protocol):
    """What the round loop reads of one attempt's replies: ``RoundReplies`` here, or
    ``server.secure.SecureSum`` under secure aggregation."""

    accepted: list[tuple[str, int, float | None]]  # (client id, examples, train loss)
    rejected: int
    norms: list[float]
    train_loss: float

    @property
    def count(self) -> int: ...

    def aggregate(self) -> GlobalState: ...


class RoundReplies:
    """Validates decoded updates and hands them to the strategy for one attempt at a round."""

    def __init__(
        self,
        strategy: Strategy,
        rnd: int,
        state: GlobalState,
        limits: ReplyLimits | None = None,
        plan: ClientPlan | None = None,
    ) -> None:
        self.strategy, self.rnd, self.state = strategy, rnd, state
        self.limits = limits or ReplyLimits()
        self.byte_cap = self.limits.byte_cap(state)
        self.screen = self.limits.screen(plan)
        self.norms: list[float] = []  # of the accepted updates, in order (with the norm screen on)
        self.rejected = 0
        self.accumulator: Accumulator | None = (
            strategy.start(rnd, state) if state.adapter is not None else None
        )
        # replies are folded one at a time: one decode buffer, reused
        self.decode_buffer = DecodeBuffer() if self.accumulator is not None else None
        self.reference = reference_signature(state, []) if state.adapter is not None else None
        self.span = SpanDistance()  # the norm screen's one-pass distance for replies in one layout
        self.known: dict[tuple[SpanLayout, int], str | None] = {}  # layout verdicts (validate)
        self.pending: list[ClientUpdate] = []
        self.held: list[tuple[ClientUpdate, float]] = []  # streaming, until the norm screen can judge
        self.accepted: list[tuple[str, int, float | None]] = []  # (client id, examples, train loss)
        self.examples = 0
        self.loss_sum = 0.0
        self.example_epsilon = 0.0  # the largest example-level epsilon a client reported
        self.client_eval: dict[
            str, float
        ] = {}  # client id -> accuracy of its start model on its held-out rows
        self.client_variance: dict[str, float] = {}  # per module, the sum over clients of var(A_k)
        self.sent_variances: dict[int, dict[str, float]] = {}  # of the global A, per client rank

    def decode(self, content: RecordDict, client_id: str) -> ClientUpdate | str:
        """The update a reply's content carries, or the reason to refuse it (counted)."""
        nbytes = record_nbytes(content)
        if self.byte_cap is not None and nbytes > self.byte_cap:
            return self._reject(
                f"oversized reply: {nbytes} bytes of arrays, above the cap of {self.byte_cap} "
                "(server.max_reply_bytes)"
            )
        try:
            return decode_update(
                content, client_id, self.state.adapter, self.decode_buffer, self.state.extras
            )
        except WireError as exc:
            return self._reject(f"malformed reply: {exc}")
        except Exception as exc:  # a client's bytes must never stop the server
            return self._reject(f"malformed reply: {type(exc).__name__}: {exc}")

    def offer(self, update: ClientUpdate) -> str | None:
        """Take ``update`` if valid (folding it in now when streaming); else why to drop it."""
        if self.accumulator is None:
            self.pending.append(update)
            return None
        screened = bool(self.screen.ratio)  # then a NaN or Inf shows in the norm: no separate pass
        mixed = self.strategy.mixed_ranks
        reason = validate(update, self.rnd, self.reference, self.state, mixed, not screened, self.known)
        if reason is not None:
            return self._reject(f"invalid update: {reason}")
        norm = None
        if screened:
            norm = update_norm(update, self.state, self.span)
            if not math.isfinite(norm) and not all_finite(update_tensors(update)):
                return self._reject(f"invalid update: {NOT_FINITE}")
            reason = self.screen.add(norm)
            if reason is None and not self.screen.can_judge:
                # cold start: no median yet; hold it for close() (a copy if it lives in the reused
                # decode buffer; a float32 reply's tensors are its message's own bytes)
                self.held.append((self._kept(update), norm))
                return None
            reason = reason or self.screen.verdict(norm)
            if reason is not None:
                return self._reject(f"invalid update: {reason}")
        self._fold(update, norm)
        return None

    def close(self) -> list[tuple[str, str]]:
        """Judge what was kept: the updates a streaming cold start held, and every update in batch
        mode (structure first, then norms), against the norms of the whole round (and of the
        previous round); returns (client id, reason) for each refused one."""
        dropped = []
        for update, norm in self.held:
            reason = self.screen.verdict(norm)
            if reason is None:
                self._fold(update, norm)
            else:
                dropped.append((update.client_id, reason))
        self.held = []
        reference = reference_signature(self.state, self.pending)
        valid = []
        # a batch rule sees the replies in client-id order, not arrival order: same seed, same result
        for update in sorted(self.pending, key=lambda u: u.client_id):
            reason, norm = validate(update, self.rnd, reference, self.state, self.strategy.mixed_ranks), None
            if reason is None and self.screen.ratio:
                norm = update_norm(update, self.state)
                reason = self.screen.add(norm)
            if reason is None:
                valid.append((update, norm))
            else:
                dropped.append((update.client_id, reason))
        self.pending = []
        for update, norm in valid:  # judged against the pool of the whole round
            reason = None if norm is None else self.screen.verdict(norm)
            if reason is None:
                self._accept(update, norm)
                self.pending.append(update)
            else:
                dropped.append((update.client_id, reason))
        self.rejected += len(dropped)
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

    def _fold(self, update: ClientUpdate, norm: float | None) -> None:
        assert self.accumulator is not None
        self._accept(update, norm)
        self.accumulator.add(update)

    def _kept(self, update: ClientUpdate) -> ClientUpdate:
        """``update``, copied if any of its tensors lives in the reused decode buffer."""
        buffer = self.decode_buffer.tensor.untyped_storage().data_ptr() if self.decode_buffer else None
        tensors = update_tensors(update)
        if buffer is not None and any(t.untyped_storage().data_ptr() == buffer for t in tensors):
            return copy.deepcopy(update)
        return update

    def _reject(self, reason: str) -> str:
        self.rejected += 1
        return reason

    def _accept(self, update: ClientUpdate, norm: float | None) -> None:
        if norm is not None:
            self.norms.append(norm)
        self.accepted.append((update.client_id, update.num_examples, update.metrics.get("train_loss")))
        self.examples += update.num_examples
        self.loss_sum += update.metrics.get("train_loss", 0.0) * update.num_examples
        self.example_epsilon = max(self.example_epsilon, update.metrics.get("example_epsilon", 0.0))
        if "client_eval_accuracy" in update.metrics:
            self.client_eval[update.client_id] = update.metrics["client_eval_accuracy"]
        for module, variance in self._a_variances(update).items():
            self.client_variance[module] = self.client_variance.get(module, 0.0) + variance

    def _a_variances(self, update: ClientUpdate) -> dict[str, float]:
        """``a_variances``, once per rank for the replies that did not send A (it is the server's)."""
        if update.flat is None or sends_A(update.flat.layout):
            return a_variances(update)
        if update.rank not in self.sent_variances:
            self.sent_variances[update.rank] = a_variances(update)
        return self.sent_variances[update.rank]

    def diagnostics(self, result: GlobalState) -> dict[str, float]:
        """What the round's replies say beyond the strategy's own metrics: ``variance_ratio``, and
        the largest ``example_epsilon`` a client reported (example-level DP)."""
        out = {}
        ratio = self.variance_ratio(result)
        if ratio is not None:
            out["variance_ratio"] = ratio
        if self.client_eval:
            out["client_eval_accuracy"] = sum(self.client_eval.values()) / len(self.client_eval)
        if self.example_epsilon > 0:
            out["example_epsilon"] = self.example_epsilon
        return out

    def variance_ratio(self, result: GlobalState) -> float | None:
        """The variance of the aggregated A over the clients' mean variance of A, averaged over
        modules: about 1 when clients start from one shared A, about 1/K when K clients start from
        independent ones and are plainly averaged (what VCMA corrects). None without an adapter."""
        if result.adapter is None or not self.client_variance or not self.accepted:
            return None
        count = len(self.accepted)
        ratios = [
            float(result.adapter[m].A.var()) / (total / count)
            for m, total in self.client_variance.items()
            if m in result.adapter and total > 0
        ]
        return sum(ratios) / len(ratios) if ratios else None
