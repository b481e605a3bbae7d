"""Server-side checks on a client reply before it may reach a strategy.

Structural checks (``validate``) look at one update alone: its round, example count, declared
rank against its shapes and its layers, layout against the global adapter, dtype, finiteness.
``ReplyLimits`` holds what spans replies and rounds: the byte cap on a reply and the norm screen
(``NormScreen``) that compares an update's size with those of its peers.
"""

from __future__ import annotations

import bisect
import functools
import math
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedpeft.config import ServerSection
from fedpeft.kernels import segment_statistics, squared_distance
from fedpeft.state import (
    AdapterFactors,
    ClientPlan,
    ClientUpdate,
    FlatTensors,
    GlobalState,
    SpanLayout,
    started_from,
)
from strategies.accumulate import FlatLayout

Signature = tuple[tuple[str, tuple[int, int]], ...]

BYTES_HEADROOM = 2  # a reply at the adapter's rank in float32 is about 1x the adapter (+ headers)
BYTES_SLACK = 1 << 20  # the packed payload's manifest, the meta and metric records
NORM_CHUNK_BYTES = 1 << 20  # per fused difference-and-norm in update_norm
MIN_NORM_POOL = 3  # fewer norms than this have no meaningful median (see NormScreen)
NOT_FINITE = "a tensor holds NaN or Inf"


def signature(update: ClientUpdate) -> Signature:
    """Module names with their (d_out, d_in), plus extras with their shapes: what must agree."""
    mods = [(n, (s.B[0], s.A[1])) for n, s in update.factor_shapes().items()]
    extras = [(f"extra/{n}", tuple(t.shape)) for n, t in update.extras.items()]
    return tuple(sorted(mods + extras))  # type: ignore[arg-type]


def reference_signature(state: GlobalState, updates: list[ClientUpdate]) -> Signature | None:
    """Expected layout: the global adapter's if there is one, else the most common among replies."""
    if state.adapter is not None:
        mods = [(n, (f.B.shape[0], f.A.shape[1])) for n, f in state.adapter.items()]
        extras = [(f"extra/{n}", tuple(t.shape)) for n, t in state.extras.items()]
        return tuple(sorted(mods + extras))  # type: ignore[arg-type]
    shaped = [signature(u) for u in updates if shape_problem(u) is None]
    return Counter(shaped).most_common(1)[0][0] if shaped else None


def shape_problem(update: ClientUpdate) -> str | None:
    """Internal consistency: A is (rank x d_in), B is (d_out x rank), 2-D, at the declared rank,
    and the rank is at least 1 and at most the layer's smaller dimension (a LoRA rank above it
    adds nothing a full-rank update could not hold: an absurd rank is a broken or hostile client)."""
    if not update.factors:
        return "the update carries no LoRA factors"
    if update.rank < 1:
        return f"the declared rank {update.rank} is not positive"
    for name, s in update.factor_shapes().items():
        if len(s.A) != 2 or len(s.B) != 2:
            return f"{name}: factors must be 2-D, got A{s.A} B{s.B}"
        if s.A[0] != update.rank or s.B[1] != update.rank:
            return f"{name}: shapes A{s.A} B{s.B} do not match the declared rank {update.rank}"
        if s.R is not None and s.R != (update.rank, update.rank):
            return f"{name}: the LoRA-SB core R{s.R} is not {update.rank} x {update.rank}"
        dims = (s.B[0], s.A[1])
        if update.rank > min(dims):
            return f"{name}: the declared rank {update.rank} exceeds the layer's dimensions {dims}"
    return None


def validate(
    update: ClientUpdate,
    rnd: int,
    reference: Signature | None,
    sent: GlobalState | None = None,
    mixed_ranks: bool = False,
    check_finite: bool = True,
    known: dict[tuple[SpanLayout, int], str | None] | None = None,
) -> str | None:
    """``None`` if the update may be aggregated, else the reason to drop it. When ``sent`` (the
    state the server sent) holds a global adapter, each module's rank must be the adapter's (the
    strategy combines the factors element-wise), or at most it with ``mixed_ranks`` (the
    strategy takes clients that trained the adapter's leading components). ``check_finite=False``
    leaves finiteness to the caller (``update_norm`` is not finite when a tensor is not).
    ``known`` caches, for the replies of one round that decoded whole (``ClientUpdate.flat``),
    the verdict on their layout and rank: it depends on nothing else."""
    if update.round != rnd:
        return f"the update is for round {update.round}, not {rnd}"
    if update.num_examples <= 0:
        return "the update reports no training examples"
    if known is not None and update.flat is not None:
        key = (update.flat.layout, update.rank)
        if key not in known:
            known[key] = layout_problem(update, reference, sent, mixed_ranks)
        problem = known[key]
    else:
        problem = layout_problem(update, reference, sent, mixed_ranks)
    if problem:
        return problem
    if check_finite and not all_finite(sent_tensors(update)):
        return NOT_FINITE
    # a decoded reply's scales were checked by fedpeft.wire (positive and finite)
    scales = () if update.flat is not None else tuple(f.scale for f in update.factors.values())
    if not all(math.isfinite(s) and s > 0 for s in (update.alpha, *scales)):
        return "alpha or a LoRA scale is not a positive finite number"
    if not all(math.isfinite(v) for v in update.metrics.values()):
        return "a reported metric is NaN or Inf"
    return None


