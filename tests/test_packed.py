"""The packed tensor layer of the wire: one Flower array per message, checked before allocation."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedpeft.compression import Packed, pack
from fedpeft.wire import DecodeBuffer, WireError, pack_tensors, unpack_tensors
from fedpeft.wire.packed import MAGIC, PACKED_KEY, PACKED_STYPE, PREFIX


def payload(record: ArrayRecord) -> bytes:
    return record[PACKED_KEY].data


def with_payload(data: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: Array("uint8", (len(data),), PACKED_STYPE, data)})


def with_manifest(rows: list, body: bytes = b"") -> ArrayRecord:
    manifest = json.dumps(rows).encode()
    head = PREFIX.pack(MAGIC, len(manifest)) + manifest
    return with_payload(head + bytes(-len(head) % 8) + body)


def test_every_dtype_round_trips_and_floats_decode_to_float32():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "f64": torch.randn(4, 4, generator=gen).double(),
        "i64": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "u8": torch.arange(3, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    back = unpack_tensors(pack_tensors(tensors))
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        expected = t.float() if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        assert back[name].dtype == expected.dtype and torch.equal(back[name], expected), name


@pytest.mark.parametrize("rank_dim", [0, 1, None])
def test_int8_values_decode_with_their_scales(rank_dim):
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    packed = pack(x, "int8", rank_dim)
    back = unpack_tensors(pack_tensors({"before": torch.ones(1), "x": packed, "after": torch.ones(2)}))
    assert torch.equal(back["x"], packed.values.float() * packed.scale)
    assert torch.equal(back["after"], torch.ones(2))


def test_dense_tensors_are_views_of_one_buffer_in_order():
    tensors = {"a": torch.randn(4, 3), "h": torch.randn(5).half(), "b": torch.randn(2, 2)}
    buffer = DecodeBuffer()
    back = unpack_tensors(pack_tensors(tensors), into=buffer)
    base = buffer.tensor.data_ptr()
    assert [(t.data_ptr() - base) // 4 for t in back.values()] == [0, 12, 17]


def test_writable_decoding_copies_and_leaves_the_payload_alone():
    record = pack_tensors({"a": torch.ones(3, 3)})
    before = bytes(payload(record))
    back = unpack_tensors(record, writable=True)
    back["a"].add_(1)
    assert payload(record) == before and torch.equal(unpack_tensors(record)["a"], torch.ones(3, 3))


def test_int8_scales_must_run_along_one_axis():
    with pytest.raises(TypeError, match="one axis"):
        pack_tensors({"x": Packed(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4, 4))})
    with pytest.raises(TypeError, match="only int8"):
        pack_tensors({"x": Packed(torch.zeros(4), torch.ones(1))})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:-1], "accounts for"),
        (lambda d: d + b"\0" * 4, "accounts for"),
        (lambda d: b"XXXX" + d[4:], "not a fedpeft manifest"),
        (lambda d: d[:3], "shorter than its header"),
        (lambda d: d[:4] + (1 << 30).to_bytes(4, "little") + d[8:], "not a fedpeft manifest"),
        (lambda d: d[:8] + b"{" + d[9:], "does not parse"),
    ],
)
def test_a_corrupted_payload_is_a_wire_error(mutate, match):
    data = payload(pack_tensors({"a": torch.ones(2, 3), "b": torch.ones(4)}))
    with pytest.raises(WireError, match=match):
        unpack_tensors(with_payload(mutate(data)))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({"a": 1}, "not a list"),
        ([["a", "float32", [2]]], r"\[name, dtype, shape, scale_axis\]"),
        ([["a", "complex64", [2], -1]], "unknown name or dtype"),
        ([["a", "float32", [-2], -1]], "non-negative"),
        ([["a", "float32", [2.0], -1]], "non-negative"),
        ([["a", "float32", [2], 0]], "only int8"),
        ([["a", "int8", [2], 1]], "bad scale axis"),
        ([["a", "float32", [1], -1], ["a", "float32", [1], -1]], "twice"),
        ([["a", "float32", [1 << 39, 1 << 39], -1]], "non-negative|accounts for"),
        ([["a", "float32", [1 << 30], -1]], "accounts for"),  # a huge claim costs nothing: refused first
    ],
)
def test_a_bad_manifest_is_a_wire_error(rows, match):
    with pytest.raises(WireError, match=match):
        unpack_tensors(with_manifest(rows, bytes(8)))


def test_a_record_must_hold_exactly_one_packed_array():
    record = pack_tensors({"a": torch.ones(2)})
    with pytest.raises(WireError, match="one array"):
        unpack_tensors(ArrayRecord({**record, "more": record[PACKED_KEY]}))
    array = record[PACKED_KEY]
    for stype, dtype, shape in (
        ("numpy.ndarray", "uint8", array.shape),
        (PACKED_STYPE, "int8", array.shape),
        (PACKED_STYPE, "uint8", (1,)),
    ):
        with pytest.raises(WireError, match="not a"):
            unpack_tensors(ArrayRecord({PACKED_KEY: Array(dtype, shape, stype, array.data)}))
