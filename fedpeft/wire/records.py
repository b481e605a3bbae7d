"""The record layer of the wire: GlobalState, ClientUpdate, round instructions and identities
<-> Flower ``RecordDict``s, each key named once below (arrays through ``fedpeft.wire.packed``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedpeft.calibration import ClassMoments
from fedpeft.compression import ErrorFeedback, Packed, pack
from fedpeft.config import ClientConfig
from fedpeft.state import (
    AdapterFactors,
    ClientPlan,
    ClientUpdate,
    FactorShapes,
    FlatTensors,
    GlobalState,
    LowRankDelta,
    SpanLayout,
)
from fedpeft.wire.packed import (
    DecodeBuffer,
    Manifest,
    WireError,
    float32_span,
    pack_tensors,
    unpack_tensors,
)

STATE_ARRAYS, STATE_META = "state", "state-meta"
UPDATE_ARRAYS, UPDATE_META, UPDATE_METRICS = "update", "update-meta", "metrics"
NUM_EXAMPLES = "num-examples"
NUM_TRAINED = "num-trained"
WEIGHT = "weight"  # a masked reply's weight under the strategy's weighting (secure aggregation)

SCALES = "scales"  # meta: each module's LoRA scale, in the order the modules' tensors travel
PLAN = "plan"
IDENTITY = "identity"
FEEDBACK = "error-feedback"
MOMENTS, MOMENTS_META = "calibration-moments", "calibration-meta"


def encode_state(state: GlobalState) -> RecordDict:
    """What the server sends clients: merged delta, adapter (if any) and extras. Strategy state
    stays on the server."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, int | float | bool] = {"round": state.round, "has-adapter": state.adapter is not None}
    for name, d in state.merged.items():
        tensors[f"merged/{name}/U"] = d.U
        tensors[f"merged/{name}/V"] = d.V
    for name, f in (state.adapter or {}).items():
        tensors[f"adapter/{name}/A"] = f.A
        tensors[f"adapter/{name}/B"] = f.B
        if f.R is not None:
            tensors[f"adapter/{name}/R"] = f.R
    if state.adapter is not None:
        meta[SCALES] = [float(f.scale) for f in state.adapter.values()]
    for name, t in state.extras.items():
        tensors[f"extra/{name}"] = t
    return RecordDict({STATE_ARRAYS: pack_tensors(tensors), STATE_META: ConfigRecord(meta)})


def decode_state(content: RecordDict) -> GlobalState:
    arrays, meta = _get(content, STATE_ARRAYS, ArrayRecord), _get(content, STATE_META, ConfigRecord)
    groups, extras = _split(arrays, {"merged": ("U", "V"), "adapter": ("A", "B")}, optional=("R",))
    merged = {n: LowRankDelta(U=p["U"], V=p["V"]) for n, p in groups["merged"].items()}
    adapter = None
    if _meta(meta, "has-adapter", bool):
        scales = _scales(meta, tuple(groups["adapter"]))
        adapter = {
            n: AdapterFactors(A=p["A"], B=p["B"], scale=scales[n], R=p.get("R"))
            for n, p in groups["adapter"].items()
        }
    return GlobalState(round=_meta(meta, "round", int), merged=merged, adapter=adapter, extras=extras)


