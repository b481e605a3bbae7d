"""The flat-buffer kernels behind streaming folds: a round's weighted sum kept in one contiguous
buffer, folded into by one vectorized op per reply.

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


CAST_CHUNK = 1 << 18  # elements per cast-and-add in add_scaled_: a 2 MiB float64 scratch stays in cache


def add_scaled_(total: Tensor, incoming: Tensor, alpha: float = 1.0) -> Tensor:
    """``total += alpha * incoming`` for a float64 ``total`` and a float32 ``incoming`` (1-D).

    torch's mixed-dtype ``add_`` takes a scalar casting loop: 72 ms for 16.7 M elements (a 7B
    adapter) against 4 ms for a float32 ``add_`` on this machine. A cast into a small float64
    scratch, then a same-dtype ``add_``, chunk by chunk while the chunk is in cache, is 13 ms."""
    if incoming.dtype == total.dtype:
        return total.add_(incoming, alpha=alpha)
    scratch = torch.empty(min(CAST_CHUNK, total.numel()), dtype=total.dtype)
    for start in range(0, total.numel(), CAST_CHUNK):
        part = total[start : start + CAST_CHUNK]
        cast = scratch[: part.numel()]
        cast.copy_(incoming[start : start + CAST_CHUNK])
        part.add_(cast, alpha=alpha)
    return total


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
    decoded into one buffer in the same layout is folded by one ``add_``; any other is gathered into
    that layout first.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.unit = 1.0

    def add(self, tensors: dict[str, Tensor], weight: float) -> None:
        if self.count == 0:
            self.unit = weight if weight > 0 else 1.0
            self.layout = FlatLayout(tensors)
            self.buffer = self.layout.gather(list(tensors.values())).double()
            if weight != self.unit:
                self.buffer.mul_(weight / self.unit)
        else:
            if tensors.keys() != set(self.layout.keys):
                raise ValueError("an update's tensors differ from the first update's")
            incoming = self.layout.gather([tensors[k] for k in self.layout.keys])
            add_scaled_(self.buffer, incoming, weight / self.unit)
        self.total += weight / self.unit
        self.count += 1

    def add_flat(self, flat: FlatTensors | None, weight: float) -> bool:
        """Fold ``flat`` in one op if it lies in this sum's layout (True), else nothing (False)."""
        span = self.layout.span_of(flat) if self.count else None
        if span is None:
            return False
        add_scaled_(self.buffer, span, weight / self.unit)
        self.total += weight / self.unit
        self.count += 1
        return True

    def mean(self) -> dict[str, Tensor]:
        """``sum_k w_k t_k / sum_k w_k`` as float32 tensors (views of one fresh buffer)."""
        if self.total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        mean = torch.empty(self.layout.numel)
        for start in range(0, self.layout.numel, CAST_CHUNK):  # no float64 temporary of it all
            torch.div(
                self.buffer[start : start + CAST_CHUNK], self.total, out=mean[start : start + CAST_CHUNK]
            )
        return dict(zip(self.layout.keys, self.layout.views(mean), strict=True))