def layout_problem(
    update: ClientUpdate, reference: Signature | None, sent: GlobalState | None, mixed_ranks: bool
) -> str | None:
    """What ``validate`` checks of the update's layout: shapes against the declared rank, names
    and shapes against ``reference``, ranks against the sent adapter's, float32 tensors."""
    problem = shape_problem(update)
    if problem:
        return problem
    if reference is not None and signature(update) != reference:
        return "module names or layer shapes differ from the global adapter"
    if sent is not None and sent.adapter is not None:
        adapter = sent.adapter
        ranks = {name: (s.rank, adapter[name].rank) for name, s in update.factor_shapes().items()}
        if any(rank > limit or (rank < limit and not mixed_ranks) for rank, limit in ranks.values()):
            return f"the declared rank {update.rank} differs from the global adapter's"
    wrong = next((t.dtype for t in sent_tensors(update) if t.dtype != torch.float32), None)
    if wrong is not None:
        return f"a tensor is {wrong}, not float32 (the wire carries float32, float16 or int8)"
    return None


def update_tensors(update: ClientUpdate) -> list[Tensor]:
    """Every tensor an update carries: its factors', then its extras."""
    return [t for f in update.factors.values() for t in factor_tensors(f)] + list(update.extras.values())


def sent_tensors(update: ClientUpdate) -> list[Tensor]:
    """What the update sent: its one span when it decoded whole, else ``update_tensors``."""
    return [update.flat.span] if update.flat is not None else update_tensors(update)


