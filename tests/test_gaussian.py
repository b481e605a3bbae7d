import math

import numpy as np
import pytest
import torch

from fedpeft import gaussian
from fedpeft.gaussian import AREA, HEIGHT, INNER, WIDTH, R
from fedpeft.privacy import SecureRandom

SCALE = 2.0**gaussian.POSITION_BITS


def edges() -> np.ndarray:
    """x_0 = 0 (the top), x_1 .. x_255 = R: each layer's right edge."""
    return np.concatenate([[0.0], WIDTH[1:] * SCALE])


def test_every_layer_has_the_same_area_and_the_base_holds_the_tail():
    x, f = edges(), np.exp(-0.5 * edges() ** 2)
    rectangles = x[1:] * (f[:-1] - f[1:])  # layer i: [0, x_i] x [f(x_i), f(x_(i-1))]
    assert np.allclose(rectangles, AREA, rtol=1e-8)
    tail = math.sqrt(math.pi / 2) * math.erfc(R / math.sqrt(2))
    assert R * math.exp(-0.5 * R * R) + tail == pytest.approx(AREA, rel=1e-8)
    assert WIDTH[0] * SCALE * math.exp(-0.5 * R * R) == pytest.approx(AREA, rel=1e-12)
    assert np.allclose(HEIGHT[1:], f[1:], rtol=1e-15) and HEIGHT[0] == 1.0


def test_a_layer_returns_at_once_only_positions_under_the_curve_everywhere_in_it():
    x = edges()
    assert INNER[1] == 0  # the top layer is all wedge
    inside = (x[1:-1] / x[2:] * SCALE).astype(np.uint64)  # [0, x_(i-1)] lies under the curve
    assert np.array_equal(INNER[2:], inside)
    assert INNER[0] == np.uint64(R / (WIDTH[0] * SCALE) * SCALE)


def reference(words: np.ndarray, std: float) -> list[float]:
    """The ziggurat step by step in Python, one word at a time (what the compiled loop must draw)."""
    words, out, i = [int(w) for w in words], [], 0

    def uniform(word: int) -> float:
        return (word >> 11) * 2.0**-53

    while i < len(words):
        word, i = words[i], i + 1
        layer, negative, position = word & 255, bool(word >> 8 & 1), word >> 9 & (2**52 - 1)
        x = position * float(WIDTH[layer])
        if position >= int(INNER[layer]):
            if layer == 0:
                while True:
                    if i + 2 > len(words):
                        return out
                    t = -math.log1p(-uniform(words[i])) / R
                    accept, i = -2.0 * math.log1p(-uniform(words[i + 1])) > t * t, i + 2
                    if accept:
                        break
                x = R + t
            else:
                if i == len(words):
                    return out
                u, i = uniform(words[i]), i + 1
                if HEIGHT[layer] + u * (HEIGHT[layer - 1] - HEIGHT[layer]) >= math.exp(-0.5 * x * x):
                    continue
        out.append(float(np.float32((-x if negative else x) * std)))
    return out


def tail_word(position_fraction: float) -> int:
    """A word in the base layer at a position past R (the tail)."""
    position = int(position_fraction * (2**52 - 1))
    assert position >= int(INNER[0])
    return position << 9


def test_the_compiled_draws_are_the_step_by_step_ziggurat_of_the_same_words():
    words = np.random.default_rng(0).integers(0, 2**64, size=20_000, dtype=np.uint64)
    words[100:106] = [tail_word(0.99), *words[100:102], tail_word(0.95), *words[103:105]]  # tails
    out = torch.empty(len(words))
    drawn = gaussian.normal_(out, words, 2.5)
    expected = reference(words, 2.5)
    assert drawn == len(expected) and len(words) * 0.97 < drawn < len(words)
    assert out[:drawn].tolist() == expected
    assert (out[:drawn].abs() > 2.5 * R).any()  # the tail words drew past R


def test_draws_stop_where_the_words_run_out_and_the_source_is_asked_again():
    out = torch.empty(50)
    assert gaussian.normal_(out, np.random.default_rng(1).integers(0, 2**64, 10, dtype=np.uint64), 1.0) <= 10
    asked = []

    def words(n: int) -> np.ndarray:
        asked.append(n)
        return np.random.default_rng(len(asked)).integers(0, 2**64, size=7, dtype=np.uint64)  # short

    draws = gaussian.normal(30, 1.0, words)
    assert draws.shape == (30,) and torch.isfinite(draws).all() and len(asked) >= 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_secure_draws_are_gaussian(seed):
    z = SecureRandom.insecure_for_tests(seed).normal(400_000, 2.0).double().sort().values / 2.0
    cdf, n = torch.special.ndtr(z), z.numel()
    above = torch.arange(1, n + 1, dtype=torch.float64) / n  # the empirical CDF just after each draw
    distance = float(torch.maximum(above - cdf, cdf - (above - 1 / n)).max())  # Kolmogorov-Smirnov
    assert distance < 1.95 / math.sqrt(n)  # its 0.1% critical value (a fixed key: the same draws each run)
    for t, tolerance in ((1.0, 0.01), (2.0, 0.03), (3.0, 0.1)):
        tails = float((z.abs() > t).double().mean())
        assert tails == pytest.approx(math.erfc(t / math.sqrt(2)), rel=tolerance)
