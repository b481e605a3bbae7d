"""Compiled loops (numba) for the server's passes over each reply's bytes: the statistics the
norm screen and the variance diagnostics read, and the float64 fold of the round's weighted sum,
apart or in one pass (``probed_fold_``: four replies measured and folded block by block).

Written by hand because torch has neither operation fused: a float32-into-float64 weighted add is
a cast and an add (two passes, and torch's mixed-dtype ``add_`` is a scalar loop), and the
distance from the sent state, the sum and the sum of squares are three reductions with a
temporary. ``benchmarks/aggregation.py`` measured those torch passes at 5x the memory-bandwidth
bound per reply on 7B adapter shapes; these loops read a reply once per pass, at about the bound's
pace. Compiled on first use and cached on disk (numba's ``cache``)."""

from __future__ import annotations

import math
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
def _statistics(x, reference, starts, sizes, out):  # pragma: no cover - compiled
    for j in range(starts.size):
        squares = 0.0
        total = 0.0
        power = 0.0
        end = starts[j] + sizes[j]
        for block in range(starts[j], end, BLOCK):
            xs = x[block : min(block + BLOCK, end)]
            refs = reference[block : block + xs.size]
            d2 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            for i in range(xs.size):
                value = xs[i]
                diff = value - refs[i]
                d2 += diff * diff
                s1 += value
                s2 += value * value
            squares += d2
            total += s1
            power += s2
        out[j, 0] = squares
        out[j, 1] = total
        out[j, 2] = power


