"""The compiled loops: the fold is the float64 sum in the given order to the bit, whatever the
grouping; the statistics match float64 references and show NaN and Inf; the mean and the Gaussian
noise are their float64 formulas rounded to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.kernels import (
    FOLD_WIDTH,
    divided,
    float32_cap,
    fold_,
    masked_fold_,
    released_,
    screened_fold_,
    segment_statistics,
    segments_statistics,
)


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


def test_parts_measured_in_one_pass_get_the_statistics_each_gets_alone():
    sizes, reference, parts, _, _ = screened_case(FOLD_WIDTH - 1, seed=3)
    rows = segments_statistics(parts, reference, *segments(*sizes))
    assert rows.shape == (FOLD_WIDTH - 1, len(sizes), 3)
    for part, row in zip(parts, rows, strict=True):
        assert np.array_equal(row, segment_statistics(part, reference, *segments(*sizes)))


def test_released_is_the_float64_noised_mean_rounded_once_to_float32():
    gen = torch.Generator().manual_seed(2)
    total = torch.randn(999, generator=gen, dtype=torch.float64) * 7
    noise, reference = torch.randn(999, generator=gen), torch.randn(999, generator=gen)
    expected = ((total + noise.double()) / 3.0 + reference.double()).float()
    assert torch.equal(released_(torch.empty(999), total, noise, reference, 3.0), expected)


def screened_case(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = (1, 5000, 4096, 2049, 7)
    reference = torch.randn(sum(sizes), generator=gen)
    parts = [reference + torch.randn(sum(sizes), generator=gen) * 1e-2 for _ in range(count)]
    weights = (torch.rand(count, generator=gen) * 5).tolist()
    total = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    return sizes, reference, parts, weights, total


@pytest.mark.parametrize("count", [1, FOLD_WIDTH - 1, FOLD_WIDTH])
def test_the_screened_fold_is_the_fold_and_the_statistics_in_one_pass(count):
    """Parts within their caps (one exactly at its squared distance) are folded whole, bitwise as
    ``fold_`` folds them, and measured as ``segment_statistics`` measures them."""
    sizes, reference, parts, weights, total = screened_case(count)
    expected = fold_(total.clone(), parts, weights)
    everything = np.ones(len(sizes), dtype=np.bool_)
    exact = float(segment_statistics(parts[0], reference, *segments(*sizes))[:, 0].sum())
    caps = [exact] + [np.inf] * (count - 1)
    rows = screened_fold_(total, parts, weights, reference, *segments(*sizes), everything, caps)
    assert torch.equal(total, expected) and rows.shape == (count, len(sizes), 3)
    for part, row in zip(parts, rows, strict=True):
        assert row == pytest.approx(segment_statistics(part, reference, *segments(*sizes)), rel=1e-5)
    only_distances = np.zeros(len(sizes), dtype=np.bool_)
    rows_without = screened_fold_(total, parts, weights, reference, *segments(*sizes), only_distances, caps)
    assert (rows_without[:, :, 1:] == 0).all() and rows_without[:, :, 0] == pytest.approx(
        rows[:, :, 0], rel=1e-5
    )


@pytest.mark.parametrize("count", [2, FOLD_WIDTH])
def test_the_screened_fold_leaves_out_nan_inf_and_elements_past_the_cap(count):
    """Part 1 holds a NaN and an Inf; part 0 one outsized element under a cap of a tenth of its
    squared distance. The sum takes every element within its part's cap (bitwise, in order) and
    nothing else; ``masked_fold_`` takes back what was folded of a part, or folds the rest."""
    sizes, reference, parts, weights, total = screened_case(count, seed=1)
    parts[1][6000], parts[1][10] = float("nan"), float("inf")
    parts[0][3] = 1e30
    squares = [(part - reference).square() for part in parts]  # float32, as the fold computes them
    distance = float(squares[0][torch.arange(len(reference)) != 3].double().sum())
    caps = [distance / 10] + [np.inf] * (count - 1)
    start = total.clone()
    rows = screened_fold_(total, parts, weights, reference, *segments(*sizes), np.ones(5, np.bool_), caps)
    assert torch.isfinite(total).all() and not np.isfinite(rows[1, :, 0].sum())
    assert rows[0, :, 0].sum() == pytest.approx(float(squares[0].double().sum()), rel=1e-5)
    within = [square <= float(float32_cap(cap)) for square, cap in zip(squares, caps, strict=True)]
    assert 0 < int(within[0].sum()) < len(reference) and int((~within[1]).sum()) == 2
    kept = [torch.where(inside, part, 0.0) for part, inside in zip(parts, within, strict=True)]
    assert torch.equal(total, fold_(start.clone(), kept, weights))
    masked_fold_(total, parts[0], weights[0], reference, caps[0], inside=False)  # the rest of part 0
    masked_fold_(total, parts[1], -weights[1], reference, caps[1], inside=True)  # part 1 taken back
    expected = fold_(start.clone(), [parts[0], *parts[2:]], [weights[0], *weights[2:]])
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-9 * 1e30 * weights[0])
    torch.testing.assert_close(total[4:], expected[4:], rtol=1e-12, atol=1e-12)


def test_screened_fold_refuses_more_parts_than_its_width():
    sizes, reference, parts, weights, total = screened_case(FOLD_WIDTH + 1)
    with pytest.raises(ValueError, match="1 to"):
        screened_fold_(total, parts, weights, reference, *segments(*sizes), np.ones(5, np.bool_), [1.0] * 5)
