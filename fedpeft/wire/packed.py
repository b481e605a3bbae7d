"""The tensor layer of the wire: named tensors <-> one Flower ``Array`` of raw bytes.

A message's tensors travel as a single ``Array`` (stype ``PACKED_STYPE``, dtype uint8) whose data is

    b"FPT1" | manifest length (uint32, little-endian) | manifest (UTF-8 JSON) | zero padding to 8 |
    tensor bytes, back to back in manifest order, each at an offset aligned to its element size

The manifest lists ``[name, dtype, shape, scale_axis]`` per tensor. An int8 tensor may carry float32
scales, stored right after its values: one per index along ``scale_axis``, or one for the whole
tensor (``SCALE_WHOLE``); its value is ``values * scales``. Written by hand because Flower's
``ArrayRecord`` holds one ``.npy`` blob per tensor: a LoRA reply of hundreds of small factors then
costs a 128-byte header and some microseconds of Python per tensor, several times the cost of
the arithmetic that follows (``benchmarks/PERFORMANCE.md``).

Decoding checks the whole manifest against the payload's length before anything is allocated
(known dtypes, non-negative shapes, unique names, scales only on int8, the exact byte count), so
a few bytes that claim a huge tensor cost nothing. Floating-point tensors decode to float32 views
of one buffer in manifest order (one span a strategy can fold in one op): the payload itself when
they are float32 laid back to back (no copy), else a reused ``DecodeBuffer``.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from fedpeft.compression import Packed

# Bytes are read-only and torch has no read-only tensors: it warns so (once per process) when a
# tensor views them; the decoders never write to them. A filter for this module's calls only, not
# ``catch_warnings`` around each: that cost a tenth of decoding a small reply.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning, __name__)

PACKED_STYPE = "fedpeft.packed.v1"
PACKED_KEY = "tensors"
MAGIC = b"FPT1"
PREFIX = struct.Struct("<4sI")  # magic, manifest length
DATA_ALIGN = 8
SCALE_NONE, SCALE_WHOLE = -1, -2
MAX_MANIFEST_BYTES = 16 << 20
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what decodes to float32 views of one buffer


class WireError(ValueError):
    """A record that does not decode to the expected value (missing keys, wrong types)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a packed payload: where its values (and int8 scales) lie."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale_axis: int
    offset: int  # of the values, from the start of the tensor bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel * self.dtype.itemsize

    @property
    def scale_numel(self) -> int:
        if self.scale_axis == SCALE_NONE:
            return 0
        return 1 if self.scale_axis == SCALE_WHOLE else self.shape[self.scale_axis]

    @property
    def scale_offset(self) -> int:
        return _aligned(self.end, 4)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.scale_axis == SCALE_WHOLE:
            return ()
        return tuple(d if i == self.scale_axis else 1 for i, d in enumerate(self.shape))

    @property
    def stop(self) -> int:
        """Where the next tensor may start."""
        return self.scale_offset + 4 * self.scale_numel if self.scale_numel else self.end

    @property
    def dense(self) -> bool:
        """Whether it decodes to float32 (a float, or int8 with scales)."""
        return self.dtype in FLOATS or self.scale_numel > 0


def pack_tensors(tensors: Mapping[str, Tensor | Packed]) -> ArrayRecord:
    """``tensors`` (plain, or compressed ``Packed`` values with their scales) as one packed array."""
    entries, parts, offset = [], [], 0
    for name, value in tensors.items():
        values, scale = (value.values, value.scale) if isinstance(value, Packed) else (value, None)
        values = values.detach().cpu().contiguous()
        if values.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: cannot send a {values.dtype} tensor")
        axis = SCALE_NONE if scale is None else _scale_axis(name, values, scale)
        entry = Entry(name, values.dtype, tuple(values.shape), axis, _aligned(offset, values.dtype.itemsize))
        entries.append(entry)
        parts.append((entry.offset, values))
        if scale is not None:
            parts.append((entry.scale_offset, scale.detach().cpu().float().contiguous()))
        offset = entry.stop
    manifest = json.dumps(
        [[e.name, DTYPE_NAMES[e.dtype], list(e.shape), e.scale_axis] for e in entries], separators=(",", ":")
    ).encode()
    start = _aligned(PREFIX.size + len(manifest), DATA_ALIGN)
    payload = torch.zeros(start + offset, dtype=torch.uint8)
    payload[: PREFIX.size + len(manifest)] = torch.frombuffer(
        bytearray(PREFIX.pack(MAGIC, len(manifest)) + manifest), dtype=torch.uint8
    )
    for at, tensor in parts:
        if tensor.numel():
            payload[start + at : start + at + tensor.numel() * tensor.element_size()] = tensor.reshape(
                -1
            ).view(torch.uint8)
    data = payload.numpy().tobytes()
    return ArrayRecord(array_dict={PACKED_KEY: Array("uint8", (len(data),), PACKED_STYPE, data)})


