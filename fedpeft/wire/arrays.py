"""The array layer of the wire: tensors <-> Flower ``Array``s, checked before anything is
allocated (dtype, byte order, shape against payload, the ``.npy`` header), and decoded into one
reused buffer when a round folds replies one at a time.

Flower's ``Array`` goes through numpy, which has no bfloat16: ``to_array`` casts bf16 tensors to
float32 on encode (the only lossless common type); receivers cast to their own working dtype.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy_format
from torch import Tensor

SCALE_SUFFIX = ".scale"  # an int8 array's companion: its per-rank-component scales


class WireError(ValueError):
    """A record that does not decode to the expected value (missing keys, wrong types)."""


def to_array(tensor: Tensor) -> Array:
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return Array(t.contiguous().numpy())


def from_array(array: Array, out: Tensor | None = None) -> Tensor:
    """The array as a tensor that owns its memory (or copied into ``out``), in one copy.

    ``Array.numpy()`` runs ``np.load`` on a stream (a Python-level header parse, then chunked
    copies): about 60 µs per array, which dominates decoding a reply of hundreds of small LoRA
    factors. A C-order ``.npy`` payload is the tail of ``data``, with ``dtype`` and ``shape``
    already on the ``Array``; anything else takes Flower's path.
    """
    dtype = checked_dtype(array)
    nbytes = math.prod(array.shape) * dtype.itemsize
    if not _c_order_npy(array.data, len(array.data) - nbytes):
        _check_npy_header(array, dtype)  # so np.load allocates no more than the Array claims
        try:
            tensor = torch.from_numpy(array.numpy())
        except ValueError as exc:
            raise WireError(f"an array does not decode: {exc}") from exc
        return tensor if out is None else out.copy_(tensor)
    flat = np.frombuffer(array.data, dtype=dtype, offset=len(array.data) - nbytes)
    if out is None:
        return torch.from_numpy(flat.reshape(array.shape).copy())
    out.numpy().reshape(-1)[:] = flat
    return out


NPY_MIN_HEADER = 10  # magic, version and header length: the smallest .npy header


def checked_dtype(array: Array) -> np.dtype:
    """The array's numpy dtype, if it is a plain native-order number or bool type and its data can
    hold its shape after a ``.npy`` header; else ``WireError`` (checked before any allocation, so
    a few bytes that claim a huge shape cost nothing)."""
    if array.stype != SType.NUMPY:
        raise WireError(f"unsupported array serialization {array.stype!r}")
    try:
        dtype = np.dtype(array.dtype)
    except (TypeError, ValueError) as exc:
        raise WireError(f"unknown array dtype {array.dtype!r}") from exc
    if dtype.kind not in "biuf" or not dtype.isnative:
        raise WireError(f"unsupported array dtype {array.dtype!r}")
    if any(d < 0 for d in array.shape):
        raise WireError(f"negative array shape {array.shape}")
    if len(array.data) < math.prod(array.shape) * dtype.itemsize + NPY_MIN_HEADER:
        raise WireError(f"{len(array.data)} bytes cannot hold a {array.dtype} array of shape {array.shape}")
    return dtype


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


def decode_arrays(arrays: ArrayRecord, into: DecodeBuffer | None = None) -> dict[str, Tensor]:
    """Every array as a tensor. Floating-point ones (and int8 ones with their ``.scale``),
    in record order, become float32 views into one buffer (``into``'s, else a new one): one
    allocation per reply, and one span of memory a strategy can sum in one op."""
    for array in arrays.values():
        checked_dtype(array)
    scales = {k.removesuffix(SCALE_SUFFIX): a for k, a in arrays.items() if k.endswith(SCALE_SUFFIX)}
    if set(scales) - set(arrays):
        raise WireError(f"scales without values: {sorted(set(scales) - set(arrays))[:3]}")
    dense = {
        k: a
        for k, a in arrays.items()
        if k not in scales
        and not k.endswith(SCALE_SUFFIX)
        and a.stype == SType.NUMPY
        and a.dtype in ("float32", "float16")
    }
    dense.update({k: arrays[k] for k in scales})
    numel = sum(math.prod(a.shape) for a in dense.values())
    buffer = into.take(numel) if into is not None else torch.empty(numel)
    out, offset = {}, 0
    for key, array in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if key not in dense:
            out[key] = from_array(array)
            continue
        size = math.prod(array.shape)
        view = buffer[offset : offset + size].view(array.shape)
        offset += size
        if array.dtype == "float32":
            out[key] = from_array(array, out=view)
            continue
        view.copy_(from_array(array))
        if key in scales:
            try:
                view.mul_(from_array(scales[key]))
            except RuntimeError as exc:
                raise WireError(f"the scale of {key!r} does not fit its values: {exc}") from exc
        out[key] = view
    return out


def _check_npy_header(array: Array, dtype: np.dtype) -> None:
    """``WireError`` unless ``array.data`` starts with a ``.npy`` header of its dtype and shape."""
    stream = io.BytesIO(array.data)
    try:
        major, _ = npy_format.read_magic(stream)
        read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
        shape, _, header_dtype = read(stream)
    except Exception as exc:  # numpy's parser of arbitrary bytes: ValueError, SyntaxError, ...
        raise WireError(f"an array's .npy header does not parse: {type(exc).__name__}: {exc}") from exc
    if (shape, header_dtype) != (tuple(array.shape), dtype):
        raise WireError(f"an array's .npy header says {header_dtype} {shape}, not {dtype} {array.shape}")


def _c_order_npy(data: bytes, header_end: int) -> bool:
    """Whether ``data`` is a ``.npy`` file whose header ends at ``header_end`` (its payload is the
    rest) and says the payload is in C order."""
    if header_end < 10 or data[:6] != b"\x93NUMPY":
        return False
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    if start + int.from_bytes(data[8:start], "little") != header_end:
        return False
    return b"'fortran_order': False" in data[start:header_end]


def record_nbytes(content: RecordDict) -> int:
    """Bytes of tensor payload in a message (array data; config and metrics are negligible)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
