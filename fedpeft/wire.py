"""GlobalState / ClientUpdate <-> Flower records, and the bytes they take on the wire.

Flower's ``Array`` goes through numpy, which has no bfloat16: ``to_array`` casts bf16 tensors to
float32 on encode (the only lossless common type); receivers cast to their own working dtype.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy_format
from torch import Tensor

from fedpeft.compression import ErrorFeedback, Packed, pack
from fedpeft.config import ClientConfig
from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState, LowRankDelta

STATE_ARRAYS, STATE_META = "state", "state-meta"
UPDATE_ARRAYS, UPDATE_META, UPDATE_METRICS = "update", "update-meta", "metrics"
NUM_EXAMPLES = "num-examples"
NUM_TRAINED = "num-trained"
WEIGHT = "weight"  # a masked reply's weight under the strategy's weighting (secure aggregation)


SCALE_SUFFIX = ".scale"


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


def encode_state(state: GlobalState) -> RecordDict:
    """What the server sends clients: merged delta, adapter (if any) and extras. Strategy state
    stays on the server."""
    arrays: dict[str, Array] = {}
    meta: dict[str, int | float | bool] = {"round": state.round, "has-adapter": state.adapter is not None}
    for name, d in state.merged.items():
        arrays[f"merged/{name}/U"] = to_array(d.U)
        arrays[f"merged/{name}/V"] = to_array(d.V)
    for name, f in (state.adapter or {}).items():
        arrays[f"adapter/{name}/A"] = to_array(f.A)
        arrays[f"adapter/{name}/B"] = to_array(f.B)
        meta[f"scale/{name}"] = f.scale
    for name, t in state.extras.items():
        arrays[f"extra/{name}"] = to_array(t)
    return RecordDict({STATE_ARRAYS: ArrayRecord(array_dict=arrays), STATE_META: ConfigRecord(meta)})


def decode_state(content: RecordDict) -> GlobalState:
    arrays, meta = _get(content, STATE_ARRAYS, ArrayRecord), _get(content, STATE_META, ConfigRecord)
    groups, extras = _split(arrays, {"merged": ("U", "V"), "adapter": ("A", "B")})
    merged = {n: LowRankDelta(U=p["U"], V=p["V"]) for n, p in groups["merged"].items()}
    adapter = None
    if _meta(meta, "has-adapter", bool):
        adapter = {
            n: AdapterFactors(A=p["A"], B=p["B"], scale=_meta(meta, f"scale/{n}", float))
            for n, p in groups["adapter"].items()
        }
    return GlobalState(round=_meta(meta, "round", int), merged=merged, adapter=adapter, extras=extras)


def encode_update(
    update: ClientUpdate,
    send_A: bool = True,
    compression: str = "none",
    reference: dict[str, AdapterFactors] | None = None,
    feedback: ErrorFeedback | None = None,
) -> RecordDict:
    """The reply record; with ``send_A=False`` (frozen, shared A) only B travels.

    With a lossy ``compression`` (``fedpeft.compression``), each factor travels as its delta
    from ``reference`` (the adapter the client received) when there is one, through
    ``feedback`` (error feedback, updated in place) when given; without a reference (a fresh
    init each round), the factors themselves are compressed.
    """
    delta = compression != "none" and reference is not None
    arrays: dict[str, Array] = {}
    meta: dict[str, int | float | str | bool] = {
        "round": update.round,
        "rank": update.rank,
        "alpha": float(update.alpha),
        "sent-A": send_A,
        "compression": compression,
        "delta": delta,
    }
    for name, f in update.factors.items():
        for part, rank_dim in (("A", 0), ("B", 1)) if send_A else (("B", 1),):
            key, tensor = f"lora/{name}/{part}", getattr(f, part)
            if compression == "none":
                arrays[key] = to_array(tensor)
                continue
            if delta:
                tensor = tensor.float() - getattr(reference[name], part).float()  # type: ignore[index]
            packer = feedback.pack if feedback is not None and delta else _pack
            packed = packer(key, tensor, compression, rank_dim)
            arrays[key] = to_array(packed.values)
            if packed.scale is not None:
                arrays[key + SCALE_SUFFIX] = to_array(packed.scale)
        meta[f"scale/{name}"] = f.scale
    for name, t in update.extras.items():
        arrays[f"extra/{name}"] = to_array(t)
    metrics = {NUM_EXAMPLES: update.num_examples, NUM_TRAINED: update.num_trained, **update.metrics}
    return RecordDict(
        {
            UPDATE_ARRAYS: ArrayRecord(array_dict=arrays),
            UPDATE_META: ConfigRecord(meta),
            UPDATE_METRICS: MetricRecord(metrics),
        }
    )


def decode_update(
    content: RecordDict,
    client_id: str = "",
    frozen: dict[str, AdapterFactors] | None = None,
    into: DecodeBuffer | None = None,
) -> ClientUpdate:
    """Decode a reply. ``frozen`` is the global adapter the client started from: a reply
    without A (``sent-A`` false) takes A from it, and delta-coded factors are added to it.
    With ``into``, the tensors live in that reused buffer (see ``DecodeBuffer``)."""
    arrays, meta = _get(content, UPDATE_ARRAYS, ArrayRecord), _get(content, UPDATE_META, ConfigRecord)
    metrics = dict(_get(content, UPDATE_METRICS, MetricRecord))
    sent_A = _meta(meta, "sent-A", bool)
    groups, extras = _split(arrays, {"lora": ("A", "B") if sent_A else ("B",)}, into)
    delta = bool(meta.get("delta", False))
    missing = sorted(set(groups["lora"]) - set(frozen or {}))
    if missing and (delta or not sent_A):
        raise WireError(f"the reply is relative to a global adapter that lacks {missing[:3]}")
    for name, pair in groups["lora"].items():
        if delta:
            for part, tensor in pair.items():
                base = getattr(frozen[name], part)  # type: ignore[index]
                if tensor.shape != base.shape or tensor.dtype != base.dtype:
                    raise WireError(
                        f"{name}/{part} is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"the global adapter's {base.dtype} {tuple(base.shape)}"
                    )
                tensor.add_(base)
        if not sent_A:
            pair["A"] = frozen[name].A  # type: ignore[index]
    factors = {
        n: AdapterFactors(A=p["A"], B=p["B"], scale=_meta(meta, f"scale/{n}", float))
        for n, p in groups["lora"].items()
    }
    num_examples, num_trained = metrics.pop(NUM_EXAMPLES, None), metrics.pop(NUM_TRAINED, 0)
    for key, count in ((NUM_EXAMPLES, num_examples), (NUM_TRAINED, num_trained)):
        if not isinstance(count, int) or count < 0:
            raise WireError(f"'{key}' must be a non-negative integer, got {count!r}")
    return ClientUpdate(
        factors=factors,
        extras=extras,
        num_examples=num_examples,
        num_trained=num_trained,
        round=_meta(meta, "round", int),
        rank=_meta(meta, "rank", int),
        alpha=_meta(meta, "alpha", float),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        client_id=client_id,
    )


def _pack(name: str, tensor: Tensor, codec: str, rank_dim: int) -> Packed:
    return pack(tensor, codec, rank_dim)


FEEDBACK = "error-feedback"


def load_feedback(node_state: RecordDict) -> ErrorFeedback:
    """The error-feedback residuals a client keeps in its Flower ``Context.state``."""
    record = node_state.get(FEEDBACK)
    return ErrorFeedback(decode_arrays(record) if isinstance(record, ArrayRecord) else None)


def store_feedback(node_state: RecordDict, feedback: ErrorFeedback) -> None:
    node_state[FEEDBACK] = ArrayRecord(array_dict={k: to_array(t) for k, t in feedback.residuals.items()})


def _get(content: RecordDict, key: str, kind: type):
    if key not in content or not isinstance(content[key], kind):
        raise WireError(f"record '{key}' ({kind.__name__}) is missing")
    return content[key]


def _meta(meta: ConfigRecord, key: str, kind: type):
    value = meta.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"'{key}' must be {kind.__name__}, got {value!r}")
    return value


def _split(
    arrays: ArrayRecord, groups: dict[str, tuple[str, ...]], into: DecodeBuffer | None = None
) -> tuple[dict[str, dict[str, dict[str, Tensor]]], dict[str, Tensor]]:
    """Sort ``group/module/part`` keys into ``{group: {module: {part: tensor}}}``, and
    ``extra/name`` keys into the extras."""
    found: dict[str, dict[str, dict[str, Tensor]]] = {g: {} for g in groups}
    extras: dict[str, Tensor] = {}
    for key, tensor in decode_arrays(arrays, into).items():
        kind, _, rest = key.partition("/")
        if kind == "extra" and rest:
            extras[rest] = tensor
            continue
        module, _, part = rest.rpartition("/")
        if kind not in groups or part not in groups[kind] or not module:
            raise WireError(f"unexpected array key {key!r}")
        found[kind].setdefault(module, {})[part] = tensor
    for kind, modules in found.items():
        for module, pair in modules.items():
            missing = set(groups[kind]) - set(pair)
            if missing:
                raise WireError(f"{kind} module {module!r} lacks {sorted(missing)}")
    return found, extras


PLAN = "plan"
IDENTITY = "identity"


def encode_identity(client_id: str) -> RecordDict:
    return RecordDict({IDENTITY: ConfigRecord({"client-id": client_id})})


def decode_identity(content: RecordDict) -> str:
    return _meta(_get(content, IDENTITY, ConfigRecord), "client-id", str)


@dataclass
class RoundInstructions:
    """The non-tensor part of a server->client training message."""

    round: int
    init_seed: int
    plan: ClientPlan
    client_config: ClientConfig


def encode_instructions(instructions: RoundInstructions) -> ConfigRecord:
    record: dict[str, int | float | bool | str] = {
        "round": instructions.round,
        "init-seed": instructions.init_seed,
        "train-lora-A": instructions.plan.train_lora_A,
        "send-lora-A": instructions.plan.send_lora_A,
        "weighting": instructions.plan.weighting,
        "client-config": instructions.client_config.to_json(),
    }
    record.update({f"option/{k}": v for k, v in instructions.plan.options.items()})
    return ConfigRecord(record)


def decode_instructions(content: RecordDict) -> RoundInstructions:
    record = _get(content, PLAN, ConfigRecord)
    options = {k.removeprefix("option/"): v for k, v in record.items() if k.startswith("option/")}
    return RoundInstructions(
        round=_meta(record, "round", int),
        init_seed=_meta(record, "init-seed", int),
        plan=ClientPlan(
            train_lora_A=_meta(record, "train-lora-A", bool),
            send_lora_A=_meta(record, "send-lora-A", bool),
            weighting=_meta(record, "weighting", str),
            options=options,
        ),
        client_config=ClientConfig.from_json(_meta(record, "client-config", str)),
    )


def encode_train_message(state: GlobalState, instructions: RoundInstructions) -> RecordDict:
    """Everything a client needs for one round: the global state and the instructions."""
    content = encode_state(state)
    content[PLAN] = encode_instructions(instructions)
    return content
