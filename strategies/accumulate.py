"""The flat buffers behind streaming folds: a round's weighted sum kept in one contiguous float64
buffer, folded into by a compiled pass per few replies (``fedpeft.kernels.fold_``, or
``screened_fold_`` for replies the server has the fold measure before it judges them).

Written by hand for speed, not for reading: ``benchmarks/aggregation.py`` measured the per-tensor
Python loop these replace at several times the memory-bandwidth bound on SmolLM2 and 7B adapter
shapes (``benchmarks/PERFORMANCE.md``). A strategy author never needs them: ``WeightedStrategy`` and
``strategies.fedavg.FactorAverage`` use them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedpeft.kernels import FOLD_WIDTH, divided, float32_cap, fold_, masked_fold_, screened_fold_
from fedpeft.state import FlatTensors, SpanLayout


class FlatLayout:
    """Named float32 tensors as views into one flat buffer, and a test of whether another set of
    tensors lies the same way in one buffer of its own (as ``fedpeft.wire`` decodes a reply), so
    that an operation on all of them is one vectorized op over one span of memory."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.keys = list(tensors)
        self.shapes = [t.shape for t in tensors.values()]
        self.strides = [contiguous_strides(shape) for shape in self.shapes]
        self.sizes = [t.numel() for t in tensors.values()]
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]
        self.numel = sum(self.sizes)
        self.known: SpanLayout | None = None  # a wire layout found to be this one

    def span_of(self, flat: FlatTensors | None) -> Tensor | None:
        """``flat``'s span if it holds tensors of these names and shapes in this order (checked
        once per wire layout object), else None."""
        if flat is None:
            return None
        if flat.layout is not self.known:
            if flat.layout.names != tuple(self.keys) or list(flat.layout.shapes) != self.shapes:
                return None
            self.known = flat.layout
        return flat.span

    def views(self, buffer: Tensor) -> list[Tensor]:
        """One view of ``buffer`` (``numel`` long) per tensor, in order."""
        spans = zip(self.offsets, self.sizes, self.shapes, strict=True)
        return [buffer[o : o + n].view(shape) for o, n, shape in spans]

    def gather(self, tensors: list[Tensor]) -> Tensor:
        """``tensors`` as one 1-D float32 tensor in this layout: a view if they already lie so,
        else a copy."""
        span = self.span(tensors)
        if span is None:  # one copy, not one per tensor through views of a new buffer
            span = torch.cat([t.reshape(-1) for t in tensors]).float()
        return span

    def span(self, tensors: list[Tensor]) -> Tensor | None:
        """The 1-D view over ``tensors`` if they are float32, contiguous, in this layout and back to
        back in one storage; else None."""
        first = tensors[0]
        base = first.data_ptr()
        if (
            [(t.data_ptr() - base) // 4 for t in tensors] != self.offsets
            or [t.shape for t in tensors] != self.shapes
            or [t.stride() for t in tensors] != self.strides
            or any(t.dtype is not torch.float32 for t in tensors)
        ):
            return None
        storage = first.untyped_storage()
        if (first.storage_offset() + self.numel) * 4 > storage.nbytes():
            return None  # adjacent, but separate allocations
        return first.new_empty(0).set_(storage, first.storage_offset(), (self.numel,))


def add_scaled_(total: Tensor, incoming: Tensor, alpha: float = 1.0) -> Tensor:
    """``total += alpha * incoming`` for a float64 ``total`` and a float32 or float64 ``incoming``
    (1-D), rounded as float64 (``fedpeft.kernels.fold_``; torch's mixed-dtype ``add_`` is a scalar
    casting loop)."""
    if incoming.dtype == total.dtype:
        return total.add_(incoming, alpha=alpha)
    return fold_(total, [incoming], [alpha])


@dataclass
class Probe:
    """What a fold measures of a reply it takes before the server has judged it
    (``WeightedSum.add_flat`` with a probe, ``fedpeft.kernels.screened_fold_``): the distance from
    ``reference`` (the sent state in the sum's layout) per segment, with the sum and the sum of
    squares where ``moments`` asks; ``rows`` is filled in when the reply is folded. The fold leaves
    out the reply's elements whose own squared distance passes ``cap`` (NaN and Inf too): a reply
    whose squared distance is within ``cap`` was folded whole."""

    reference: Tensor
    starts: np.ndarray
    sizes: np.ndarray
    moments: np.ndarray
    cap: float
    rows: np.ndarray | None = None  # (segments, 3): squared distance, sum, sum of squares

    @property
    def squared_distance(self) -> float:
        assert self.rows is not None, "the reply is not folded yet"
        return float(self.rows[:, 0].sum())


class HeldFold:
    """Spans waiting to be folded into a float64 ``total``, ``FOLD_WIDTH`` per pass over it
    (``fedpeft.kernels.fold_``: the same bits as one at a time, in the order added; spans with a
    ``Probe`` through ``screened_fold_``, which measures them in the same pass)."""

    def __init__(self, total: Tensor) -> None:
        self.total = total
        self.held: list[tuple[Tensor, float, Probe | None]] = []

    def add(self, span: Tensor, weight: float, keep: bool = True, probe: Probe | None = None) -> None:
        """Fold ``weight * span`` in; ``keep=False`` for a span that may not outlive this call
        (a reused buffer): then it is folded now, with whatever is held."""
        self.held.append((span, weight, probe))
        if not keep or len(self.held) == FOLD_WIDTH:
            self.flush()

    def flush(self) -> Tensor:
        """Fold what is held, filling in the probes; the total."""
        probed = [(span, weight, probe) for span, weight, probe in self.held if probe is not None]
        plain = [(span, weight) for span, weight, probe in self.held if probe is None]
        self.held = []
        if probed:
            first = probed[0][2]
            rows = screened_fold_(
                self.total,
                [span for span, _, _ in probed],
                [weight for _, weight, _ in probed],
                first.reference,
                first.starts,
                first.sizes,
                first.moments,
                [probe.cap for _, _, probe in probed],
            )
            for (_, _, probe), row in zip(probed, rows, strict=True):
                probe.rows = row
        fold_(self.total, [span for span, _ in plain], [weight for _, weight in plain])
        return self.total


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class WeightedSum:
    """Running weighted sum ``sum_k w_k t_k`` over named float32 tensors, and ``sum_k w_k``.

    Raw weights (example counts), not normalized ones, are what lets replies be folded before the
    total is known; ``mean`` divides once at the end. Weights are taken relative to the first
    one, so a single update (or equal weights) averages to exactly itself. The sums live in one
    flat float64 buffer, so the float32 mean does not depend on the order the replies arrived in
    (a rerun round folds them in another order), but for an element whose float64 sum lands on a
    float32 rounding boundary: one ulp there, where float32 sums differ in many elements. An update
    decoded into one buffer in the same layout (``add_flat``) is held until ``FOLD_WIDTH`` of them
    are, then folded together in one pass over the sum (the same bits as one at a time); any other
    is gathered into that layout and folded at once.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.unit = 1.0
        self.layout: FlatLayout | None = None
        self.pending: HeldFold | None = None

    def add(self, tensors: dict[str, Tensor], weight: float) -> None:
        if self.layout is None:
            self.start(tensors, weight)
        elif tensors.keys() != set(self.layout.keys):
            raise ValueError("an update's tensors differ from the first update's")
        incoming = self.layout.gather([tensors[k] for k in self.layout.keys])
        self.pending.add(incoming, weight / self.unit, keep=False)  # may be a reused buffer
        self.total += weight / self.unit
        self.count += 1

    def add_flat(self, flat: FlatTensors | None, weight: float, probe: Probe | None = None) -> bool:
        """Take ``flat`` if it lies in this sum's layout (True), else nothing (False). Its span (the
        reply's own bytes) is held until ``FOLD_WIDTH`` replies are, or until ``mean``. With a
        ``probe`` the reply is taken before it is judged: ``settle`` it once the probe is filled."""
        span = self.layout.span_of(flat) if self.layout is not None else None
        if span is None:
            return False
        self.pending.add(span, weight / self.unit, probe=probe)
        self.total += weight / self.unit
        self.count += 1
        return True

    def settle(self, flat: FlatTensors, weight: float, probe: Probe, accepted: bool) -> None:
        """After the fold filled ``probe``: fold the elements the fold left out of an accepted
        reply (only float rounding lets its distance pass the cap and the screen still take it), or
        take back what was folded of a refused one (finite, each element within the cap: float64
        rounding of it remains, far below the float32 mean's)."""
        span, total, w = flat.span, self.pending.total, weight / self.unit
        if accepted:
            if not probe.squared_distance <= float32_cap(probe.cap):  # something left out
                masked_fold_(total, span, w, probe.reference, probe.cap, inside=False)
            return
        masked_fold_(total, span, -w, probe.reference, probe.cap, inside=True)
        self.total -= w
        self.count -= 1

    def fold_held(self) -> None:
        """Fold the held replies now (filling their probes)."""
        if self.pending is not None:
            self.pending.flush()

    def start(self, tensors: dict[str, Tensor], weight: float) -> None:
        """Lay the sum out as the first update's ``tensors`` (not folded: ``add`` them, or
        ``add_flat`` their span), weights taken relative to its ``weight``."""
        self.unit = weight if weight > 0 else 1.0
        self.layout = FlatLayout(tensors)
        self.pending = HeldFold(zeroed_sum(self.layout.numel))

    def mean(self) -> dict[str, Tensor]:
        """``sum_k w_k t_k / sum_k w_k`` as float32 tensors (views of one fresh buffer), once: the
        float64 sum is then handed to the next round's (``zeroed_sum``)."""
        if self.total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        if self.pending is None:
            raise RuntimeError("this sum's mean was taken already: a WeightedSum gives it once")
        mean = divided(self.pending.flush(), self.total)
        release_sum(self.pending.total)
        self.pending = None
        return dict(zip(self.layout.keys, self.layout.views(mean), strict=True))


_spare: list[Tensor] = []  # the float64 buffer of the last sum whose mean was taken


def zeroed_sum(numel: int) -> Tensor:
    """A zeroed float64 buffer of ``numel`` elements: the last finished sum's when it has that size
    (a server's rounds do), else a new one. A new buffer the size of a 7B adapter's sum (134 MB)
    costs about 60 ms in page faults as the first replies are folded; zeroing a used one, 7 ms."""
    if _spare and _spare[0].numel() == numel:
        return _spare.pop().zero_()
    return torch.zeros(numel, dtype=torch.float64)


def release_sum(total: Tensor) -> None:
    """Hand a finished sum's float64 buffer (no longer read) to the next ``zeroed_sum``."""
    _spare[:] = [total]