def encode_update(
    update: ClientUpdate,
    send_A: bool = True,
    compression: str = "none",
    send_B: bool = True,
    reference: dict[str, AdapterFactors] | None = None,
    feedback: ErrorFeedback | None = None,
    send_extras: bool = True,
    reference_extras: dict[str, Tensor] | None = None,
) -> RecordDict:
    """The reply record; with ``send_A=False`` (frozen, shared A) only B travels, with
    ``send_B=False`` (a personal or frozen B) only A; a LoRA-SB core R always travels; with
    ``send_extras=False`` (a personal head) no dense extras.

    With a lossy ``compression`` (``fedpeft.compression``), each factor travels as its delta
    from ``reference`` (the adapter the client received) when there is one, and the dense extras
    as their deltas from ``reference_extras`` when it holds each of them, through ``feedback``
    (error feedback, updated in place) when given; without a reference (a fresh init each
    round), the values themselves are compressed.
    """
    lossy = compression != "none"
    delta = lossy and reference is not None
    delta_extras = (
        lossy
        and send_extras
        and reference_extras is not None
        and all(
            n in reference_extras and reference_extras[n].shape == t.shape for n, t in update.extras.items()
        )
    )
    send_R = any(f.R is not None for f in update.factors.values())
    meta: dict[str, int | float | str | bool] = {
        "round": update.round,
        "rank": update.rank,
        "alpha": float(update.alpha),
        "sent-A": send_A,
        "sent-B": send_B,
        "sent-R": send_R,
        "sent-extras": send_extras,
        "compression": compression,
        "delta": delta,
        "delta-extras": delta_extras,
    }

    def encoded(key: str, tensor: Tensor, base: Tensor | None, rank_dim: int | None) -> Tensor | Packed:
        if not lossy:
            return tensor
        if base is not None:
            tensor = tensor.float() - base.float()
        if feedback is not None and base is not None:
            return feedback.pack(key, tensor, compression, rank_dim)
        return pack(tensor, compression, rank_dim)

    tensors: dict[str, Tensor | Packed] = {}
    sends = (("A", 0, send_A), ("B", 1, send_B), ("R", 0, send_R))
    parts = [(part, rank_dim) for part, rank_dim, sent in sends if sent]
    for name, f in update.factors.items():
        for part, rank_dim in parts:
            base = getattr(reference[name], part) if delta else None  # type: ignore[index]
            tensors[f"lora/{name}/{part}"] = encoded(f"lora/{name}/{part}", getattr(f, part), base, rank_dim)
    meta[SCALES] = [float(f.scale) for f in update.factors.values()]
    for name, t in update.extras.items() if send_extras else ():
        base = reference_extras[name] if delta_extras else None  # type: ignore[index]
        tensors[f"extra/{name}"] = encoded(f"extra/{name}", t, base, 0 if t.ndim == 2 else None)
    metrics = {NUM_EXAMPLES: update.num_examples, NUM_TRAINED: update.num_trained, **update.metrics}
    return RecordDict(
        {
            UPDATE_ARRAYS: pack_tensors(tensors),
            UPDATE_META: ConfigRecord(meta),
            UPDATE_METRICS: MetricRecord(metrics),
        }
    )


