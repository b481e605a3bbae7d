"""Coordinate-wise trimmed mean of the clients' factors and extras (Yin et al., 2018).

Per coordinate of A, B and every extra, the ``trim`` largest and ``trim`` smallest of the K
clients' values are dropped and the rest averaged, unweighted. ``trim`` is a count, or
``floor(beta * K)`` for a fraction ``beta`` of this round's replies (default 0.1).
"""

from __future__ import annotations

import math

from strategies.coordinatewise import CoordinateWise
from strategies.registry import StrategyError

DEFAULT_BETA = 0.1


class TrimmedMean(CoordinateWise):
    name = "trimmed_mean"

    def __init__(
        self, beta: float | None = None, trim: int | None = None, clients_per_round: int | None = None
    ) -> None:
        if beta is not None and trim is not None:
            raise StrategyError("trimmed_mean takes beta (a fraction) or trim (a count), not both")
        if beta is not None and not 0 <= beta < 0.5:
            raise StrategyError(f"trimmed_mean's beta must be in [0, 0.5), got {beta}")
        if trim is not None and trim < 0:
            raise StrategyError(f"trimmed_mean's trim must be >= 0, got {trim}")
        if trim is not None and clients_per_round is not None and 2 * trim >= clients_per_round:
            raise StrategyError(self._too_much(trim, clients_per_round, "sampled clients per round"))
        self.beta = DEFAULT_BETA if beta is None and trim is None else beta
        self.trim = trim

    def trim_count(self, rnd: int, count: int) -> int:
        if self.trim is None:
            assert self.beta is not None
            return math.floor(self.beta * count)
        if 2 * self.trim >= count:
            raise StrategyError(self._too_much(self.trim, count, f"replies in round {rnd}"))
        return self.trim

    @staticmethod
    def _too_much(trim: int, count: int, what: str) -> str:
        return (
            f"trimmed_mean's trim = {trim} from each end would drop all {count} {what}; "
            "lower trim, or give beta (a fraction of the replies) instead"
        )
