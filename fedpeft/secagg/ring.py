"""Fixed-point encoding of float vectors in the ring Z_2^64 (numpy uint64, whose wrap-around is
defined behaviour; torch's int64 overflow is not).

A value x is clipped to [-clip_range, clip_range], scaled by 2^fraction_bits and rounded to the
nearest integer, taken modulo 2^64. A client multiplies its encoding by an integer weight (its
example count) in the ring, which is exact. The sum of K such encodings decodes correctly as long
as its true value fits in a signed 64-bit integer, which ``FixedPoint.check_capacity`` guarantees
from the number of clients and the largest weight. Decoding the weighted sum and dividing by the
total weight leaves an error of at most 2^-(fraction_bits+1) per coordinate (a weighted mean of
rounding errors), plus float64 rounding of the sum (relative 2^-53); the server then takes the sum
as float32 tensors (``SummandLayout.unflatten``) before dividing, which adds up to about two float32
roundings of the mean (relative 2^-23 each), as the plain path's float32 mean has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RING_BITS = 64


class RingOverflowError(ValueError):
    """The configured range, precision and weights could overflow the ring."""


@dataclass(frozen=True)
class FixedPoint:
    """The encoding's parameters: ``clip_range`` bounds each value, ``fraction_bits`` its precision."""

    clip_range: float = 8.0
    fraction_bits: int = 30

    @property
    def scale(self) -> float:
        return float(2**self.fraction_bits)

    @property
    def max_error(self) -> float:
        """The largest rounding error of a decoded (weighted) mean, per coordinate."""
        return 2.0 ** -(self.fraction_bits + 1)

    def capacity(self) -> int:
        """The largest total weight (sum of the weights of the clients summed) that cannot
        overflow: total * clip_range * 2^fraction_bits must stay below 2^63."""
        return int(2 ** (RING_BITS - 1) // (self.clip_range * self.scale + 1))

    def check_capacity(self, clients: int, max_weight: int) -> None:
        """Raise ``RingOverflowError`` if ``clients`` encodings of weight up to ``max_weight``
        could overflow the ring."""
        if clients * max_weight > self.capacity():
            raise RingOverflowError(
                f"{clients} clients x weight {max_weight} x clip range {self.clip_range:g} "
                f"x 2^{self.fraction_bits} overflows the 64-bit ring "
                f"(capacity: {self.capacity()} in total weight)"
            )

    def encode(self, values: np.ndarray, weight: int = 1) -> tuple[np.ndarray, int]:
        """``weight * round(clip(values) * 2^f)`` mod 2^64 as uint64, and how many values were clipped."""
        if not np.isfinite(values).all():
            raise ValueError("cannot encode NaN or Inf in the fixed-point ring")
        clipped = np.clip(values.astype(np.float64), -self.clip_range, self.clip_range)
        outside = int(np.count_nonzero(clipped != values))
        fixed = np.rint(clipped * self.scale).astype(np.int64).view(np.uint64)
        return fixed * np.uint64(weight), outside  # uint64 products wrap modulo 2^64

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A ring element (a sum of encodings) as float64 values."""
        return total.view(np.int64).astype(np.float64) / self.scale