def _scale_axis(name: str, values: Tensor, scale: Tensor) -> int:
    """The axis ``scale`` varies along (``SCALE_WHOLE`` for one scale), for int8 values only."""
    if values.dtype != torch.int8:
        raise TypeError(f"{name}: only int8 values carry scales")
    if scale.numel() == 1:
        return SCALE_WHOLE
    axes = [i for i, d in enumerate(scale.shape) if d != 1]
    if scale.ndim != values.ndim or len(axes) != 1 or scale.shape[axes[0]] != values.shape[axes[0]]:
        raise TypeError(
            f"{name}: scales of shape {tuple(scale.shape)} do not run along one axis of {tuple(values.shape)}"
        )
    return axes[0]


def _aligned(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def payload_of(record: ArrayRecord) -> bytes:
    """The data of a packed record's one array, checked to be one."""
    if set(record) != {PACKED_KEY}:
        raise WireError(f"a packed record holds one array '{PACKED_KEY}', not {sorted(record)[:3]}")
    array = record[PACKED_KEY]
    if array.stype != PACKED_STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise WireError(f"the array is not a {PACKED_STYPE} payload ({array.stype!r}, {array.dtype!r})")
    return array.data


@dataclass(frozen=True, eq=False)  # one object per manifest (``_parsed``): hashed by identity
class Manifest:
    """A payload's entries, and what decoding needs of them worked out once: a round's replies
    share one manifest, so this is parsed and derived once per round (``_parsed`` caches it), not
    once per reply."""

    entries: tuple[Entry, ...]
    start: int  # where the tensor bytes start in the payload
    size: int  # the tensor bytes the entries span
    dense: tuple[Entry, ...]  # the entries that decode to float32, in order
    dense_numels: tuple[int, ...]
    dense_numel: int
    float32_run: bool  # whether the dense entries are float32 laid back to back (decoded in place)


def read_manifest(data: bytes) -> Manifest:
    """A payload's manifest; ``WireError`` unless its entries account for the payload exactly."""
    if len(data) < PREFIX.size:
        raise WireError("the payload is shorter than its header")
    magic, length = PREFIX.unpack_from(data)
    if magic != MAGIC or length > min(len(data) - PREFIX.size, MAX_MANIFEST_BYTES):
        raise WireError("the payload's header is not a fedpeft manifest")
    manifest = _parsed(data[PREFIX.size : PREFIX.size + length])
    if manifest.start + manifest.size != len(data):
        raise WireError(
            f"the manifest accounts for {manifest.start + manifest.size} bytes, the payload holds {len(data)}"
        )
    return manifest


@functools.lru_cache(maxsize=16)
def _parsed(manifest: bytes) -> Manifest:
    """A manifest's entries and what is derived from them; cached, since a round's replies share one."""
    try:
        rows = json.loads(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"the manifest does not parse: {exc}") from exc
    if not isinstance(rows, list):
        raise WireError("the manifest is not a list")
    entries, offset, names = [], 0, set()
    for row in rows:
        entry = _entry(row, offset)
        if entry.name in names:
            raise WireError(f"the manifest names {entry.name!r} twice")
        names.add(entry.name)
        entries.append(entry)
        offset = entry.stop
    dense = tuple(e for e in entries if e.dense)
    float32_run = bool(dense) and all(e.dtype is torch.float32 for e in dense)
    float32_run = float32_run and all(b.offset == a.end for a, b in zip(dense, dense[1:], strict=False))
    numels = tuple(e.numel for e in dense)
    start = _aligned(PREFIX.size + len(manifest), DATA_ALIGN)
    return Manifest(tuple(entries), start, offset, dense, numels, sum(numels), float32_run)


def _entry(row: object, offset: int) -> Entry:
    if not (isinstance(row, list) and len(row) == 4):
        raise WireError(f"a manifest row must be [name, dtype, shape, scale_axis], got {str(row)[:80]}")
    name, dtype, shape, axis = row
    if not isinstance(name, str) or dtype not in DTYPES:
        raise WireError(f"a manifest row has an unknown name or dtype: {str(row)[:80]}")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
        raise WireError(f"{name}: the shape {str(shape)[:80]} is not a list of non-negative integers")
    ndim = len(shape)
    if type(axis) is not int or not (axis in (SCALE_NONE, SCALE_WHOLE) or 0 <= axis < ndim):
        raise WireError(f"{name}: bad scale axis {axis!r}")
    if axis != SCALE_NONE and dtype != "int8":
        raise WireError(f"{name}: only int8 values carry scales, not {dtype}")
    return Entry(name, DTYPES[dtype], tuple(shape), axis, _aligned(offset, DTYPES[dtype].itemsize))


class DecodeBuffer:
    """One flat float32 buffer reused to decode replies one after the other.

    A fresh buffer per reply costs a page fault per 4 KiB the first time it is written (for a
    67 MB reply, about twice the copy itself); reusing one avoids that. What is decoded into it
    is valid only until the next decode into the same buffer.
    """

    def __init__(self) -> None:
        self.tensor = torch.empty(0)

    def take(self, numel: int) -> Tensor:
        if self.tensor.numel() < numel:
            self.tensor = torch.empty(numel)
        return self.tensor[:numel]


def unpack_tensors(
    record: ArrayRecord, into: DecodeBuffer | None = None, writable: bool = False
) -> dict[str, Tensor]:
    """Every tensor of a packed record, floating-point ones (and int8 with scales) as float32
    views of one buffer in manifest order, the rest as they were sent.

    Without ``writable``, float32 tensors laid back to back are views of the payload itself
    (read-only: nothing may write into them); else they are copied into ``into``'s buffer (or a
    new one), as every other dense tensor is."""
    data = payload_of(record)
    manifest = read_manifest(data)
    start, dense = manifest.start, manifest.dense
    flat = None if writable else _float32_span(data, manifest)
    if flat is None:
        numel = manifest.dense_numel
        flat = into.take(numel) if into is not None else torch.empty(numel)
        _fill(flat, data, start, dense)
    views = dict(zip((e.name for e in dense), _split(flat, manifest), strict=True))
    return {e.name: views[e.name] if e.dense else _owned(data, start, e) for e in manifest.entries}


def float32_span(record: ArrayRecord) -> tuple[Manifest, Tensor] | None:
    """A packed record's manifest and every tensor as one read-only float32 view of its bytes,
    when all of them are float32 laid back to back (a plain float32 reply); else None."""
    data = payload_of(record)
    manifest = read_manifest(data)
    if len(manifest.dense) != len(manifest.entries):
        return None
    span = _float32_span(data, manifest)
    return None if span is None else (manifest, span)


def _float32_span(data: bytes, manifest: Manifest) -> Tensor | None:
    """A read-only float32 view of the payload over the dense entries, if they are float32 and
    back to back."""
    if not manifest.float32_run:
        return None
    span = _raw(data, manifest.start + manifest.dense[0].offset, torch.float32, manifest.dense_numel)
    return span if span.data_ptr() % 4 == 0 else None


def _fill(flat: Tensor, data: bytes, start: int, dense: tuple[Entry, ...]) -> None:
    """Decode ``dense`` into ``flat``: one copy per run of back-to-back float32 tensors, a cast
    (and for int8 a multiplication by its scales) for each other tensor."""
    at = 0
    i = 0
    while i < len(dense):
        j = i + 1
        if dense[i].dtype is torch.float32:
            while j < len(dense) and dense[j].dtype is torch.float32 and dense[j].offset == dense[j - 1].end:
                j += 1
        count = sum(e.numel for e in dense[i:j])
        target = flat[at : at + count]
        if count:
            first = dense[i]
            target.copy_(_raw(data, start + first.offset, first.dtype, count))
            if first.scale_numel:
                scale = _raw(data, start + first.scale_offset, torch.float32, first.scale_numel)
                target.view(first.shape).mul_(scale.view(first.scale_shape))
        at += count
        i = j


def _split(flat: Tensor, manifest: Manifest) -> list[Tensor]:
    parts = flat.split(manifest.dense_numels)
    return [t.view(e.shape) for t, e in zip(parts, manifest.dense, strict=True)]


def _owned(data: bytes, start: int, entry: Entry) -> Tensor:
    return _raw(data, start + entry.offset, entry.dtype, entry.numel).clone().view(entry.shape)


def _raw(data: bytes, offset: int, dtype: torch.dtype, count: int) -> Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)


def record_nbytes(content: RecordDict) -> int:
    """Bytes of array data in a message: each packed payload whole (its manifest included);
    config and metric records are negligible."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
