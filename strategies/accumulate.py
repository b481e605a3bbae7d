"""The flat buffers behind streaming folds: a round's weighted sum kept in one contiguous float64
buffer, folded into by a compiled pass per few replies (``fedpeft.kernels.fold_``).

Written by hand for speed, not for reading: ``benchmarks/aggregation.py`` measured the per-tensor
Python loop these replace at several times the memory-bandwidth bound on SmolLM2 and 7B adapter
shapes (``benchmarks/PERFORMANCE.md``). A strategy author never needs them: ``WeightedStrategy`` and
``strategies.fedavg.FactorAverage`` use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedpeft.kernels import FOLD_WIDTH, divided, fold_
from fedpeft.state import FlatTensors, SpanLayout


class FlatLayout:
    """Named float32 tensors as views into one flat buffer, and a test of whether another set of
    tensors lies the same way in one buffer of its own (as ``fedpeft.wire`` decodes a reply), so
    that an operation on all of them is one vectorized op over one span of memory."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.keys = list(tensors)
        self.shapes = [t.shape for t in tensors.values()]
        self.strides = [contiguous_strides(shape) for shape in self.shapes]
        sizes = [t.numel() for t in tensors.values()]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numel = sum(sizes)
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
        spans = zip(self.offsets, self.shapes, strict=True)
        return [buffer[o : o + math.prod(shape)].view(shape) for o, shape in spans]

    def gather(self, tensors: list[Tensor]) -> Tensor:
        """``tensors`` as one 1-D float32 tensor in this layout: a view if they already lie so,
        else a copy."""
        span = self.span(tensors)
        if span is None:
            span = torch.empty(self.numel)
            torch._foreach_copy_(self.views(span), tensors)
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


class HeldFold:
    """Spans waiting to be folded into a float64 ``total``, ``FOLD_WIDTH`` per pass over it
    (``fedpeft.kernels.fold_``: the same bits as one at a time, in the order added)."""

    def __init__(self, total: Tensor) -> None:
        self.total = total
        self.held: list[tuple[Tensor, float]] = []

    def add(self, span: Tensor, weight: float, keep: bool = True) -> None:
        """Fold ``weight * span`` in; ``keep=False`` for a span that may not outlive this call
        (a reused buffer): then it is folded now, with whatever is held."""
        self.held.append((span, weight))
        if not keep or len(self.held) == FOLD_WIDTH:
            self.flush()

    def flush(self) -> Tensor:
        """Fold what is held; the total."""
        fold_(self.total, [span for span, _ in self.held], [weight for _, weight in self.held])
        self.held = []
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

    def add(self, tensors: dict[str, Tensor], weight: float) -> None:
        if self.layout is None:
            self.start(tensors, weight)
        elif tensors.keys() != set(self.layout.keys):
            raise ValueError("an update's tensors differ from the first update's")
        incoming = self.layout.gather([tensors[k] for k in self.layout.keys])
        self.pending.add(incoming, weight / self.unit, keep=False)  # may be a reused buffer
        self.total += weight / self.unit
        self.count += 1

    def add_flat(self, flat: FlatTensors | None, weight: float) -> bool:
        """Take ``flat`` if it lies in this sum's layout (True), else nothing (False). Its span (the
        reply's own bytes) is held until ``FOLD_WIDTH`` replies are, or until ``mean``."""
        span = self.layout.span_of(flat) if self.layout is not None else None
        if span is None:
            return False
        self.pending.add(span, weight / self.unit)
        self.total += weight / self.unit
        self.count += 1
        return True

    def start(self, tensors: dict[str, Tensor], weight: float) -> None:
        """Lay the sum out as the first update's ``tensors`` (not folded: ``add`` them, or
        ``add_flat`` their span), weights taken relative to its ``weight``."""
        self.unit = weight if weight > 0 else 1.0
        self.layout = FlatLayout(tensors)
        self.pending = HeldFold(torch.zeros(self.layout.numel, dtype=torch.float64))

    def mean(self) -> dict[str, Tensor]:
        """``sum_k w_k t_k / sum_k w_k`` as float32 tensors (views of one fresh buffer)."""
        if self.total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        mean = divided(self.pending.flush(), self.total)
        return dict(zip(self.layout.keys, self.layout.views(mean), strict=True))
