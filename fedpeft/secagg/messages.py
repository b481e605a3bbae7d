"""The protocol's records, one ``ConfigRecord`` named ``secagg`` per message (the masked vector
travels as an ``ArrayRecord``). Node ids travel packed as little-endian uint64 bytes (Flower's node
ids are unsigned 64-bit; a ConfigRecord integer is signed)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Self

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.wire import WireError

RECORD = "secagg"
MASKED = "secagg-masked"
KEYS, SHARES, UNMASK = "query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"


def pack_nodes(nodes: list[int]) -> bytes:
    return np.asarray(nodes, dtype="<u8").tobytes()


def unpack_nodes(data: bytes) -> list[int]:
    if len(data) % 8:
        raise WireError("a node list is not a whole number of 8-byte ids")
    return [int(n) for n in np.frombuffer(data, dtype="<u8")]


@dataclass
class _Record:
    """A dataclass that travels as the ``secagg`` ConfigRecord: ``list[int]`` fields are node ids."""

    def to_record(self) -> ConfigRecord:
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = pack_nodes(value) if f.type == "list[int]" else value
        return ConfigRecord(values)

    @classmethod
    def from_content(cls, content: RecordDict) -> Self:
        record = content.get(RECORD)
        if not isinstance(record, ConfigRecord):
            raise WireError(f"record '{RECORD}' is missing")
        values: dict[str, Any] = {}
        kinds = {
            "bytes": bytes,
            "int": int,
            "float": float,
            "str": str,
            "list[int]": bytes,
            "list[bytes]": list,
        }
        for f in fields(cls):
            value = record.get(f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kinds[str(f.type)]) or isinstance(value, bool):
                raise WireError(f"'{RECORD}.{f.name}' must be {f.type}, got {type(value).__name__}")
            if f.type == "list[bytes]" and not all(isinstance(v, bytes) for v in value):
                raise WireError(f"'{RECORD}.{f.name}' must be a list of bytes")
            values[f.name] = unpack_nodes(value) if f.type == "list[int]" else value
        return cls(**values)

    def to_content(self) -> RecordDict:
        return RecordDict({RECORD: self.to_record()})


@dataclass
class KeysRequest(_Record):
    """Stage 1, server -> client: start a session (one attempt at a round)."""

    session: bytes
    round: int


@dataclass
class PublicKeys(_Record):
    """Stage 1, client -> server: the client's two fresh public keys."""

    session: bytes
    share_key: bytes  # X25519 key that encrypts the shares sent to this client
    mask_key: bytes  # X25519 key its pairwise masks are agreed with


@dataclass
class SharesRequest(_Record):
    """Stage 2, server -> client: everyone's public keys (the participants, in node id order)."""

    session: bytes
    threshold: int
    nodes: list[int]
    share_keys: list[bytes]
    mask_keys: list[bytes]


@dataclass
class EncryptedShares(_Record):
    """Stage 2, client -> server: one encrypted share bundle per other participant."""

    session: bytes
    recipients: list[int]
    shares: list[bytes]


@dataclass
class MaskingRequest(_Record):
    """Stage 3, attached to the train message: who masks (those who shared), how to encode."""

    session: bytes
    nodes: list[int]
    clip_range: float
    fraction_bits: int
    max_weight: int  # the largest example count a client may weight by (ring capacity)
    clip_norm: (
        float  # > 0: send the update's delta clipped to this L2 norm, weight 1 (dp); 0: weight by examples
    )


@dataclass
class UnmaskRequest(_Record):
    """Stage 4, server -> client: who survived, who dropped, and the shares addressed to it."""

    session: bytes
    survivors: list[int]
    dropouts: list[int]
    senders: list[int]
    shares: list[bytes]


@dataclass
class RevealedShares(_Record):
    """Stage 4, client -> server: per owner, its share of the self-mask seed (a survivor) or of
    the pairwise-mask key (a dropout), never both."""

    session: bytes
    owners: list[int]
    shares: list[bytes]


def encode_masked(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord(array_dict={"vector": Array(vector)})


def decode_masked(content: RecordDict, size: int) -> np.ndarray:
    """The masked uint64 vector of a reply, checked to be ``size`` long (all the server can check)."""
    record = content.get(MASKED)
    if not isinstance(record, ArrayRecord) or "vector" not in record:
        raise WireError(f"record '{MASKED}' is missing")
    array = record["vector"]
    if array.dtype != "uint64" or tuple(array.shape) != (size,):
        raise WireError(
            f"the masked vector must be uint64 of shape ({size},), got {array.dtype} {tuple(array.shape)}"
        )
    try:
        return array.numpy()
    except ValueError as exc:
        raise WireError(f"the masked vector does not decode: {exc}") from exc
