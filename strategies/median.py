"""Coordinate-wise median of the clients' factors and extras (Yin et al., 2018).

Each coordinate of A, B and every extra (the classifier head) is the median of the K clients'
values, unweighted; for even K, the mean of the two middle ones. Robust to fewer than half of the
clients sending arbitrary values, at the price of the mean's efficiency when all are honest.
"""

from __future__ import annotations

from strategies.coordinatewise import CoordinateWise


class Median(CoordinateWise):
    name = "median"

    def trim_count(self, rnd: int, count: int) -> int:
        return (count - 1) // 2  # leaves the middle value (odd K) or the middle two (even K)
