"""Factored low-rank deltas: concatenation and re-compression to a rank cap (``factored_svd``).

The ``merged`` delta grows by every round's exact additions; re-compression keeps it at most
``rank_cap`` wide. It is exact (up to float32 rounding) while the true rank is at most the cap, and
reports the fraction of spectral energy it discarded when it is not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from fedpeft.state import LowRankDelta
from strategies.base import WeightedStrategy, check_rank_cap
from strategies.factored_svd import leading_svd

# Singular values below this fraction of the largest are numerical zeros (float32 inputs).
RELATIVE_TOLERANCE = 1e-6
# Dimensions sketched beyond the cap (Halko et al. 2011 recommend 5 to 10 with power iterations).
OVERSAMPLING = 10


class Concatenation:
    """One factored delta equal to the sum of ``parts``, U = [U_1 ... U_k], V = [V_1; ...; V_k], in
    two buffers reused from one call to the next (each result is valid until the next call): a fresh
    ~50 MB tensor per module costs twice the copy itself in page faults (7B shapes, K = 100)."""

    def __init__(self) -> None:
        self._buffers = [torch.empty(0), torch.empty(0)]

    def __call__(self, parts: list[LowRankDelta]) -> LowRankDelta:
        return LowRankDelta(
            U=self._cat([p.U for p in parts], dim=1), V=self._cat([p.V for p in parts], dim=0)
        )

    def _cat(self, tensors: list[Tensor], dim: int) -> Tensor:
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        size = math.prod(shape)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        slot = 1 - dim
        if self._buffers[slot].numel() < size or self._buffers[slot].dtype != dtype:
            self._buffers[slot] = torch.empty(size, dtype=dtype)
        return torch.cat(tensors, dim=dim, out=self._buffers[slot][:size].view(shape))


def recompress(delta: LowRankDelta, rank_cap: int) -> tuple[LowRankDelta, float]:
    """A rank-``rank_cap`` factorisation of ``U V`` and the fraction of energy discarded: exact
    while the true rank is at most the cap, the best rank-``rank_cap`` one while it is at most the
    cap plus ``OVERSAMPLING``, near-best beyond (``factored_svd``).

    With U V ≈ L S R (``factored_svd.leading_svd`` over ``rank_cap + OVERSAMPLING`` dimensions):
    U' = L sqrt(S), V' = sqrt(S) R, truncated to the cap; the discarded energy is that of the
    dropped singular values plus what lies outside those dimensions (zero while the true rank is at
    most the cap plus the oversampling). Returned in the input dtype.
    """
    dtype = delta.U.dtype
    left, s, right, outside = leading_svd(delta.U, delta.V, rank_cap + OVERSAMPLING)
    total = float((s**2).sum()) + outside
    if total == 0.0:
        return _zero_like(delta), 0.0
    keep = min(rank_cap, int((s > s[0] * RELATIVE_TOLERANCE).sum()))
    discarded = (float((s[keep:] ** 2).sum()) + outside) / total
    root = s[:keep].sqrt()
    U = left[:, :keep] * root
    V = root[:, None] * right[:keep]
    return LowRankDelta(U=U.to(dtype), V=V.to(dtype)), discarded


def add_to_merged(
    merged: dict[str, LowRankDelta], additions: Iterable[tuple[str, list[LowRankDelta]]], rank_cap: int
) -> tuple[dict[str, LowRankDelta], float]:
    """``merged`` plus each module's exact terms (concatenated once), re-compressed; returns the
    largest discarded fraction. ``additions`` may be a generator: one module's terms at a time."""
    out = dict(merged)
    worst = 0.0
    concat = Concatenation()
    for name, terms in additions:
        out[name], discarded = recompress(
            concat([merged[name], *terms] if name in merged else terms), rank_cap
        )
        worst = max(worst, discarded)
    return out, worst


class MergedDeltaStrategy(WeightedStrategy):
    """Base of the strategies that add exact low-rank terms to ``merged`` (stacking, fedex)."""

    name = "merged-delta"

    def __init__(self, rank_cap: int = 64, weighting: str = "examples") -> None:
        super().__init__(weighting)
        self.rank_cap = check_rank_cap(self.name, rank_cap)
        self.last_metrics: dict[str, float] = {}

    def merge(
        self, merged: dict[str, LowRankDelta], additions: Iterable[tuple[str, list[LowRankDelta]]]
    ) -> dict[str, LowRankDelta]:
        """``merged`` plus the sum of each module's terms, re-compressed to the cap; records rank
        and discarded energy."""
        out, discarded = add_to_merged(merged, additions, self.rank_cap)
        self.last_metrics = {"merged_rank": float(max_rank(out)), "discarded_energy": discarded}
        return out


def max_rank(merged: dict[str, LowRankDelta]) -> int:
    return max((d.rank for d in merged.values()), default=0)


def _zero_like(delta: LowRankDelta) -> LowRankDelta:
    d_out, d_in = delta.U.shape[0], delta.V.shape[1]
    return LowRankDelta(U=delta.U.new_zeros(d_out, 1), V=delta.V.new_zeros(1, d_in))


def weighted_rows(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """[w_1 T_1; ...; w_k T_k] stacked along rows."""
    return torch.cat([w * t.float() for t, w in zip(tensors, weights, strict=True)], dim=0)