def decode_update(
    content: RecordDict,
    client_id: str = "",
    frozen: dict[str, AdapterFactors] | None = None,
    into: DecodeBuffer | None = None,
    frozen_extras: dict[str, Tensor] | None = None,
) -> ClientUpdate:
    """Decode a reply. ``frozen`` is the global adapter the client started from: a reply
    without A (``sent-A`` false) takes A from it, and delta-coded factors are added to it; a reply
    without extras (a personal head) takes ``frozen_extras``, the global ones.
    With ``into``, the tensors live in that reused buffer (see ``DecodeBuffer``).

    A plain float32 reply decodes to ``ClientUpdate.flat``, a view of the message's bytes, and
    its factors are views of it built on first access (``LazyFactors``): a streaming fold that
    takes the span whole never pays hundreds of per-tensor views."""
    # plain dicts of Flower's records, copied in one call: each lookup through its typed mapping
    # is a Python call, and a reply's decoding makes about twenty of them
    arrays = _get(content, UPDATE_ARRAYS, ArrayRecord)
    meta = dict(_get(content, UPDATE_META, ConfigRecord).items())
    metrics = dict(_get(content, UPDATE_METRICS, MetricRecord).items())
    sent_A, sent_B = _meta(meta, "sent-A", bool), bool(meta.get("sent-B", True))
    sent_R = bool(meta.get("sent-R", False))
    parts = tuple(part for part, sent in (("A", sent_A), ("B", sent_B), ("R", sent_R)) if sent)
    delta, delta_extras = bool(meta.get("delta", False)), bool(meta.get("delta-extras", False))
    sent_extras = bool(meta.get("sent-extras", True))
    rank = _meta(meta, "rank", int)
    flat = None  # a reply that carries all it trained as it is, not relative to the global state
    if not (delta or delta_extras or (not sent_extras and frozen_extras)):
        flat = _flat_tensors(arrays, parts)
    if flat is None:
        groups, extras = _split(arrays, {"lora": parts}, into=into, writable=delta or delta_extras)
        modules = tuple(groups["lora"])
    else:
        extras = {
            name: flat.span[offset : offset + size].view(shape)
            for name, shape, offset, size in _extra_entries(flat.layout)
        }
        modules = _modules(flat.layout)
    if not sent_extras:
        extras = dict(frozen_extras or {})
    elif delta_extras:
        _add_base(extras, frozen_extras or {}, "extras")
    missing = sorted(set(modules) - set(frozen or {}))
    if missing and (delta or not sent_A or not sent_B):
        raise WireError(f"the reply is relative to a global adapter that lacks {missing[:3]}")
    scales = _scales(meta, modules)

    def start(name: str) -> AdapterFactors:
        """The module as this client started from it: the global one, truncated to its rank."""
        base = frozen[name]  # type: ignore[index]
        return base.truncated(rank, scales[name]) if base.rank > rank > 0 else base

    def factors_of(groups: dict[str, dict[str, dict[str, Tensor]]]) -> dict[str, AdapterFactors]:
        for name, pair in groups["lora"].items():
            if not (delta or not sent_A or not sent_B):
                continue
            began = start(name)
            if delta:
                _add_base(pair, {part: getattr(began, part) for part in pair}, name)
            if not sent_A:
                pair["A"] = began.A
            if not sent_B:
                pair["B"] = began.B
        return {
            n: AdapterFactors(A=p["A"], B=p["B"], scale=scales[n], R=p.get("R"))
            for n, p in groups["lora"].items()
        }

    def shapes_of(layout: SpanLayout) -> dict[str, FactorShapes]:
        """``factors_of``'s shapes for a reply that decoded whole, without building them."""
        sent = dict(zip(layout.names, layout.shapes, strict=True))
        out = {}
        for name in modules:
            A, B = sent.get(f"A/{name}"), sent.get(f"B/{name}")
            if A is None or B is None:  # the global module's, at this client's rank (``start``)
                base = frozen[name]  # type: ignore[index]
                width = rank if base.rank > rank > 0 else base.rank
                A = A if A is not None else (width, base.A.shape[1])
                B = B if B is not None else (base.B.shape[0], width)
            out[name] = FactorShapes(A, B, sent.get(f"R/{name}"))
        return out

    if flat is None:
        factors: Mapping[str, AdapterFactors] = factors_of(groups)
    else:
        layout = flat.layout
        build = lambda: factors_of(_split(arrays, {"lora": parts})[0])  # noqa: E731
        factors = LazyFactors(modules, build, scales, lambda: shapes_of(layout))
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
        rank=rank,
        alpha=_meta(meta, "alpha", float),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        client_id=client_id,
        flat=flat,
    )


class LazyFactors(Mapping[str, AdapterFactors]):
    """A decoded reply's factors, built by ``build`` on first access to one of them (its module
    names, scales and shapes are known without it)."""

    def __init__(
        self,
        modules: tuple[str, ...],
        build: Callable[[], dict[str, AdapterFactors]],
        scales: Mapping[str, float],
        shapes: Callable[[], dict[str, FactorShapes]],
    ) -> None:
        self.modules = modules
        self.scales = scales  # each module's LoRA scale, known without building the factors
        self._build: Callable[[], dict[str, AdapterFactors]] | None = build
        self._factors: dict[str, AdapterFactors] = {}
        self._shapes_of: Callable[[], dict[str, FactorShapes]] | None = shapes
        self._shapes: dict[str, FactorShapes] = {}

    def shapes(self) -> dict[str, FactorShapes]:
        """Each module's factor shapes, worked out (once) without building the factors."""
        if self._shapes_of is not None:
            self._shapes, self._shapes_of = self._shapes_of(), None
        return self._shapes

    def __getitem__(self, module: str) -> AdapterFactors:
        if self._build is not None:
            self._factors, self._build = self._build(), None
        return self._factors[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _flat_tensors(arrays: ArrayRecord, parts: tuple[str, ...]) -> FlatTensors | None:
    """The reply's trained tensors as one float32 view of its bytes, named as
    ``fedpeft.state.trained_tensors`` names them, when its payload is plain float32."""
    found = float32_span(arrays)
    if found is None:
        return None
    manifest, span = found
    return FlatTensors(_span_layout(manifest, parts), span)


@functools.lru_cache(maxsize=16)
def _span_layout(manifest: Manifest, parts: tuple[str, ...]) -> SpanLayout:
    """A float32 reply's wire keys (``lora/<module>/<part>``, ``extra/<name>``) as trained-tensor
    names (``<part>/<module>``, ``extra/<name>``); ``WireError`` for a key that fits nowhere.
    Cached: a round's replies share one manifest, and one layout object lets them be compared
    by identity."""
    keys = tuple(e.name for e in manifest.entries)
    places = _places(keys, (("lora", parts),), ())
    names = tuple(f"{part}/{module}" if kind else f"extra/{module}" for kind, module, part in places)
    return SpanLayout(names, tuple(e.shape for e in manifest.entries))


@functools.lru_cache(maxsize=16)
def _modules(layout: SpanLayout) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.partition("/")[2] for n in layout.names if not n.startswith("extra/")))


