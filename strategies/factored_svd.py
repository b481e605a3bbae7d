"""Leading singular triplets of a product ``M = U V`` held factored (U: d_out x n, V: n x d_in).

Hand-written because no library does this for a factored product: ``torch.svd_lowrank`` and
scikit-learn's ``randomized_svd`` take the d_out x d_in matrix (forming it costs 2 d_out d_in n
flops), and the exact route (QR of both factors, SVD of the core) costs O((d_out + d_in) n^2 + n^3):
minutes per round once n = (K + 1) r reaches ~1,600 on 4096-wide layers.

``leading_svd(U, V, width)``:

- **exact** (float64 QR of U and V^T, SVD of the core) when ``width >= min(d_out, d_in)`` or
  ``n <= EXACT_RATIO * width``: the two QRs cost about 4 d n^2 flops against about 6 d n width for
  the sketch, so up to twice the width they cost no more than it, and are exact;
- otherwise **randomized subspace iteration** (Halko, Martinsson and Tropp 2011, Alg. 4.4) through
  the factors: P = orth(M^T orth(M Omega)) with Omega Gaussian (d_in x width), then the SVD of
  Y = M P gives M P P^T = W S X^T P^T, in 2 q + 1 products with M or M^T (q power iterations).
  It is exact up to rounding whenever rank(M) <= width; beyond, the kept subspace is near-optimal
  (tests/test_lowrank.py measures how near against a dense SVD).

The energy left outside, ||M (I - P P^T)||_F^2, is computed exactly where M is formed (shapes
where that costs about as much as the sketch; M's products are then cheap, so more power
iterations run). On the factored path it is a Hutchinson estimate from s = ``TAIL_PROBES``
Gaussian probes G orthogonalised against P, T_est = ||M G||_F^2 / s: unbiased, and with
r = T / tau_1^2 the stable rank of the outside part (tau_1 its largest singular value),
|T_est - T| <= (2 sqrt(x / (s r)) + 2 x / (s r)) T with probability >= 1 - 2 exp(-x) (Laurent and
Massart 2000, Lemma 1: T_est is a tau_i^2-weighted sum of chi^2_s / s). The exact T needs U^T U
and V V^T (d n^2 flops each, 3 to 6 times the whole sketch at K = 100 on 7B shapes), so only this
part is estimated, never the captured energy, and it is zero up to rounding when rank(M) <= width.

Precision: products with M run in float32, the SVD of Y in float64. The reconstruction error is
then at most about eps32 sqrt(n + d_in) ||U||_F ||V||_F, the rounding of forming U V itself in
float32 (tests/test_lowrank.py checks it): relative to ||U V||_F, eps32 sqrt(n + d_in) kappa with
kappa = ||U||_F ||V||_F / ||U V||_F (kappa, not kappa^2: no Gram matrix is formed). In FedEx's
residual sum_k p_k B_k A_k - B̄ Ā kappa is large (~1e4 for clients near a shared A), but that
residual is added to the weights next to s B̄ Ā, of size ||U|| ||V||, whose own float32 rounding is
of the same order; float64 sketches would double the time.

The test matrices are seeded from the shapes: the same input gives the same output, in a resumed
run too.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import Tensor

POWER_ITERATIONS = 1  # on the factored path: 3 products with M in all, ~2 GFLOP each on 7B shapes
DENSE_POWER_ITERATIONS = 3  # with M formed, a product costs width / n of forming it
DENSE_RATIO = 6  # form M when that costs at most twice the factored sketch's 3 products
EXACT_RATIO = 2  # the exact route while n is at most this many times the width
TAIL_PROBES = 32


def leading_svd(U: Tensor, V: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """(left, s, right, outside): U V ≈ left diag(s) right, with orthonormal columns of ``left``
    and rows of ``right`` (float64, s descending, at most ``width`` of them), and
    ``outside = ||U V - left diag(s) right||_F^2``."""
    d_out, n = U.shape
    d_in = V.shape[1]
    if width >= min(d_out, d_in) or n <= EXACT_RATIO * width:
        return (*_exact_svd(U, V), 0.0)
    U, V = U.float(), V.float()
    test = _gaussian(d_in, width + TAIL_PROBES, seed=zlib.crc32(f"{d_out}x{n}x{d_in}".encode()))
    omega, probes = test.split([width, TAIL_PROBES], dim=1)
    if d_out * d_in <= DENSE_RATIO * width * (d_out + d_in):
        M = U @ V
        P = _row_basis(M.__matmul__, M.T.__matmul__, omega, DENSE_POWER_ITERATIONS)
        Y = M @ P
        outside = float((M - Y @ P.T).double().square().sum())
    else:

        def times(X: Tensor) -> Tensor:
            return U @ (V @ X)

        P = _row_basis(times, lambda X: V.T @ (U.T @ X), omega, POWER_ITERATIONS)
        Y, MG = times(torch.cat([P, probes - P @ (P.T @ probes)], dim=1)).split([width, TAIL_PROBES], 1)
        outside = float(MG.double().square().sum()) / TAIL_PROBES
    W, s, Xt = torch.linalg.svd(Y.double(), full_matrices=False)
    return W, s, Xt @ P.double().T, outside


def _row_basis(
    times: Callable[[Tensor], Tensor], transposed_times: Callable[[Tensor], Tensor], omega: Tensor, q: int
) -> Tensor:
    """An orthonormal basis of the span of (M^T M)^q omega, re-orthonormalised after each product."""
    P = omega
    for _ in range(q):
        P = _orthonormal(transposed_times(_orthonormal(times(P))))
    return P


def _exact_svd(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U V = Q_u (R_u R_v^T) Q_v^T with U = Q_u R_u, V^T = Q_v R_v, and the SVD of the core."""
    q_u, r_u = torch.linalg.qr(U.double())
    q_v, r_v = torch.linalg.qr(V.double().T)
    p, s, qt = torch.linalg.svd(r_u @ r_v.T, full_matrices=False)
    return q_u @ p, s, qt @ q_v.T


def _orthonormal(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y).Q


def _gaussian(rows: int, cols: int, seed: int) -> Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
