"""Factored low-rank deltas: concatenation and re-compression to a rank cap (``factored_svd``).

The ``merged`` delta grows by every round's exact additions; re-compression keeps it at most
``rank_cap`` wide. It is exact (up to float32 rounding) while the true rank is at most the cap, and
reports the fraction of spectral energy it discarded when it is not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedpeft.state import LowRankDelta
from strategies.base import WeightedStrategy, check_rank_cap
from strategies.factored_svd import leading_svd

# Singular values below this fraction of the largest are numerical zeros (float32 inputs).
RELATIVE_TOLERANCE = 1e-6
# Dimensions sketched beyond the cap (Halko et al. 2011 recommend 5 to 10 with power iterations).
OVERSAMPLING = 10


def concat(parts: list[LowRankDelta]) -> LowRankDelta:
    """One factored delta equal to the sum of ``parts``: U = [U_1 ... U_k], V = [V_1; ...; V_k]."""
    return LowRankDelta(U=torch.cat([p.U for p in parts], dim=1), V=torch.cat([p.V for p in parts], dim=0))


def recompress(delta: LowRankDelta, rank_cap: int) -> tuple[LowRankDelta, float]:
    """The best rank-``rank_cap`` factorisation of ``U V``, and the fraction of energy discarded.

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
    merged: dict[str, LowRankDelta], additions: dict[str, LowRankDelta], rank_cap: int
) -> tuple[dict[str, LowRankDelta], float]:
    """``merged + additions`` per module, re-compressed; returns the largest discarded fraction."""
    out = dict(merged)
    worst = 0.0
    for name, extra in additions.items():
        combined = concat([merged[name], extra]) if name in merged else extra
        out[name], discarded = recompress(combined, rank_cap)
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
        self, merged: dict[str, LowRankDelta], additions: dict[str, LowRankDelta]
    ) -> dict[str, LowRankDelta]:
        """``merged + additions`` re-compressed to the cap; records rank and discarded energy."""
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
