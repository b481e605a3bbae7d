"""The compiled loops: the fold is the float64 sum in the given order to the bit, whatever the
grouping; the statistics match float64 references and show NaN and Inf; the mean and the Gaussian
noise are their float64 formulas rounded to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.kernels import FOLD_WIDTH, box_muller, divided, fold_, segment_statistics


@pytest.mark.parametrize("count", [1, FOLD_WIDTH - 1, FOLD_WIDTH, 2 * FOLD_WIDTH + 3])
def test_the_fold_is_bitwise_the_float64_sum_one_at_a_time(count):
    gen = torch.Generator().manual_seed(count)
    total = torch.randn(1001, generator=gen, dtype=torch.float64)
    parts = [torch.randn(1001, generator=gen) * 10.0**k for k in range(count)]
    weights = (torch.rand(count, generator=gen) * 50).tolist()
    expected = total.clone()
    for part, weight in zip(parts, weights, strict=True):
        expected = expected + weight * part.double()  # a product and a sum, each rounded
    one_by_one = total.clone()
    for part, weight in zip(parts, weights, strict=True):
        fold_(one_by_one, [part], [weight])
    assert torch.equal(fold_(total, parts, weights), expected)
    assert torch.equal(one_by_one, expected)


def segments(*sizes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.cumsum((0, *sizes[:-1]), dtype=np.int64), np.array(sizes, dtype=np.int64)


def test_segment_statistics_match_float64_references():
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 5000, 4096, 2049, 7)  # blocks of 2048 terms: ragged, exact and single ones
    x = torch.randn(sum(sizes), generator=gen) + 0.5
    reference = x + torch.randn(sum(sizes), generator=gen) * 1e-3  # a small update's distance
    rows = segment_statistics(x, reference, *segments(*sizes))
    start = 0
    for row, size in zip(rows, sizes, strict=True):
        part, sent = x[start : start + size].double(), reference[start : start + size].double()
        expected = [float((part - sent).square().sum()), float(part.sum()), float(part.square().sum())]
        assert row.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9)
        start += size


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_inf_shows_in_its_segment_only(bad):
    x = torch.ones(3000)
    x[2500] = bad
    rows = segment_statistics(x, torch.zeros(3000), *segments(2000, 1000))
    assert np.isfinite(rows[0]).all()
    assert not np.isfinite(rows[1, 0]) and not np.isfinite(rows[1, 2])


def test_divided_is_torch_float64_division_rounded_to_float32():
    total = torch.randn(5000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e3
    assert torch.equal(divided(total, 7.3), (total / 7.3).float())


def test_box_muller_gives_the_float64_transform_of_its_words_rounded_to_float32():
    words = np.random.default_rng(0).integers(0, 2**64, size=2 * 500, dtype=np.uint64)
    top = words >> np.uint64(11)
    u1, u2 = (top[:500].astype(np.float64) + 1.0) * 2.0**-53, top[500:].astype(np.float64) * 2.0**-53
    radius, angle = np.sqrt(-2.0 * np.log(u1)) * 3.0, 2.0 * np.pi * u2
    expected = torch.from_numpy(np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:999])
    got = box_muller(words, 999, 3.0)
    assert got.dtype == torch.float32 and got.shape == (999,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)  # float32 rounding
