"""Compiled loops (numba) for the server's passes over each reply's bytes: the statistics the
norm screen and the variance diagnostics read, and the float64 fold of the round's weighted sum,
apart or in one pass (``screened_fold_``: four replies measured and folded in one loop).

Written by hand because torch has neither operation fused: a float32-into-float64 weighted add is
a cast and an add (two passes, and torch's mixed-dtype ``add_`` is a scalar loop), and the
distance from the sent state, the sum and the sum of squares are three reductions with a
temporary. ``benchmarks/aggregation.py`` measured those torch passes at 5x the memory-bandwidth
bound per reply on 7B adapter shapes; these loops read a reply once per pass, at about the bound's
pace. Compiled on first use and cached on disk (numba's ``cache``)."""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

BLOCK = 2048  # float32 partial sums of at most this many terms, added into float64 totals
FOLD_WIDTH = 4  # replies folded per pass over the sum (fold_)
# the statistics reassociate their sums (vectorized partial sums); NaN and Inf keep their meaning
REDUCTION = {"reassoc", "nsz", "contract"}


@numba.njit(nogil=True, cache=True, fastmath=REDUCTION)
def _block_statistics4(x0, x1, x2, x3, reference, lo, hi):  # pragma: no cover - compiled
    a, b, c, d, r = x0[lo:hi], x1[lo:hi], x2[lo:hi], x3[lo:hi], reference[lo:hi]
    q0 = q1 = q2 = q3 = s0 = s1 = s2 = s3 = p0 = p1 = p2 = p3 = np.float32(0.0)
    for i in range(r.size):
        ri, ai, bi, ci, di = r[i], a[i], b[i], c[i], d[i]
        da, db, dc, dd = ai - ri, bi - ri, ci - ri, di - ri
        q0, q1, q2, q3 = q0 + da * da, q1 + db * db, q2 + dc * dc, q3 + dd * dd
        s0, s1, s2, s3 = s0 + ai, s1 + bi, s2 + ci, s3 + di
        p0, p1, p2, p3 = p0 + ai * ai, p1 + bi * bi, p2 + ci * ci, p3 + di * di
    return (q0, s0, p0), (q1, s1, p1), (q2, s2, p2), (q3, s3, p3)


@numba.njit(nogil=True, cache=True)
def _add_rows(out, j, rows):  # pragma: no cover - compiled
    # a block's (distance, sum, sum of squares) per part into segment j's float64 totals
    for g in range(4):
        for k in range(3):
            out[g, j, k] += rows[g][k]


@numba.njit(nogil=True, cache=True)
def _statistics4(x0, x1, x2, x3, reference, starts, sizes, out):  # pragma: no cover - compiled
    for j in range(starts.size):
        end = starts[j] + sizes[j]
        for lo in range(starts[j], end, BLOCK):
            _add_rows(out, j, _block_statistics4(x0, x1, x2, x3, reference, lo, min(lo + BLOCK, end)))


def _padded(parts: Sequence[Tensor], reference: Tensor) -> list[np.ndarray]:
    """``FOLD_WIDTH`` arrays for a four-part loop: ``parts``, then ``reference`` in the places left."""
    if not 0 < len(parts) <= FOLD_WIDTH:
        raise ValueError(f"a pass takes 1 to {FOLD_WIDTH} parts, got {len(parts)}")
    return [p.numpy() for p in parts] + [reference.numpy()] * (FOLD_WIDTH - len(parts))