@functools.lru_cache(maxsize=16)
def _extra_entries(layout: SpanLayout) -> tuple[tuple[str, tuple[int, ...], int, int], ...]:
    """(name without ``extra/``, shape, offset, size) of each of the layout's extras."""
    rows = zip(layout.names, layout.shapes, layout.offsets, layout.sizes, strict=True)
    return tuple((name[len("extra/") :], *rest) for name, *rest in rows if name.startswith("extra/"))


def _add_base(deltas: dict[str, Tensor], bases: dict[str, Tensor], what: str) -> None:
    """Delta-coded tensors (decoded writable) plus what the client started from, in place."""
    for key, tensor in deltas.items():
        base = bases.get(key)
        if base is None:
            raise WireError(f"the reply's {what} are relative to global ones that lack {key!r}")
        if tensor.shape != base.shape or tensor.dtype != base.dtype:
            raise WireError(
                f"{what}/{key} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the global one {base.dtype} {tuple(base.shape)}"
            )
        tensor.add_(base)


def load_feedback(node_state: RecordDict) -> ErrorFeedback:
    """The error-feedback residuals a client keeps in its Flower ``Context.state``."""
    record = node_state.get(FEEDBACK)
    return ErrorFeedback(unpack_tensors(record, writable=True) if isinstance(record, ArrayRecord) else None)


def store_feedback(node_state: RecordDict, feedback: ErrorFeedback) -> None:
    if feedback.residuals:  # uncompressed uploads leave nothing to carry (and nothing to keep on disk)
        node_state[FEEDBACK] = pack_tensors(feedback.residuals)


def _get(content: RecordDict, key: str, kind: type):
    record = content.get(key)
    if not isinstance(record, kind):
        raise WireError(f"record '{key}' ({kind.__name__}) is missing")
    return record


def _meta(meta: Mapping[str, object], key: str, kind: type):
    value = meta.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"'{key}' must be {kind.__name__}, got {value!r}")
    return value


def _scales(meta: Mapping[str, object], modules: tuple[str, ...]) -> dict[str, float]:
    """``scales``: each module's LoRA scale, in the order its tensors travel, checked to be a
    positive finite number (one list entry: a meta entry per module, hundreds of lookups through
    Flower's typed mapping, cost more than the rest of a small reply's decoding)."""
    values = meta.get(SCALES)
    if not isinstance(values, list) or len(values) != len(modules):
        raise WireError(f"'{SCALES}' must list one LoRA scale per module ({len(modules)}), got {values!r}")
    if not set(map(type, values)) <= {int, float}:
        _refuse_scale(values, modules)
    return _checked_scales(tuple(values), modules)


@functools.lru_cache(maxsize=16)
def _checked_scales(values: tuple[int | float, ...], modules: tuple[str, ...]) -> dict[str, float]:
    """The mapping of numbers ``values`` once checked, once per distinct list: a round's replies
    carry the same scales (checking 120 of them cost a third of decoding a SmolLM2 reply). Shared
    by the replies that carry them: read, never written."""
    scales = np.array(values, dtype=np.float64)
    if not (np.isfinite(scales) & (scales > 0)).all():
        _refuse_scale(values, modules)
    return dict(zip(modules, scales.tolist(), strict=True))


def _refuse_scale(values: Sequence[object], modules: tuple[str, ...]) -> NoReturn:
    name, value = next((n, v) for n, v in zip(modules, values, strict=True) if not _positive_finite(v))
    raise WireError(f"the scale of {name} in '{SCALES}' must be a positive finite number, got {value!r}")


