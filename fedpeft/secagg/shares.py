"""Shamir shares of a client's two secrets (its self-mask seed and its pairwise-mask private key),
and their encryption for the one participant who holds each share.

Shamir's scheme is pycryptodome's (``Crypto.Protocol.SecretSharing.Shamir``, over GF(2^128)); it
shares 16-byte secrets, so each 32-byte secret is shared as two halves (as Flower's SecAgg+ does).
A share travels through the server encrypted with ChaCha20-Poly1305 under a key both ends derive
from X25519 + HKDF, authenticated together with the sender, the recipient and the session, so the
server can neither read a share nor hand it to anyone else.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedpeft.secagg.masks import SEED_BYTES, agree

HALF = 16
SHARE_INFO = b"fedpeft secagg share encryption"
NONCE_BYTES = 12


class ShareError(ValueError):
    """A share that does not decrypt or does not belong to this session."""


@dataclass(frozen=True)
class ShareBundle:
    """What participant number ``index`` (1-based, in node id order) holds of one client's secrets."""

    index: int
    self_seed: bytes  # a share of the self-mask seed b_u (32 bytes: two 16-byte halves)
    mask_key: bytes  # a share of the pairwise-mask private key sk_u (same layout)

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.index) + self.self_seed + self.mask_key

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        if len(data) != 4 + 2 * SEED_BYTES:
            raise ShareError(f"a share bundle is {4 + 2 * SEED_BYTES} bytes, got {len(data)}")
        (index,) = struct.unpack("<I", data[:4])
        return cls(index, data[4 : 4 + SEED_BYTES], data[4 + SEED_BYTES :])


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` shares of a 32-byte ``secret``, any ``threshold`` of which recover it; share i
    (0-based) belongs to participant i + 1."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"secrets are {SEED_BYTES} bytes, got {len(secret)}")
    halves = [Shamir.split(threshold, count, secret[i : i + HALF], ssss=False) for i in (0, HALF)]
    return [low + high for (_, low), (_, high) in zip(*halves, strict=True)]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret from ``{participant index: share}`` (at least the threshold of them; with fewer,
    the result is a wrong secret, not an error: the caller checks the count)."""
    halves = [
        Shamir.combine([(i, s[h : h + HALF]) for i, s in shares.items()], ssss=False) for h in (0, HALF)
    ]
    return halves[0] + halves[1]


def share_secrets(self_seed: bytes, mask_key: bytes, threshold: int, count: int) -> list[ShareBundle]:
    """One bundle per participant: its shares of both secrets."""
    seeds, keys = split(self_seed, threshold, count), split(mask_key, threshold, count)
    return [ShareBundle(i + 1, s, k) for i, (s, k) in enumerate(zip(seeds, keys, strict=True))]


def _associated_data(session: bytes, sender: int, recipient: int) -> bytes:
    return session + struct.pack("<QQ", sender, recipient)


def encrypt(
    bundle: ShareBundle, private: bytes, peer_public: bytes, session: bytes, sender: int, recipient: int
) -> bytes:
    """``bundle`` encrypted for ``recipient`` (nonce || ciphertext || tag)."""
    key = ChaCha20Poly1305(agree(private, peer_public, SHARE_INFO))
    nonce = os.urandom(NONCE_BYTES)
    return nonce + key.encrypt(nonce, bundle.to_bytes(), _associated_data(session, sender, recipient))


def decrypt(
    data: bytes, private: bytes, peer_public: bytes, session: bytes, sender: int, recipient: int
) -> ShareBundle:
    """The bundle ``sender`` encrypted for ``recipient``; ``ShareError`` if it was altered,
    rerouted or belongs to another session."""
    key = ChaCha20Poly1305(agree(private, peer_public, SHARE_INFO))
    try:
        plain = key.decrypt(
            data[:NONCE_BYTES], data[NONCE_BYTES:], _associated_data(session, sender, recipient)
        )
    except InvalidTag as exc:
        raise ShareError(f"the share from node {sender} does not authenticate") from exc
    return ShareBundle.from_bytes(plain)