def segment_statistics(x: Tensor, reference: Tensor, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """For each segment ``x[s : s + n]`` (``starts``, ``sizes``: int64 arrays) of a 1-D float32
    ``x``: ``||x - reference||^2``, the sum and the sum of squares of ``x``, as float64 rows of
    one ``(segments, 3)`` array. Partial sums of ``BLOCK`` terms are float32 (relative error
    about ``BLOCK / 16`` float32 ulps), their totals float64; a NaN or Inf in ``x`` shows in each
    of its segment's figures."""
    out = np.empty((starts.size, 3))
    _statistics(x.numpy(), reference.numpy(), starts, sizes, out)
    return out


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
def _statistics4(x0, x1, x2, x3, reference, lo, hi):  # pragma: no cover - compiled
    a, b, c, d, r = x0[lo:hi], x1[lo:hi], x2[lo:hi], x3[lo:hi], reference[lo:hi]
    q0 = q1 = q2 = q3 = s0 = s1 = s2 = s3 = p0 = p1 = p2 = p3 = np.float32(0.0)
    for i in range(r.size):
        ref, va, vb, vc, vd = r[i], a[i], b[i], c[i], d[i]
        da, db, dc, dd = va - ref, vb - ref, vc - ref, vd - ref
        q0 += da * da
        q1 += db * db
        q2 += dc * dc
        q3 += dd * dd
        s0 += va
        s1 += vb
        s2 += vc
        s3 += vd
        p0 += va * va
        p1 += vb * vb
        p2 += vc * vc
        p3 += vd * vd
    return (q0, s0, p0), (q1, s1, p1), (q2, s2, p2), (q3, s3, p3)


@numba.njit(nogil=True, cache=True, fastmath=REDUCTION)
def _distances4(x0, x1, x2, x3, reference, lo, hi):  # pragma: no cover - compiled
    # _statistics4 without the sums: a third of its work, for tensors whose moments nobody reads
    a, b, c, d, r = x0[lo:hi], x1[lo:hi], x2[lo:hi], x3[lo:hi], reference[lo:hi]
    q0 = q1 = q2 = q3 = np.float32(0.0)
    for i in range(r.size):
        ref = r[i]
        da, db, dc, dd = a[i] - ref, b[i] - ref, c[i] - ref, d[i] - ref
        q0 += da * da
        q1 += db * db
        q2 += dc * dc
        q3 += dd * dd
    zero = np.float32(0.0)
    return (q0, zero, zero), (q1, zero, zero), (q2, zero, zero), (q3, zero, zero)


@numba.njit(nogil=True, cache=True)
def _fold4_range(total, x0, x1, x2, x3, w0, w1, w2, w3, lo, hi):  # pragma: no cover - compiled
    t, a, b, c, d = total[lo:hi], x0[lo:hi], x1[lo:hi], x2[lo:hi], x3[lo:hi]
    for i in range(t.size):
        t[i] = t[i] + w0 * a[i] + w1 * b[i] + w2 * c[i] + w3 * d[i]


@numba.njit(nogil=True, cache=True)
def _fold1_range(total, x, w, lo, hi):  # pragma: no cover - compiled
    t, a = total[lo:hi], x[lo:hi]
    for i in range(t.size):
        t[i] = t[i] + w * a[i]


@numba.njit(nogil=True, cache=True)
def _take(g, j, lo, row, out, running, stopped, caps):  # pragma: no cover - compiled
    out[g, j, 0] += row[0]
    out[g, j, 1] += row[1]
    out[g, j, 2] += row[2]
    running[g] += row[0]
    if stopped[g] < 0 and not running[g] <= caps[g]:  # NaN and Inf fail the test too
        stopped[g] = lo


@numba.njit(nogil=True, cache=True)
def _probed_fold4(
    total, x0, x1, x2, x3, w, reference, starts, sizes, moments, caps, out, stopped
):  # pragma: no cover
    running = np.zeros(4)
    for j in range(starts.size):
        end = starts[j] + sizes[j]
        for lo in range(starts[j], end, BLOCK):
            hi = min(lo + BLOCK, end)
            if moments[j]:
                r0, r1, r2, r3 = _statistics4(x0, x1, x2, x3, reference, lo, hi)
            else:
                r0, r1, r2, r3 = _distances4(x0, x1, x2, x3, reference, lo, hi)
            _take(0, j, lo, r0, out, running, stopped, caps)
            _take(1, j, lo, r1, out, running, stopped, caps)
            _take(2, j, lo, r2, out, running, stopped, caps)
            _take(3, j, lo, r3, out, running, stopped, caps)
            if stopped[0] < 0 and stopped[1] < 0 and stopped[2] < 0 and stopped[3] < 0:
                _fold4_range(total, x0, x1, x2, x3, w[0], w[1], w[2], w[3], lo, hi)
                continue
            if stopped[0] < 0:  # the same order of additions as the four together
                _fold1_range(total, x0, w[0], lo, hi)
            if stopped[1] < 0:
                _fold1_range(total, x1, w[1], lo, hi)
            if stopped[2] < 0:
                _fold1_range(total, x2, w[2], lo, hi)
            if stopped[3] < 0:
                _fold1_range(total, x3, w[3], lo, hi)


def probed_fold_(
    total: Tensor,
    parts: Sequence[Tensor],
    weights: Sequence[float],
    reference: Tensor,
    starts: np.ndarray,
    sizes: np.ndarray,
    moments: np.ndarray,
    caps: Sequence[float],
) -> tuple[np.ndarray, list[int]]:
    """``fold_`` of float32 ``parts`` that measures them on the way, for a fold that takes replies
    before they are judged: ``segment_statistics`` of each part against ``reference`` (rows
    ``(parts, segments, 3)``), and how many leading elements of each part were folded. Part ``g``
    stops being folded at the first block (``BLOCK`` elements of a segment) that would take its
    running squared distance above ``caps[g]`` or holds NaN or Inf, so what was folded of it is
    finite and bounded by its cap; every part's statistics cover all of it. ``FOLD_WIDTH`` parts
    take one pass that reads each of them and ``reference`` once (folding a block right after
    measuring it, from cache); fewer are measured first, then folded whole or not at all."""
    arrays = [p.numpy() for p in parts]
    out = np.zeros((len(arrays), starts.size, 3))
    if len(arrays) == FOLD_WIDTH:
        stopped = np.full(FOLD_WIDTH, -1, dtype=np.int64)
        bounds = np.array(caps, dtype=np.float64)
        _probed_fold4(
            total.numpy(),
            *arrays,
            np.array(weights, dtype=np.float64),
            reference.numpy(),
            starts,
            sizes,
            moments,
            bounds,
            out,
            stopped,
        )
        return out, [int(s) if s >= 0 else a.size for s, a in zip(stopped, arrays, strict=True)]
    for g, x in enumerate(arrays):
        _statistics(x, reference.numpy(), starts, sizes, out[g])
    out[:, ~moments, 1:] = 0.0
    taken = [bool(out[g, :, 0].sum() <= cap) for g, cap in enumerate(caps)]
    fold_(
        total,
        [p for p, ok in zip(parts, taken, strict=True) if ok],
        [w for w, ok in zip(weights, taken, strict=True) if ok],
    )
    return out, [a.size if ok else 0 for a, ok in zip(arrays, taken, strict=True)]


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
def _box_muller(words, std, out):  # pragma: no cover - compiled
    pairs = words.size // 2
    for i in range(pairs):
        u1 = ((words[i] >> 11) + 1.0) * 2.0**-53  # (0, 1]: the log is finite
        u2 = (words[pairs + i] >> 11) * 2.0**-53
        radius = math.sqrt(-2.0 * math.log(u1)) * std
        angle = 2.0 * math.pi * u2
        out[i] = radius * math.cos(angle)
        if pairs + i < out.size:
            out[pairs + i] = radius * math.sin(angle)


def box_muller(words: np.ndarray, count: int, std: float) -> Tensor:
    """``count`` float32 draws of N(0, std^2) from ``2 * ceil(count / 2)`` uniform 64-bit ``words``
    (Box-Muller on their top 53 bits, in float64): the first half of the words' pairs give the
    cosines, in order, the rest the sines. One pass, no float64 temporaries of the whole."""
    out = torch.empty(count)
    _box_muller(words, float(std), out.numpy())
    return out
