"""One attempt's valid replies, folded into the strategy as they arrive when it can stream.

A strategy with ``start`` (a linear one) gets each valid update as soon as it is decoded and
validated; the server keeps no update once folded (a plain float32 reply's bytes wait, at most
``fedpeft.kernels.FOLD_WIDTH`` of them, to be folded together), so its memory is O(adapter) for any
number of clients. Where its accumulator can (``strategies.base.ProbedAccumulator``) and the norm
screen's threshold has a finite bound, such a reply goes to the fold before its norm is known: the
fold's one pass over the replies' bytes measures them too, the screen then judges them in arrival
order, and a refused one is taken back out of the sum (its verdict comes from ``close``).
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

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedpeft.kernels import segment_statistics
from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, SpanLayout
from fedpeft.wire import DecodeBuffer, WireError, decode_update, record_nbytes
from server.validation import (
    NOT_FINITE,
    ReplyLimits,
    SpanDistance,
    all_finite,
    reference_signature,
    segments,
    sent_tensors,
    update_norm,
    validate,
)
from strategies.accumulate import Probe
from strategies.base import Accumulator, ProbedAccumulator, Strategy

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


def not_finite(update: ClientUpdate, norm: float = math.nan) -> bool:
    """Whether ``update`` holds a NaN or Inf: no pass over it when ``norm``, measured over what it
    sent, is finite (a NaN or Inf would show in it; an infinite norm may merely overflow)."""
    return not math.isfinite(norm) and not all_finite(sent_tensors(update))


def a_variances(update: ClientUpdate, statistics: np.ndarray | None = None) -> ModuleValues:
    """The (unbiased) variance of each module's A from its sum and its sum of squares, the
    difference taken in float64 (``Tensor.var`` per module cost more than the rest of a small
    reply's server time). A reply that decoded whole reads them from its tensors' rows of
    ``statistics`` (``SpanDistance.statistics``), or from one compiled pass over its span; any
    other from one pass over its A's gathered (``tensor_variances``)."""
    if update.flat is None or not sends_A(update.flat.layout):
        modules = tuple(update.factors)
        return tensor_variances(modules, [update.factors[m].A for m in modules])
    layout = update.flat.layout
    if statistics is None:
        statistics = segment_statistics(update.flat.span, update.flat.span, *segments(layout))
    rows, modules, n = a_entries(layout)
    return _variances(modules, statistics[rows, 1], statistics[rows, 2], n)


def tensor_variances(names: tuple[str, ...], tensors: list[torch.Tensor]) -> ModuleValues:
    """The (unbiased) variance of each of ``tensors``: one compiled pass over them gathered into
    one span (one ``Tensor.var`` each costs several times that on a small adapter's 120)."""
    span = torch.cat([t.reshape(-1).float() for t in tensors])
    sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
    statistics = segment_statistics(span, span, np.cumsum(sizes) - sizes, sizes)
    return _variances(names, statistics[:, 1], statistics[:, 2], sizes.astype(np.float64))


def _variances(names: tuple[str, ...], sums: np.ndarray, squares: np.ndarray, n: np.ndarray) -> ModuleValues:
    return ModuleValues(names, (squares - sums * sums / n) / np.maximum(n - 1, 1))


@dataclass(frozen=True)
class ModuleValues:
    """One number per module, as an array in the order of ``modules``."""

    modules: tuple[str, ...]
    values: np.ndarray

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.modules, self.values.tolist(), strict=True))


def sends_A(layout: SpanLayout) -> bool:
    return bool(a_entries(layout)[0].size)


@functools.lru_cache(maxsize=16)
def moment_segments(layout: SpanLayout) -> np.ndarray:
    """Which of ``layout``'s tensors ``a_variances`` reads the sum and sum of squares of (its A's)."""
    flags = np.zeros(len(layout.names), dtype=np.bool_)
    flags[a_entries(layout)[0]] = True
    return flags