def _positive_finite(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0  # type: ignore[arg-type]


def _split(
    arrays: ArrayRecord,
    groups: dict[str, tuple[str, ...]],
    optional: tuple[str, ...] = (),
    into: DecodeBuffer | None = None,
    writable: bool = False,
) -> tuple[dict[str, dict[str, dict[str, Tensor]]], dict[str, Tensor]]:
    """Sort ``group/module/part`` keys into ``{group: {module: {part: tensor}}}`` (every part of
    ``groups[group]`` required, those in ``optional`` allowed), and ``extra/name`` keys into the
    extras (``into`` and ``writable`` as ``unpack_tensors`` takes them)."""
    tensors = unpack_tensors(arrays, into, writable)
    places = _places(tuple(tensors), tuple(groups.items()), optional)
    found: dict[str, dict[str, dict[str, Tensor]]] = {g: {} for g in groups}
    extras: dict[str, Tensor] = {}
    for (kind, module, part), tensor in zip(places, tensors.values(), strict=True):
        if kind is None:
            extras[module] = tensor
        else:
            found[kind].setdefault(module, {})[part] = tensor
    return found, extras


@functools.lru_cache(maxsize=16)
def _places(
    keys: tuple[str, ...], groups: tuple[tuple[str, tuple[str, ...]], ...], optional: tuple[str, ...]
) -> tuple[tuple[str | None, str, str], ...]:
    """Where ``_split`` puts each key: (group, module, part), or (None, name, "") for an extra;
    ``WireError`` for a key that fits nowhere or a module that lacks a part. Cached: a round's
    replies share their keys."""
    allowed = dict(groups)
    places: list[tuple[str | None, str, str]] = []
    seen: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        kind, _, rest = key.partition("/")
        if kind == "extra" and rest:
            places.append((None, rest, ""))
            continue
        module, _, part = rest.rpartition("/")
        if kind not in allowed or part not in (*allowed[kind], *optional) or not module:
            raise WireError(f"unexpected array key {key!r}")
        places.append((kind, module, part))
        seen.setdefault((kind, module), set()).add(part)
    for (kind, module), parts in seen.items():
        missing = set(allowed[kind]) - parts
        if missing:
            raise WireError(f"{kind} module {module!r} lacks {sorted(missing)}")
    return tuple(places)


def encode_moments(head: str, moments: ClassMoments) -> RecordDict:
    """A client's CCVR statistics: the head they are of, and its per-class moments."""
    arrays = {"counts": moments.counts, "sums": moments.sums, "outer": moments.outer}
    return RecordDict(
        {
            MOMENTS: pack_tensors(arrays),
            MOMENTS_META: ConfigRecord({"head": head}),
        }
    )


def decode_moments(content: RecordDict) -> tuple[str, ClassMoments]:
    arrays = unpack_tensors(_get(content, MOMENTS, ArrayRecord))
    if set(arrays) != {"counts", "sums", "outer"}:
        raise WireError(f"calibration moments need counts, sums and outer; got {sorted(arrays)}")
    head = _meta(_get(content, MOMENTS_META, ConfigRecord), "head", str)
    return head, ClassMoments(**{k: v.to(torch.float64) for k, v in arrays.items()})


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
    run_key: str = ""  # names the run across server restarts: what a client keeps is kept per run


def encode_instructions(instructions: RoundInstructions) -> ConfigRecord:
    record: dict[str, int | float | bool | str] = {
        "round": instructions.round,
        "init-seed": instructions.init_seed,
        "train-lora-A": instructions.plan.train_lora_A,
        "send-lora-A": instructions.plan.send_lora_A,
        "train-lora-B": instructions.plan.train_lora_B,
        "personal-B": instructions.plan.personal_B,
        "personal-extras": instructions.plan.personal_extras,
        "train-extras": instructions.plan.train_extras,
        "init-gradient": instructions.plan.init_gradient,
        "weighting": instructions.plan.weighting,
        "client-config": instructions.client_config.to_json(),
        "run-key": instructions.run_key,
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
            train_lora_B=bool(record.get("train-lora-B", True)),
            personal_B=bool(record.get("personal-B", False)),
            personal_extras=bool(record.get("personal-extras", False)),
            train_extras=bool(record.get("train-extras", True)),
            init_gradient=str(record.get("init-gradient", "")),
            weighting=_meta(record, "weighting", str),
            options=options,
        ),
        client_config=ClientConfig.from_json(_meta(record, "client-config", str)),
        run_key=str(record.get("run-key", "")),
    )


def encode_train_message(state: GlobalState, instructions: RoundInstructions) -> RecordDict:
    """Everything a client needs for one round: the global state and the instructions."""
    content = encode_state(state)
    content[PLAN] = encode_instructions(instructions)
    return content