def segments_statistics(
    parts: Sequence[Tensor], reference: Tensor, starts: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """``segment_statistics`` of up to ``FOLD_WIDTH`` parts in one pass (``reference`` read once):
    rows ``(parts, segments, 3)``."""
    out = np.zeros((FOLD_WIDTH, starts.size, 3))
    _statistics4(*_padded(parts, reference), reference.numpy(), starts, sizes, out)
    return out[: len(parts)]


def segment_statistics(x: Tensor, reference: Tensor, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """For each segment ``x[s : s + n]`` (``starts``, ``sizes``: int64 arrays) of a 1-D float32
    ``x``: ``||x - reference||^2``, the sum and the sum of squares of ``x``, as float64 rows of
    one ``(segments, 3)`` array. Partial sums of ``BLOCK`` terms are float32 (relative error
    about ``BLOCK / 16`` float32 ulps), their totals float64; a NaN or Inf in ``x`` shows in each
    of its segment's figures."""
    return segments_statistics([x], reference, starts, sizes)[0]


def squared_distance(x: Tensor, reference: Tensor) -> float:
    """``||x - reference||^2`` of two 1-D float32 tensors (``segment_statistics`` of one segment)."""
    whole = np.zeros(1, dtype=np.int64), np.array([x.numel()], dtype=np.int64)
    return float(segment_statistics(x, reference, *whole)[0, 0])


@numba.njit(nogil=True, cache=True)
def _fold1(total, x0, w0):  # pragma: no cover - compiled
    for i in range(total.size):
        total[i] = total[i] + w0 * x0[i]


@numba.njit(nogil=True, cache=True)
def _fold4(total, x0, x1, x2, x3, w0, w1, w2, w3):  # pragma: no cover - compiled
    for i in range(total.size):
        total[i] = total[i] + w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i]


def fold_(total: Tensor, parts: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``total += sum_g weights[g] * parts[g]`` for a 1-D float64 ``total`` and float32 ``parts``
    of its length, element by element in the order given, each product and sum rounded in float64
    (no fused multiply-add): bitwise what adding them one at a time gives, whatever the grouping.
    Up to ``FOLD_WIDTH`` parts share one pass over ``total``."""
    sums = total.numpy()
    arrays = [p.float().contiguous().numpy() for p in parts]  # no copy of a contiguous float32 part
    start = 0
    while len(arrays) - start >= FOLD_WIDTH:
        group = slice(start, start + FOLD_WIDTH)
        _fold4(sums, *arrays[group], *map(float, weights[group]))
        start += FOLD_WIDTH
    for x, w in zip(arrays[start:], weights[start:], strict=True):
        _fold1(sums, x, float(w))
    return total


@numba.njit(nogil=True, cache=True, fastmath=REDUCTION)
def _plus(total, value):  # pragma: no cover - compiled
    # a reduction's addition carries its own fastmath flags through inlining: the loops below
    # vectorize their sums while their fold keeps strict float64 rounding
    return total + value


@numba.njit(nogil=True, cache=True, fastmath=REDUCTION)
def _plus_square(total, value):  # pragma: no cover - compiled
    return total + value * value


@numba.njit(nogil=True, cache=True)
def _screened_block4(
    total, x0, x1, x2, x3, w0, w1, w2, w3, reference, c0, c1, c2, c3, lo, hi, moments
):  # pragma: no cover - compiled
    t, a, b, c, d, r = total[lo:hi], x0[lo:hi], x1[lo:hi], x2[lo:hi], x3[lo:hi], reference[lo:hi]
    zero = np.float32(0.0)
    q0 = q1 = q2 = q3 = s0 = s1 = s2 = s3 = p0 = p1 = p2 = p3 = zero
    for i in range(t.size):
        ri, ai, bi, ci, di = r[i], a[i], b[i], c[i], d[i]
        da, db, dc, dd = ai - ri, bi - ri, ci - ri, di - ri
        ea, eb, ec, ed = da * da, db * db, dc * dc, dd * dd  # the same bits as _masked_fold's
        q0, q1, q2, q3 = _plus(q0, ea), _plus(q1, eb), _plus(q2, ec), _plus(q3, ed)
        if moments:  # loop-invariant: LLVM compiles the loop twice, with and without
            s0, s1, s2, s3 = _plus(s0, ai), _plus(s1, bi), _plus(s2, ci), _plus(s3, di)
            p0, p1 = _plus_square(p0, ai), _plus_square(p1, bi)
            p2, p3 = _plus_square(p2, ci), _plus_square(p3, di)
        t[i] = (
            t[i]
            + w0 * (ai if ea <= c0 else zero)
            + w1 * (bi if eb <= c1 else zero)
            + w2 * (ci if ec <= c2 else zero)
            + w3 * (di if ed <= c3 else zero)
        )
    return (q0, s0, p0), (q1, s1, p1), (q2, s2, p2), (q3, s3, p3)


@numba.njit(nogil=True, cache=True)
def _screened_fold4(
    total, x0, x1, x2, x3, w, reference, starts, sizes, caps, moments, out
):  # pragma: no cover
    for j in range(starts.size):
        end = starts[j] + sizes[j]
        for lo in range(starts[j], end, BLOCK):
            rows = _screened_block4(
                total, x0, x1, x2, x3, w[0], w[1], w[2], w[3], reference,
                caps[0], caps[1], caps[2], caps[3], lo, min(lo + BLOCK, end), moments[j],
            )  # fmt: skip
            _add_rows(out, j, rows)


def float32_cap(cap: float) -> np.float32:
    """The least float32 at or above ``cap`` (a float32 square at or below it is within ``cap``),
    at most float32's largest finite value: no cap takes an Inf."""
    largest = np.finfo(np.float32).max
    if cap >= largest:
        return largest
    rounded = np.float32(cap)
    return rounded if rounded >= cap else np.nextafter(rounded, np.float32(np.inf))


def screened_fold_(
    total: Tensor,
    parts: Sequence[Tensor],
    weights: Sequence[float],
    reference: Tensor,
    starts: np.ndarray,
    sizes: np.ndarray,
    moments: np.ndarray,
    caps: Sequence[float],
) -> np.ndarray:
    """``fold_`` of float32 ``parts`` that measures them on the way, for a fold that takes replies
    before they are judged: ``segment_statistics`` of each part against ``reference`` (rows
    ``(parts, segments, 3)``; sum and sum of squares only where ``moments``), and of part ``g``
    only the elements whose squared distance ``(x - reference)^2`` (float32) is within
    ``float32_cap(caps[g])``: NaN, Inf and outsized elements stay out of the sum, so what a refused
    part left in it is finite and bounded element by element (``masked_fold_`` takes it back). A
    part whose squared distance is within that cap was folded whole, bitwise as ``fold_`` folds it. Up to
    ``FOLD_WIDTH`` parts share one pass that reads each of them and ``reference`` once."""
    pad = FOLD_WIDTH - len(parts)  # the reference at weight 0 adds +0.0: the sum is unchanged
    out = np.zeros((FOLD_WIDTH, starts.size, 3))
    _screened_fold4(
        total.numpy(),
        *_padded(parts, reference),
        np.array([*weights, *[0.0] * pad], dtype=np.float64),
        reference.numpy(),
        starts,
        sizes,
        np.array([float32_cap(c) for c in [*caps, *[np.inf] * pad]], dtype=np.float32),
        moments,
        out,
    )
    return out[: len(parts)]


@numba.njit(nogil=True, cache=True)
def _masked_fold(total, x, w, reference, cap, inside):  # pragma: no cover - compiled
    zero = np.float32(0.0)
    for i in range(total.size):
        difference = x[i] - reference[i]
        within = difference * difference <= cap
        total[i] = total[i] + w * (x[i] if within == inside else zero)


def masked_fold_(
    total: Tensor, part: Tensor, weight: float, reference: Tensor, cap: float, inside: bool
) -> Tensor:
    """``total += weight * part`` over the elements ``screened_fold_`` took of ``part`` at ``cap``
    (``inside``) or over those it left out (not ``inside``): take back a refused part with a
    negative weight, or fold the rest of an accepted one."""
    _masked_fold(total.numpy(), part.numpy(), float(weight), reference.numpy(), float32_cap(cap), inside)
    return total


@numba.njit(nogil=True, cache=True)
def _divide(out, total, divisor):  # pragma: no cover - compiled
    for i in range(total.size):
        out[i] = total[i] / divisor


def divided(total: Tensor, divisor: float) -> Tensor:
    """``total / divisor`` divided in float64 and rounded to a new float32 tensor (torch's
    mixed-dtype division is a scalar loop)."""
    out = torch.empty(total.numel())
    _divide(out.numpy(), total.numpy(), float(divisor))
    return out


@numba.njit(nogil=True, cache=True)
def _released(out, total, noise, reference, divisor):  # pragma: no cover - compiled
    for i in range(total.size):
        out[i] = (total[i] + noise[i]) / divisor + reference[i]


def released_(out: Tensor, total: Tensor, noise: Tensor, reference: Tensor, divisor: float) -> Tensor:
    """``out = (total + noise) / divisor + reference`` for a float64 ``total`` and float32
    ``noise``, ``reference`` and ``out``: each step rounded in float64, the result to float32, in
    one pass (dp's release of a noised mean delta)."""
    _released(out.numpy(), total.numpy(), noise.numpy(), reference.numpy(), float(divisor))
    return out