@functools.lru_cache(maxsize=16)
def a_entries(layout: SpanLayout) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """The positions of ``layout``'s A tensors, their modules' names and their sizes."""
    rows = np.array([i for i, name in enumerate(layout.names) if name.startswith("A/")], dtype=np.int64)
    sizes = np.array(layout.sizes, dtype=np.float64)[rows]
    return rows, tuple(layout.names[i][2:] for i in rows), sizes


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
        self.probed = self.accumulator if isinstance(self.accumulator, ProbedAccumulator) else None
        # replies are folded one at a time: one decode buffer, reused
        self.decode_buffer = DecodeBuffer() if self.accumulator is not None else None
        self.reference = reference_signature(state, []) if state.adapter is not None else None
        self.span = SpanDistance()  # the norm screen's one-pass distance for replies in one layout
        self.known: dict[tuple[SpanLayout, int], str | None] = {}  # layout verdicts (validate)
        self.pending: list[ClientUpdate] = []
        self.held: list[tuple[ClientUpdate, float]] = []  # streaming, until the norm screen can judge
        self.waiting: list[tuple[ClientUpdate, Probe]] = []  # taken by a probed fold, not yet judged
        self.deferred: list[tuple[str, str]] = []  # (client id, reason) of those then refused
        self.accepted: list[tuple[str, int, float | None]] = []  # (client id, examples, train loss)
        self.examples = 0
        self.loss_sum = 0.0
        self.example_epsilon = 0.0  # the largest example-level epsilon a client reported
        self.client_eval: dict[
            str, float
        ] = {}  # client id -> accuracy of its start model on its held-out rows
        # per module, the sum over clients of var(A_k) (one array per set of modules a reply had)
        self.variance_sums: dict[tuple[str, ...], np.ndarray] = {}
        self.sent_variances: dict[int, ModuleValues] = {}  # of the global A, per client rank

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
        mixed = self.strategy.mixed_ranks
        # finiteness is checked below: a NaN or Inf shows in the norm a pass measures anyway
        reason = validate(update, self.rnd, self.reference, self.state, mixed, False, self.known)
        if reason is not None:
            return self._reject(f"invalid update: {reason}")
        if self._probed(update):
            return None
        self._judge_waiting()  # replies are judged in arrival order (the pool takes their norms so)
        norm = None
        if not self.screen.ratio:
            if not_finite(update):
                return self._reject(f"invalid update: {NOT_FINITE}")
        else:
            norm = update_norm(update, self.state, self.span)
            reason = self._screen_problem(update, norm)
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

    def _probed(self, update: ClientUpdate) -> bool:
        """Hand ``update`` to the fold before judging it, measured in the same pass over its bytes
        (``ProbedAccumulator``), where the accumulator takes it: a reply that decoded whole in the
        round's layout, with the most the norm screen's threshold can be whatever the norms still
        unjudged as its cap (inf with the screen off or too few norms: an accumulator that folds
        before measuring refuses that, as what a refused reply left in its sum must be bounded to
        be taken back). Its verdict comes when the fold has measured it: ``close`` returns a
        refusal."""
        if self.probed is None or update.flat is None:
            return False
        reference = self.span.reference_of(update.flat, self.state)
        if reference is None:
            return False
        threshold = self.screen.largest_threshold(len(self.waiting) + 1)
        layout = update.flat.layout
        probe = Probe(reference, *segments(layout), moment_segments(layout), threshold * threshold)
        if not self.probed.add_probed(update, probe):
            return False
        self.waiting.append((update, probe))
        if probe.rows is not None:  # the fold ran
            self._judge_waiting()
        return True

    def _judge_waiting(self) -> None:
        """Judge the updates a probed fold took, in arrival order, and settle each with the fold."""
        if not self.waiting:
            return
        assert self.probed is not None
        self.probed.fold_held()
        for update, probe in self.waiting:
            norm: float | None = math.sqrt(probe.squared_distance)
            if self.screen.ratio:
                reason = self._screen_problem(update, norm) or self.screen.verdict(norm)
            else:  # only a NaN or Inf refuses a reply; its norm is not recorded
                reason, norm = NOT_FINITE if not_finite(update, norm) else None, None
            self.probed.settle(update, probe, accepted=reason is None)
            if reason is None:
                self._accept(update, norm, probe.rows)
            else:
                self.deferred.append((update.client_id, reason))
                self.rejected += 1
        self.waiting = []

    def _screen_problem(self, update: ClientUpdate, norm: float) -> str | None:
        """Why the norm screen refuses ``update`` outright (NaN, Inf, overflow), else None and its
        ``norm`` joins the pool."""
        if not_finite(update, norm):
            return NOT_FINITE
        return self.screen.add(norm)

    def close(self) -> list[tuple[str, str]]:
        """Judge what was kept: the updates a streaming cold start held, and every update in batch
        mode (structure first, then norms), against the norms of the whole round (and of the
        previous round); returns (client id, reason) for each refused one."""
        self._judge_waiting()
        dropped, self.deferred = self.deferred, []
        refused = len(dropped)  # counted when judged
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
        self.rejected += len(dropped) - refused
        return dropped

    def aggregate(self) -> GlobalState:
        self._judge_waiting()  # close() has, when called
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
        tensors = sent_tensors(update)  # a reply decoded whole: its span (no per-module views built)
        if buffer is not None and any(t.untyped_storage().data_ptr() == buffer for t in tensors):
            return copy.deepcopy(update)
        return update

    def _reject(self, reason: str) -> str:
        self.rejected += 1
        return reason

    def _accept(self, update: ClientUpdate, norm: float | None, statistics: np.ndarray | None = None) -> None:
        if norm is not None:
            self.norms.append(norm)
        self.accepted.append((update.client_id, update.num_examples, update.metrics.get("train_loss")))
        self.examples += update.num_examples
        self.loss_sum += update.metrics.get("train_loss", 0.0) * update.num_examples
        self.example_epsilon = max(self.example_epsilon, update.metrics.get("example_epsilon", 0.0))
        if "client_eval_accuracy" in update.metrics:
            self.client_eval[update.client_id] = update.metrics["client_eval_accuracy"]
        if self.strategy.private:  # nothing per client is reported under a private strategy
            return
        variances = self._a_variances(update, statistics)
        if variances.modules in self.variance_sums:
            self.variance_sums[variances.modules] += variances.values
        else:
            self.variance_sums[variances.modules] = variances.values.copy()

    def _a_variances(self, update: ClientUpdate, statistics: np.ndarray | None = None) -> ModuleValues:
        """``a_variances``, from the pass that measured the reply's norm where one did (its
        ``statistics``, or ``SpanDistance``'s), and once per rank for the replies that did not
        send A (it is the server's)."""
        if update.flat is None:
            return a_variances(update)
        if sends_A(update.flat.layout):
            if statistics is None:
                statistics = self.span.statistics(update.flat, self.state)[0]
            return a_variances(update, statistics)
        if update.rank not in self.sent_variances:  # the A's the server sent, at the reply's rank
            assert self.state.adapter is not None  # a streaming round has one
            modules = tuple(self.state.adapter)
            As = (self.state.adapter[m].A for m in modules)  # sliced only where wider: 1 us a slice
            sent = [A if A.shape[0] == update.rank else A[: update.rank] for A in As]
            self.sent_variances[update.rank] = tensor_variances(modules, sent)
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
        if result.adapter is None or not self.variance_sums or not self.accepted:
            return None
        totals: dict[str, float] = {}
        for modules, sums in self.variance_sums.items():
            for module, total in zip(modules, sums.tolist(), strict=True):
                totals[module] = totals.get(module, 0.0) + total
        count = len(self.accepted)
        ratios = [
            float(result.adapter[m].A.var()) / (total / count)
            for m, total in totals.items()
            if m in result.adapter and total > 0
        ]
        return sum(ratios) / len(ratios) if ratios else None
