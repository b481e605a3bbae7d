"""The compiled loops: the fold is the float64 sum in the given order to the bit, whatever the
grouping; the statistics match float64 references and show NaN and Inf; the mean and the Gaussian
noise are their float64 formulas rounded to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.kernels import FOLD_WIDTH, box_muller, divided, fold_, probed_fold_, segment_statistics


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


def probed_case(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = (1, 5000, 4096, 2049, 7)
    reference = torch.randn(sum(sizes), generator=gen)
    parts = [reference + torch.randn(sum(sizes), generator=gen) * 1e-2 for _ in range(count)]
    weights = (torch.rand(count, generator=gen) * 5).tolist()
    total = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    return sizes, reference, parts, weights, total


@pytest.mark.parametrize("count", [FOLD_WIDTH, FOLD_WIDTH - 1])
def test_the_probed_fold_is_the_fold_and_the_statistics_in_one_pass(count):
    sizes, reference, parts, weights, total = probed_case(count)
    expected = fold_(total.clone(), parts, weights)
    everything = np.ones(len(sizes), dtype=np.bool_)
    rows, folded = probed_fold_(
        total, parts, weights, reference, *segments(*sizes), everything, [np.inf] * count
    )
    assert folded == [sum(sizes)] * count and torch.equal(total, expected)
    for part, row in zip(parts, rows, strict=True):
        assert row == pytest.approx(segment_statistics(part, reference, *segments(*sizes)), rel=1e-5)
    only_distances = np.zeros(len(sizes), dtype=np.bool_)
    rows_without, _ = probed_fold_(
        total, parts, weights, reference, *segments(*sizes), only_distances, [np.inf] * count
    )
    assert (rows_without[:, :, 1:] == 0).all() and rows_without[:, :, 0] == pytest.approx(
        rows[:, :, 0], rel=1e-5
    )


@pytest.mark.parametrize("count", [FOLD_WIDTH, FOLD_WIDTH - 1])
def test_the_probed_fold_stops_taking_a_part_at_a_nan_or_past_its_cap(count):
    """Part 1 holds a NaN; part 0's cap is half its squared distance. All of FOLD_WIDTH parts go
    through one pass, which stops taking a part at its block that holds the NaN or would pass the
    cap (what it took is the part's leading elements); fewer parts are folded whole or not at all."""
    sizes, reference, parts, weights, total = probed_case(count, seed=1)
    parts[1][6000] = float("nan")
    distance = float((parts[0].double() - reference.double()).square().sum())
    caps = [distance / 2] + [np.inf] * (count - 1)
    start = total.clone()
    rows, folded = probed_fold_(
        total, parts, weights, reference, *segments(*sizes), np.ones(5, np.bool_), caps
    )
    assert torch.isfinite(total).all()
    assert not np.isfinite(rows[1, :, 0].sum()) and rows[0, :, 0].sum() == pytest.approx(distance, rel=1e-5)
    expected = start.clone()
    for part, weight, count_folded in zip(parts, weights, folded, strict=True):
        fold_(expected[:count_folded], [part[:count_folded]], [weight])  # each part's taken prefix, in order
    assert torch.equal(total, expected)
    if count < FOLD_WIDTH:
        assert folded == [0, 0] + [sum(sizes)] * (count - 2)
        return
    assert folded[1] == 5001 and folded[2:] == [sum(sizes)] * (count - 2)  # 5001: the NaN's block starts
    block_starts = sorted({*range(1, 5001, 2048), *range(5001, 9097, 2048), 9097, 11146, sum(sizes)})
    taken, next_end = folded[0], block_starts[block_starts.index(folded[0]) + 1]
    squared = (parts[0].double() - reference.double()).square().cumsum(0)
    assert 0 < taken and float(squared[taken - 1]) <= caps[0] < float(squared[next_end - 1])
