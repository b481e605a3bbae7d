"""Masks: X25519 key agreement, HKDF-SHA256 key derivation, and ChaCha20 as the generator that
expands a 32-byte seed into a uniform vector over Z_2^64 (all from ``cryptography``).

A client u adds to its encoded update its self-mask PRG(b_u) and, for every other participant v,
+PRG(s_uv) if u < v else -PRG(s_uv), where s_uv is derived from X25519(sk_u, pk_v) =
X25519(sk_v, pk_u). In the sum over all participants the pairwise masks cancel; the server
removes the self-masks of the survivors and the pairwise masks of dropped clients once it has
reconstructed their seeds and keys from Shamir shares.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

SEED_BYTES = 32
PAIRWISE_INFO = b"fedpeft secagg pairwise mask"
NONCE = bytes(16)  # every seed expands once per round (fresh keys each attempt): a fixed nonce is safe
CHUNK = 1 << 20  # values generated per ChaCha20 call: bounded scratch memory for any vector size


def new_private_key() -> bytes:
    return private_bytes(X25519PrivateKey.generate())


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw private key."""
    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over the X25519 shared secret, bound to ``info``."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def pairwise_seed(private: bytes, peer_public: bytes) -> bytes:
    return agree(private, peer_public, PAIRWISE_INFO)


def add_prg(out: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """``out += sign * PRG(seed)`` in place over Z_2^64, ``PRG`` being the ChaCha20 keystream read
    as little-endian uint64 (uniform over the ring)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, NONCE), mode=None).encryptor()
    for start in range(0, out.size, CHUNK):
        part = out[start : start + CHUNK]
        stream = np.frombuffer(encryptor.update(bytes(8 * part.size)), dtype="<u8")
        if sign > 0:
            np.add(part, stream, out=part)
        else:
            np.subtract(part, stream, out=part)


def mask(
    encoded: np.ndarray, self_seed: bytes, private: bytes, me: int, peers: Iterable[tuple[int, bytes]]
) -> np.ndarray:
    """``encoded`` (uint64, modified in place) plus the self-mask and the pairwise masks with every
    (node id, public key) in ``peers`` other than ``me``."""
    add_prg(encoded, self_seed)
    for peer, public in peers:
        if peer != me:
            add_prg(encoded, pairwise_seed(private, public), pairwise_sign(me, peer))
    return encoded


def pairwise_sign(me: int, peer: int) -> int:
    """+1 for the lower node id of a pair, -1 for the higher: the pair's masks cancel in the sum."""
    return 1 if me < peer else -1


def unmask(
    total: np.ndarray,
    self_seeds: Iterable[bytes],
    dropped: dict[int, bytes],
    survivors: dict[int, bytes],
) -> None:
    """Take off ``total`` (in place) the self-masks of the survivors (their reconstructed
    ``self_seeds``) and the pairwise masks each survivor (node id -> mask public key) added for
    each ``dropped`` client (node id -> its reconstructed mask private key)."""
    for seed in self_seeds:
        add_prg(total, seed, -1)
    for node, private in dropped.items():
        for survivor, public in survivors.items():
            add_prg(total, pairwise_seed(private, public), -pairwise_sign(survivor, node))
