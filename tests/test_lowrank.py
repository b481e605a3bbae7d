"""``recompress`` against a dense float64 SVD, on both of ``factored_svd``'s randomized paths
(through the factors, and with the product formed) and on rectangular shapes."""

from __future__ import annotations

import math

import pytest
import torch

import strategies.factored_svd as factored_svd
from fedpeft.state import LowRankDelta
from strategies.lowrank import OVERSAMPLING, recompress

EPS32 = torch.finfo(torch.float32).eps
CAP = 16


@pytest.fixture(params=["factored", "dense"])
def path(request, monkeypatch):
    """Force one randomized path (wherever n exceeds the width): never or always form the product."""
    monkeypatch.setattr(factored_svd, "EXACT_RATIO", 1)
    monkeypatch.setattr(factored_svd, "DENSE_RATIO", 0 if request.param == "factored" else 10**9)
    return request.param


def with_spectrum(d_out: int, d_in: int, n: int, singular_values: torch.Tensor, seed: int) -> LowRankDelta:
    """Float32 factors U (d_out x n), V (n x d_in) whose product has the given singular values: each
    of the n columns of U mixes all of them, as stacked client factors do."""
    gen = torch.Generator().manual_seed(seed)
    r = len(singular_values)
    left = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64)).Q
    mix = torch.randn(r, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    U = (left * singular_values) @ mix
    return LowRankDelta(U=U.float(), V=(torch.linalg.pinv(mix) @ right.T).float())


def product(delta: LowRankDelta) -> torch.Tensor:
    return delta.U.double() @ delta.V.double()


def rounding_bound(delta: LowRankDelta) -> float:
    """eps32 sqrt(n + d_in) ||U||_F ||V||_F: the error bound factored_svd states for float32."""
    n, d_in = delta.V.shape
    return EPS32 * math.sqrt(n + d_in) * float(delta.U.norm() * delta.V.norm())


def error(out: LowRankDelta, delta: LowRankDelta) -> float:
    return float((product(out) - product(delta)).norm())


@pytest.mark.parametrize("shape", [(160, 120), (120, 160)])
@pytest.mark.parametrize("spectrum", ["well-conditioned", "ill-conditioned"])
def test_recompression_is_exact_up_to_float32_rounding_when_the_true_rank_is_within_the_cap(
    path, shape, spectrum
):
    values = torch.linspace(2, 1, 12) if spectrum == "well-conditioned" else torch.logspace(0, -5, 12)
    delta = with_spectrum(*shape, 60, values.double(), seed=1)
    assert CAP + OVERSAMPLING < 60  # the randomized path, not the exact one
    out, discarded = recompress(delta, CAP)
    assert out.rank <= CAP
    assert error(out, delta) <= rounding_bound(delta)
    assert error(out, delta) <= 1e-5 * float(product(delta).norm())
    assert discarded < 1e-10


def test_fedex_cancellation_stays_within_the_float32_bound(path):
    """The FedEx residual sum_k p_k B_k A_k - B̄ Ā of clients near a shared A: far smaller than its
    terms (kappa = ||U|| ||V|| / ||U V|| > 100), of rank (K - 1) r <= cap up to B̄'s rounding."""
    gen = torch.Generator().manual_seed(2)
    K, r, d_out, d_in = 4, 8, 160, 120
    p = [0.4, 0.3, 0.2, 0.1]
    A0 = torch.randn(r, d_in, generator=gen)
    A = [A0 + 1e-3 * torch.randn(r, d_in, generator=gen) for _ in range(K)]
    B = [1e-3 * torch.randn(d_out, r, generator=gen) for _ in range(K)]
    weighted_B = [pk * b for pk, b in zip(p, B, strict=True)]
    mean_A = sum(pk * a for pk, a in zip(p, A, strict=True))
    delta = LowRankDelta(U=torch.cat([*weighted_B, -sum(weighted_B)], 1), V=torch.cat([*A, mean_A]))
    cap = (K - 1) * r
    assert cap + OVERSAMPLING < (K + 1) * r
    assert float(delta.U.norm() * delta.V.norm()) > 100 * float(product(delta).norm())
    out, discarded = recompress(delta, cap)
    assert error(out, delta) <= rounding_bound(delta)
    assert discarded < (rounding_bound(delta) / float(product(delta).norm())) ** 2


@pytest.mark.parametrize(
    ("spectrum", "excess"),
    [("gap at the cap", 1e-2), ("decaying", 0.25), ("random factors", 0.25)],
)
def test_recompression_beyond_the_cap_is_near_best_and_reports_what_it_discards(path, spectrum, excess):
    """Against a dense float64 SVD: the error is within ``excess`` of the best rank-cap one (one power
    iteration on the factored path, three with the product formed), and ``discarded`` is the error's
    share of the energy, exactly with the product formed and within the probe estimate's bound
    (factored_svd's docstring, x = 10) through the factors."""
    delta = beyond_the_cap(spectrum)
    s = torch.linalg.svdvals(product(delta))
    best, total = float((s[CAP:] ** 2).sum()), float((s**2).sum())
    out, discarded = recompress(delta, CAP)
    err = error(out, delta) ** 2
    assert out.rank == CAP
    assert best * (1 - 1e-6) <= err <= best * (1 + excess)
    slack = 1e-4 if path == "dense" else estimate_slack(delta, x=10.0)
    assert discarded == pytest.approx(err / total, rel=slack)


def beyond_the_cap(spectrum: str) -> LowRankDelta:
    """A 160 x 120 product of rank 100 or 120 spread over n = 200 columns."""
    if spectrum == "random factors":  # as stacked clients: no gap, slowly decaying
        gen = torch.Generator().manual_seed(3)
        return LowRankDelta(U=torch.randn(160, 200, generator=gen), V=torch.randn(200, 120, generator=gen))
    if spectrum == "decaying":
        values = torch.arange(1, 101) ** -0.5
    else:
        small = 0.05 * torch.rand(100 - CAP, generator=torch.Generator().manual_seed(0))
        values = torch.cat([torch.linspace(2, 1, CAP), small.sort(descending=True).values])
    return with_spectrum(160, 120, 200, values.double(), seed=3)


def estimate_slack(delta: LowRankDelta, x: float) -> float:
    """The relative error bound of the outside energy's probe estimate, 2 sqrt(x / (s r)) + 2 x / (s r)
    (failing with probability <= 2 exp(-x)), checked here on ``leading_svd``'s own subspace; r is the
    stable rank of the outside part, measured on the dense product."""
    left, s, right, outside = factored_svd.leading_svd(delta.U, delta.V, CAP + OVERSAMPLING)
    residual = product(delta) - (left * s) @ right
    tau = torch.linalg.svdvals(residual)
    energy = float((tau**2).sum())
    stable_rank = energy / float(tau[0] ** 2)
    sr = factored_svd.TAIL_PROBES * stable_rank
    slack = 2 * math.sqrt(x / sr) + 2 * x / sr
    assert abs(outside - energy) <= slack * energy
    return slack


@pytest.mark.parametrize("n", [4, 60])  # the exact path, then the randomized one
def test_a_zero_delta_recompresses_to_zero(path, n):
    delta = LowRankDelta(U=torch.zeros(160, n), V=torch.randn(n, 120))
    out, discarded = recompress(delta, CAP)
    assert discarded == 0.0
    assert not product(out).any()


def test_a_merged_delta_at_most_twice_the_width_takes_the_exact_route():
    delta = with_spectrum(160, 120, 2 * (CAP + OVERSAMPLING), torch.logspace(0, -3, 40).double(), seed=5)
    s = torch.linalg.svdvals(product(delta))
    out, discarded = recompress(delta, CAP)
    assert error(out, delta) ** 2 == pytest.approx(float((s[CAP:] ** 2).sum()), rel=1e-6)  # the best
    assert discarded == pytest.approx(float((s[CAP:] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_recompression_is_deterministic(path):
    delta = with_spectrum(160, 120, 200, torch.arange(1, 101).double() ** -0.5, seed=4)
    first, first_discarded = recompress(delta, CAP)
    torch.randn(1000)  # the global generator's state does not matter
    second, second_discarded = recompress(LowRankDelta(U=delta.U.clone(), V=delta.V.clone()), CAP)
    assert torch.equal(first.U, second.U) and torch.equal(first.V, second.V)
    assert first_discarded == second_discarded
