"""The secure aggregation core: fixed-point ring, mask cancellation, Shamir recovery, encrypted
share routing, and a statistical test that one masked update looks like uniform noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedpeft.secagg import masks, shares
from fedpeft.secagg.ring import FixedPoint, RingOverflowError

CODEC = FixedPoint(clip_range=8.0, fraction_bits=30)


def client_vectors(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """LoRA-sized float32 values (std 0.05, a few near the clip range)."""
    rng = np.random.default_rng(seed)
    vectors = [rng.normal(0, 0.05, size).astype(np.float32) for _ in range(count)]
    vectors[0][:3] = [7.9, -7.9, 0.5]
    return vectors


def fixed_seed(i: int) -> bytes:
    return bytes([i]) * masks.SEED_BYTES


def test_weighted_fixed_point_sum_equals_the_float_sum_within_the_stated_error():
    vectors, weights = client_vectors(5, 10_000), [3, 120, 1, 57, 1_000_000]
    total = np.zeros(10_000, dtype=np.uint64)
    for v, w in zip(vectors, weights, strict=True):
        encoded, clipped = CODEC.encode(v, w)
        assert clipped == 0
        total += encoded
    mean = CODEC.decode(total) / sum(weights)
    exact = sum(w * v.astype(np.float64) for v, w in zip(vectors, weights, strict=True)) / sum(weights)
    assert np.abs(mean - exact).max() <= CODEC.max_error
    assert CODEC.max_error == 2.0**-31


def test_values_outside_the_range_are_clipped_and_counted():
    encoded, clipped = CODEC.encode(np.array([9.0, -100.0, 1.0]))
    assert clipped == 2
    assert CODEC.decode(encoded).tolist() == [8.0, -8.0, 1.0]
    with pytest.raises(ValueError, match="NaN"):
        CODEC.encode(np.array([np.nan]))


def test_capacity_refuses_weights_that_could_overflow_the_ring():
    capacity = CODEC.capacity()
    assert capacity * 8.0 * 2**30 < 2**63
    CODEC.check_capacity(clients=capacity // 1000, max_weight=1000)
    with pytest.raises(RingOverflowError, match="overflows the 64-bit ring"):
        CODEC.check_capacity(clients=capacity // 1000 + 1, max_weight=1000)
    # at capacity the extreme sum still decodes with the right sign
    total = np.zeros(1, dtype=np.uint64)
    for _ in range(4):
        total += CODEC.encode(np.array([-8.0]), capacity // 4)[0]
    assert CODEC.decode(total)[0] == pytest.approx(-8.0 * (capacity // 4) * 4)


def masked_updates(
    vectors: list[np.ndarray], nodes: list[int]
) -> tuple[list[np.ndarray], list[bytes], list[bytes]]:
    """Each node's encoded vector with its self-mask and pairwise masks; also the secrets."""
    private = [fixed_seed(100 + i) for i in range(len(nodes))]  # X25519 takes any 32 bytes
    peers = [(n, masks.public_key(k)) for n, k in zip(nodes, private, strict=True)]
    seeds = [fixed_seed(i) for i in range(len(nodes))]
    masked = [
        masks.mask(CODEC.encode(v)[0], seed, key, node, peers)
        for v, seed, key, node in zip(vectors, seeds, private, nodes, strict=True)
    ]
    return masked, seeds, private


def test_pairwise_masks_cancel_and_self_masks_come_off_with_their_seeds():
    nodes = [17, 3, 2**63 + 5, 40]
    vectors = client_vectors(4, 1000)
    masked, seeds, _ = masked_updates(vectors, nodes)
    total = np.sum(masked, axis=0, dtype=np.uint64)
    for seed in seeds:
        masks.add_prg(total, seed, -1)
    assert (
        np.abs(CODEC.decode(total) - np.sum(vectors, axis=0, dtype=np.float64)).max() <= 4 * CODEC.max_error
    )


def test_a_dropouts_pairwise_masks_are_removed_with_its_reconstructed_key():
    nodes = [11, 22, 33, 44, 55]
    vectors = client_vectors(5, 500)
    masked, seeds, private = masked_updates(vectors, nodes)
    dropped = 2
    bundles = shares.share_secrets(seeds[dropped], private[dropped], threshold=3, count=5)
    held = {b.index: b.mask_key for b in bundles[:3]}  # any three holders suffice
    key = shares.combine(held)
    assert key == private[dropped]
    survivors = [i for i in range(5) if i != dropped]
    total = np.sum([masked[i] for i in survivors], axis=0, dtype=np.uint64)
    for i in survivors:
        masks.add_prg(total, seeds[i], -1)
        peer_public = masks.public_key(private[i])
        sign = masks.pairwise_sign(nodes[i], nodes[dropped])
        masks.add_prg(total, masks.pairwise_seed(key, peer_public), -sign)
    expected = np.sum([vectors[i] for i in survivors], axis=0, dtype=np.float64)
    assert np.abs(CODEC.decode(total) - expected).max() <= 4 * CODEC.max_error


def test_shamir_needs_the_threshold_of_shares():
    secret = bytes(range(32))
    split = shares.split(secret, threshold=3, count=5)
    assert shares.combine({i + 1: split[i] for i in (0, 2, 4)}) == secret
    assert shares.combine({i + 1: split[i] for i in (1, 3)}) != secret


def test_encrypted_shares_open_only_for_their_recipient_and_session():
    alice, bob, eve = (masks.new_private_key() for _ in range(3))
    bundle = shares.share_secrets(fixed_seed(1), fixed_seed(2), threshold=2, count=3)[1]
    sealed = shares.encrypt(bundle, alice, masks.public_key(bob), b"session", sender=1, recipient=2)
    assert shares.decrypt(sealed, bob, masks.public_key(alice), b"session", sender=1, recipient=2) == bundle
    with pytest.raises(shares.ShareError):
        shares.decrypt(sealed, eve, masks.public_key(alice), b"session", sender=1, recipient=2)
    with pytest.raises(shares.ShareError):  # rerouted by the server
        shares.decrypt(sealed, bob, masks.public_key(alice), b"session", sender=1, recipient=3)
    with pytest.raises(shares.ShareError):  # replayed into another attempt
        shares.decrypt(sealed, bob, masks.public_key(alice), b"other", sender=1, recipient=2)


def uniformity_pvalues(vector: np.ndarray) -> tuple[float, float]:
    """Two tests of 'uniform over Z_2^64': chi-square of every byte position's 256 values (the
    smallest p-value of the 8 positions, Bonferroni-corrected) and Kolmogorov-Smirnov of v / 2^64."""
    columns = vector.view(np.uint8).reshape(-1, 8)
    chi = min(stats.chisquare(np.bincount(columns[:, b], minlength=256)).pvalue for b in range(8))
    ks = stats.kstest(vector.astype(np.float64) / 2.0**64, "uniform").pvalue
    return min(1.0, 8 * chi), ks


def test_one_masked_update_is_indistinguishable_from_uniform_noise():
    """Deterministic (fixed seeds for the data and the masks); alpha = 0.001 per test. The same
    tests reject the unmasked encoding, so they have the power to see structure."""
    nodes = [5, 9, 12]
    vectors = client_vectors(3, 50_000, seed=7)
    masked, _, _ = masked_updates(vectors, nodes)
    chi, ks = uniformity_pvalues(masked[0])
    assert chi > 0.001 and ks > 0.001
    chi, ks = uniformity_pvalues(CODEC.encode(vectors[0], 37)[0])
    assert chi < 1e-12 and ks < 1e-12