def factor_tensors(factors: AdapterFactors) -> tuple[Tensor, ...]:
    """A, B and the LoRA-SB core R when there is one."""
    return (factors.A, factors.B) if factors.R is None else (factors.A, factors.B, factors.R)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite: one fused norm per tensor (NaN and Inf propagate into it),
    and the exact element-wise test only for a tensor whose norm is not finite (it may merely
    overflow)."""
    norms = torch._foreach_norm(tensors)
    return all(
        bool(torch.isfinite(t).all())
        for t, ok in zip(tensors, torch.stack(norms).isfinite().tolist(), strict=True)
        if not ok
    )


def update_norm(update: ClientUpdate, state: GlobalState, span: SpanDistance | None = None) -> float:
    """The L2 norm of what the update changes, over everything it sends.

    With a global adapter: the factors' and extras' difference from those the client started from
    (the server's, truncated for a client of a smaller rank; a frozen A the client did not send is
    the sent one, so it adds nothing). Without one (each
    client starts from a fresh seeded init whose B is zero): the weight delta ``scale B A`` of
    each module, whose squared Frobenius norm is ``scale^2 <B^T B, A A^T>``, two r x r products.
    Extras count as their difference from the server's when it sent them, else as themselves.
    ``span`` (kept across a round's replies) computes it in one pass when it can.
    """
    if span is not None and update.flat is not None and state.adapter is not None:
        distance = span.squared_flat(update.flat, state)
        if distance is not None:
            return math.sqrt(distance)
    got: list[Tensor] = []
    sent: list[Tensor] = []
    squares = 0.0
    start = started_from(update, state.adapter) if state.adapter is not None else {}
    for name, f in update.factors.items():
        if state.adapter is not None:
            got += factor_tensors(f)
            sent += factor_tensors(start[name])
        else:
            squares += f.delta_norm() ** 2
    for name, t in update.extras.items():
        sent_extra = state.extras.get(name)
        got.append(t)
        sent.append(sent_extra if sent_extra is not None and sent_extra.shape == t.shape else torch.zeros(()))
    pairs = [(g, s) for g, s in zip(got, sent, strict=True) if g is not s]  # a frozen A adds nothing
    distance = span.squared(pairs) if span is not None else None
    return math.sqrt(squares + (_distances_squared(pairs) if distance is None else distance))


class SpanDistance:
    """``sum_i ||got_i - sent_i||^2`` in one compiled pass (``fedpeft.kernels``), for the replies of
    a round that lie in one span of memory in one layout: the sent tensors are gathered once into
    that layout, then a reply costs one read of its bytes instead of Python per tensor. For a reply
    that decoded whole the same pass gives each tensor's sum and sum of squares (``statistics``),
    which ``server.replies.a_variances`` reads."""

    def __init__(self) -> None:
        self.sent: list[Tensor] = []  # held, so that identity means the same tensors
        self.layout: FlatLayout | None = None
        self.flat_layout: SpanLayout | None = None  # of the replies that decoded whole
        self.flat_reference: Tensor | None = None
        self.last: tuple[weakref.ref[FlatTensors], np.ndarray, bool] | None = None  # (reply, rows, measured)

    def squared(self, pairs: list[tuple[Tensor, Tensor]]) -> float | None:
        """The sum, or None where the reply does not lie in the first reply's layout, or its
        tensors were compared with other sent ones."""
        if not pairs:
            return None
        if self.layout is None:
            self.layout = FlatLayout({str(i): g for i, (g, _) in enumerate(pairs)})
            self.sent = [s for _, s in pairs]
            # a view of the global state when it lies in one buffer (the last round's mean does)
            self.reference = self.layout.gather([s.float().expand_as(g) for g, s in pairs])
        if len(pairs) != len(self.sent) or any(
            s is not kept for (_, s), kept in zip(pairs, self.sent, strict=True)
        ):
            return None
        got = self.layout.span([g for g, _ in pairs])
        return None if got is None else squared_distance(got, self.reference)

    def squared_flat(self, flat: FlatTensors, state: GlobalState) -> float | None:
        """The sum for a reply that decoded whole (``ClientUpdate.flat``), against what the server
        sent laid out as the round's first such reply; None for a reply in another layout, or
        one whose shapes are not the sent ones (a client at a smaller rank)."""
        rows, measured = self.statistics(flat, state)
        return float(rows[:, 0].sum()) if measured else None

    def reference_of(self, flat: FlatTensors, state: GlobalState) -> Tensor | None:
        """What the server sent, laid out as ``flat``: None for a reply in another layout than the
        round's first that decoded whole, or whose shapes are not the sent ones."""
        if self.flat_layout is None:
            self.flat_layout, self.flat_reference = flat.layout, sent_span(flat.layout, state)
        return self.flat_reference if flat.layout is self.flat_layout else None

    def statistics(self, flat: FlatTensors, state: GlobalState) -> tuple[np.ndarray, bool]:
        """Per tensor of ``flat``, in its layout's order: the squared distance from what the server
        sent, the sum and the sum of squares (``fedpeft.kernels.segment_statistics``), and whether
        the distances were measured (see ``squared_flat``; else they are zeros). One pass per
        reply: the last reply's rows are kept for the next call about it."""
        if self.last is not None and self.last[0]() is flat:
            return self.last[1], self.last[2]
        reference = self.reference_of(flat, state)
        measured = reference is not None
        rows = segment_statistics(
            flat.span, flat.span if reference is None else reference, *segments(flat.layout)
        )
        self.last = (weakref.ref(flat), rows, measured)
        return rows, measured


@functools.lru_cache(maxsize=16)
def segments(layout: SpanLayout) -> tuple[np.ndarray, np.ndarray]:
    """The offsets and sizes of ``layout``'s tensors as int64 arrays (what the kernels take)."""
    return np.array(layout.offsets, dtype=np.int64), np.array(layout.sizes, dtype=np.int64)


def sent_span(layout: SpanLayout, state: GlobalState) -> Tensor | None:
    """What the server sent of each tensor of ``layout`` (an extra it did not send counts as zero),
    as one 1-D float32 tensor: a view when the state lies so; None where a shape differs."""
    tensors = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        kind, _, key = name.partition("/")
        if kind == "extra":
            tensor = state.extras.get(key)
            tensors.append(
                tensor.float() if tensor is not None and tuple(tensor.shape) == shape else torch.zeros(shape)
            )
        else:
            factors = (state.adapter or {}).get(key)
            tensor = None if factors is None else getattr(factors, kind)
            if tensor is None or tuple(tensor.shape) != shape:
                return None
            tensors.append(tensor.float())
    return FlatLayout(dict(zip(layout.names, tensors, strict=True))).gather(tensors)


def _distances_squared(pairs: list[tuple[Tensor, Tensor]]) -> float:
    """``sum_i ||got_i - sent_i||^2`` by fused multi-tensor ops over chunks of about
    ``NORM_CHUNK_BYTES`` (a few kernel launches instead of one per tensor, and differences small
    enough to stay in cache)."""
    total, chunk, size = 0.0, [], 0
    for i, (g, s) in enumerate(pairs):
        chunk.append((g, s))
        size += g.numel() * g.element_size()
        if size >= NORM_CHUNK_BYTES or i == len(pairs) - 1:
            diffs = torch._foreach_sub([g for g, _ in chunk], [s for _, s in chunk])
            total += float(torch.stack(torch._foreach_norm(diffs)).double().square().sum())
            chunk, size = [], 0
    return total


class NormScreen:
    """Refuses an update whose norm exceeds ``ratio`` x the lower median of a pool of norms
    (the middle one, or the lower of the two middle ones: an outlier that got in, e.g. during
    the cold start below, cannot pull the reference up).

    A linear strategy folds each reply in as it arrives and keeps nothing of it, so the median of
    the whole round is not known when a reply must be judged. The pool is therefore: the norms
    the server accepted in the previous completed round, plus the norm of every structurally
    valid update seen so far in this attempt at the round (refused ones included: the median
    stays put while fewer than half the pool is hostile), this one included. Until the pool
    holds ``MIN_NORM_POOL`` norms there is no meaningful median: in the first round of a run the
    first two replies are held (``can_judge`` is false; ``RoundReplies`` keeps a copy of each) and
    judged, then folded, when the round closes, against the pool of the whole round. Batch
    (non-streaming) strategies judge every reply once all have arrived, so their pool holds the
    whole round.
    """

    def __init__(self, ratio: float, previous: list[float]) -> None:
        self.ratio = ratio
        self.pool = sorted(previous)  # kept sorted: a median per reply, not a sort of K norms

    def add(self, norm: float) -> str | None:
        """Put ``norm`` in the pool; the reason to refuse it outright if it is not finite."""
        if not math.isfinite(norm):
            return "the update's norm overflows float32 (absurdly large values)"
        bisect.insort(self.pool, norm)
        return None

    @property
    def can_judge(self) -> bool:
        """Whether the pool is large enough for a meaningful median."""
        return len(self.pool) >= MIN_NORM_POOL

    def largest_threshold(self, unjudged: int) -> float:
        """The most the threshold (``ratio`` x the median) can be once ``unjudged`` more norms, of
        any size, join the pool; inf while they could leave it too small to judge."""
        if not self.ratio or len(self.pool) + unjudged < MIN_NORM_POOL:
            return math.inf
        middle = (len(self.pool) + unjudged - 1) // 2  # the lower median's place, the unjudged last
        return self.ratio * self.pool[middle] if middle < len(self.pool) else math.inf

    def verdict(self, norm: float) -> str | None:
        """Whether ``norm`` passes against the pool as it stands (adds nothing)."""
        if not self.ratio or not self.can_judge:
            return None
        median = self.pool[(len(self.pool) - 1) // 2]  # the lower median
        if norm > self.ratio * median:
            return (
                f"the update's norm {norm:.4g} exceeds server.max_norm_ratio = {self.ratio:g} "
                f"x the lower median {median:.4g}"
            )
        return None


@dataclass
class ReplyLimits:
    """The limits on replies that outlive one round: the server keeps one per run.

    ``previous_norms`` are the update norms accepted in the last completed round (rebuilt from
    ``metrics.jsonl`` on resume), the starting pool of the next round's ``NormScreen``.
    """

    max_reply_bytes: int = 0
    max_norm_ratio: float = 10.0
    previous_norms: list[float] = field(default_factory=list)

    @classmethod
    def from_config(cls, server: ServerSection) -> ReplyLimits:
        return cls(server.max_reply_bytes, server.max_norm_ratio)

    def byte_cap(self, state: GlobalState) -> int | None:
        """The most bytes of array data a reply may carry: ``max_reply_bytes`` if set, else twice
        the global adapter and extras in float32 plus 1 MiB; ``None`` (no cap) when neither is
        known (clients start from a fresh init of their own rank: set the key to cap them)."""
        if self.max_reply_bytes:
            return self.max_reply_bytes
        if state.adapter is None:
            return None
        tensors = [t for f in state.adapter.values() for t in (f.A, f.B)] + list(state.extras.values())
        return BYTES_HEADROOM * 4 * sum(t.numel() for t in tensors) + BYTES_SLACK

    def screen(self, plan: ClientPlan | None = None) -> NormScreen:
        """The norm screen of a round under ``plan``: none for a round whose replies are gradient
        sketches (Fed-SB's initialisation), whose norms are not those of updates."""
        if plan is not None and plan.init_gradient:
            return NormScreen(0.0, [])
        return NormScreen(self.max_norm_ratio, self.previous_norms)
