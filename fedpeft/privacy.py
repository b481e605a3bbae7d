"""Differential privacy primitives: L2 clipping of a whole update, Gaussian noise and uniform draws
from a cryptographically secure stream, and an (ε, δ) accountant over rounds (opacus' RDP
accountant, with its state made persistable)."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp
from torch import Tensor

from fedpeft import gaussian

KEY_BYTES = 32


def clip_factor(norm: float, max_norm: float) -> float:
    """The factor that brings a vector of L2 norm ``norm`` down to at most ``max_norm``."""
    return max_norm / norm if norm > max_norm else 1.0


class SecureRandom:
    """Uniform and Gaussian draws from the ChaCha20 keystream of a secret 256-bit key.

    The key is drawn from the OS (``os.urandom``) unless given; whoever holds it can regenerate
    every draw, so it lives only in the server's checkpoint (``state_dict``). Each call uses the
    keystream under a fresh nonce (its call number), so a source restored from ``state_dict``
    continues exactly where the original stopped. ``insecure_for_tests`` derives the key from a
    small seed: reproducible, and no privacy at all.

    Written by hand because torch's and numpy's generators are not cryptographically secure (their
    state can be recovered from outputs, and a known seed regenerates them) and opacus' secure mode
    needs the unmaintained torchcsprng; the stream cipher is ``cryptography``'s.
    """

    def __init__(self, key: bytes | None = None, calls: int = 0) -> None:
        self.key = key if key is not None else os.urandom(KEY_BYTES)
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a SecureRandom key is {KEY_BYTES} bytes")
        self.calls = calls

    @classmethod
    def insecure_for_tests(cls, seed: int) -> SecureRandom:
        """A deterministic source (key derived from ``seed``): for tests only, never for privacy."""
        return cls(hashlib.sha256(f"fedpeft insecure test noise {seed}".encode()).digest())

    def _words(self, count: int) -> np.ndarray:
        """``count`` uniformly random 64-bit words."""
        nonce = (0).to_bytes(4, "little") + self.calls.to_bytes(12, "little")  # block counter, call
        self.calls += 1
        encryptor = Cipher(algorithms.ChaCha20(self.key, nonce), mode=None).encryptor()
        return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 values uniform on [0, 1), 53 random bits each."""
        return (self._words(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, count: int, std: float) -> Tensor:
        """``count`` float32 draws of N(0, std²) (the ziggurat on the stream's words:
        ``fedpeft.gaussian``)."""
        return gaussian.normal(count, std, self._words)

    def state_dict(self) -> dict[str, Any]:
        return {"key": torch.frombuffer(bytearray(self.key), dtype=torch.uint8), "calls": self.calls}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SecureRandom:
        return cls(bytes(state["key"].tolist()), int(state["calls"]))


class PrivacyAccountant:
    """(ε, δ) after repeated rounds of the subsampled Gaussian mechanism (client-level DP).

    ``sample_rate`` is the fraction of clients sampled per round; ``noise_multiplier`` z is the noise
    standard deviation divided by the clipping norm.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.rounds = 0

    def step(self) -> None:
        self.rounds += 1

    def epsilon(self, rounds: int | None = None) -> float:
        """ε after ``rounds`` rounds (default: the rounds taken so far)."""
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0:
            return 0.0
        epsilon, _ = rdp.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=self._rdp_per_round * rounds, delta=self.delta
        )
        return float(epsilon)

    @functools.cached_property
    def _rdp_per_round(self) -> np.ndarray:
        """One round's RDP at each of opacus' default orders. The RDP of repeated rounds is this
        times their number (what opacus' ``compute_rdp`` returns for ``steps``), so it is computed
        once, not each round (about 0.15 s a call)."""
        return rdp.compute_rdp(
            q=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=1,
            orders=RDPAccountant.DEFAULT_ALPHAS,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
