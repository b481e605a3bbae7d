"""The record layer of the wire: GlobalState, ClientUpdate, round instructions and identities
<-> Flower ``RecordDict``s, each key named once below (arrays through ``fedpeft.wire.arrays``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedpeft.calibration import ClassMoments
from fedpeft.compression import ErrorFeedback, Packed, pack
from fedpeft.config import ClientConfig
from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState, LowRankDelta
from fedpeft.wire.arrays import SCALE_SUFFIX, DecodeBuffer, WireError, decode_arrays, to_array

STATE_ARRAYS, STATE_META = "state", "state-meta"
UPDATE_ARRAYS, UPDATE_META, UPDATE_METRICS = "update", "update-meta", "metrics"
NUM_EXAMPLES = "num-examples"
NUM_TRAINED = "num-trained"
WEIGHT = "weight"  # a masked reply's weight under the strategy's weighting (secure aggregation)

PLAN = "plan"
IDENTITY = "identity"
FEEDBACK = "error-feedback"
MOMENTS, MOMENTS_META = "calibration-moments", "calibration-meta"


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
        if f.R is not None:
            arrays[f"adapter/{name}/R"] = to_array(f.R)
        meta[f"scale/{name}"] = f.scale
    for name, t in state.extras.items():
        arrays[f"extra/{name}"] = to_array(t)
    return RecordDict({STATE_ARRAYS: ArrayRecord(array_dict=arrays), STATE_META: ConfigRecord(meta)})


def decode_state(content: RecordDict) -> GlobalState:
    arrays, meta = _get(content, STATE_ARRAYS, ArrayRecord), _get(content, STATE_META, ConfigRecord)
    groups, extras = _split(arrays, {"merged": ("U", "V"), "adapter": ("A", "B")}, optional=("R",))
    merged = {n: LowRankDelta(U=p["U"], V=p["V"]) for n, p in groups["merged"].items()}
    adapter = None
    if _meta(meta, "has-adapter", bool):
        adapter = {
            n: AdapterFactors(A=p["A"], B=p["B"], scale=_meta(meta, f"scale/{n}", float), R=p.get("R"))
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
) -> RecordDict:
    """The reply record; with ``send_A=False`` (frozen, shared A) only B travels, with
    ``send_B=False`` (a personal or frozen B) only A; a LoRA-SB core R always travels; with
    ``send_extras=False`` (a personal head) no dense extras.

    With a lossy ``compression`` (``fedpeft.compression``), each factor travels as its delta
    from ``reference`` (the adapter the client received) when there is one, through
    ``feedback`` (error feedback, updated in place) when given; without a reference (a fresh
    init each round), the factors themselves are compressed.
    """
    delta = compression != "none" and reference is not None
    send_R = any(f.R is not None for f in update.factors.values())
    arrays: dict[str, Array] = {}
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
    }
    sends = (("A", 0, send_A), ("B", 1, send_B), ("R", 0, send_R))
    parts = [(part, rank_dim) for part, rank_dim, sent in sends if sent]
    for name, f in update.factors.items():
        for part, rank_dim in parts:
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
    for name, t in update.extras.items() if send_extras else ():
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
    frozen_extras: dict[str, Tensor] | None = None,
) -> ClientUpdate:
    """Decode a reply. ``frozen`` is the global adapter the client started from: a reply
    without A (``sent-A`` false) takes A from it, and delta-coded factors are added to it; a reply
    without extras (a personal head) takes ``frozen_extras``, the global ones.
    With ``into``, the tensors live in that reused buffer (see ``DecodeBuffer``)."""
    arrays, meta = _get(content, UPDATE_ARRAYS, ArrayRecord), _get(content, UPDATE_META, ConfigRecord)
    metrics = dict(_get(content, UPDATE_METRICS, MetricRecord))
    sent_A, sent_B = _meta(meta, "sent-A", bool), bool(meta.get("sent-B", True))
    sent_R = bool(meta.get("sent-R", False))
    parts = tuple(part for part, sent in (("A", sent_A), ("B", sent_B), ("R", sent_R)) if sent)
    groups, extras = _split(arrays, {"lora": parts}, into=into)
    if not meta.get("sent-extras", True):
        extras = dict(frozen_extras or {})
    delta = bool(meta.get("delta", False))
    missing = sorted(set(groups["lora"]) - set(frozen or {}))
    if missing and (delta or not sent_A or not sent_B):
        raise WireError(f"the reply is relative to a global adapter that lacks {missing[:3]}")
    if frozen is not None and (delta or not sent_A or not sent_B):  # what this client started from
        rank = _meta(meta, "rank", int)
        frozen = {
            n: frozen[n].truncated(rank, _meta(meta, f"scale/{n}", float))
            if frozen[n].rank > rank
            else frozen[n]
            for n in groups["lora"]
        }
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
        if not sent_B:
            pair["B"] = frozen[name].B  # type: ignore[index]
    factors = {
        n: AdapterFactors(A=p["A"], B=p["B"], scale=_meta(meta, f"scale/{n}", float), R=p.get("R"))
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
    arrays: ArrayRecord,
    groups: dict[str, tuple[str, ...]],
    optional: tuple[str, ...] = (),
    into: DecodeBuffer | None = None,
) -> tuple[dict[str, dict[str, dict[str, Tensor]]], dict[str, Tensor]]:
    """Sort ``group/module/part`` keys into ``{group: {module: {part: tensor}}}`` (every part of
    ``groups[group]`` required, those in ``optional`` allowed), and ``extra/name`` keys into the
    extras."""
    found: dict[str, dict[str, dict[str, Tensor]]] = {g: {} for g in groups}
    extras: dict[str, Tensor] = {}
    for key, tensor in decode_arrays(arrays, into).items():
        kind, _, rest = key.partition("/")
        if kind == "extra" and rest:
            extras[rest] = tensor
            continue
        module, _, part = rest.rpartition("/")
        if kind not in groups or part not in (*groups[kind], *optional) or not module:
            raise WireError(f"unexpected array key {key!r}")
        found[kind].setdefault(module, {})[part] = tensor
    for kind, modules in found.items():
        for module, pair in modules.items():
            missing = set(groups[kind]) - set(pair)
            if missing:
                raise WireError(f"{kind} module {module!r} lacks {sorted(missing)}")
    return found, extras


def encode_moments(head: str, moments: ClassMoments) -> RecordDict:
    """A client's CCVR statistics: the head they are of, and its per-class moments."""
    arrays = {"counts": moments.counts, "sums": moments.sums, "outer": moments.outer}
    return RecordDict(
        {
            MOMENTS: ArrayRecord(array_dict={k: to_array(v) for k, v in arrays.items()}),
            MOMENTS_META: ConfigRecord({"head": head}),
        }
    )


def decode_moments(content: RecordDict) -> tuple[str, ClassMoments]:
    arrays = decode_arrays(_get(content, MOMENTS, ArrayRecord))
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


def encode_instructions(instructions: RoundInstructions) -> ConfigRecord:
    record: dict[str, int | float | bool | str] = {
        "round": instructions.round,
        "init-seed": instructions.init_seed,
        "train-lora-A": instructions.plan.train_lora_A,
        "send-lora-A": instructions.plan.send_lora_A,
        "train-lora-B": instructions.plan.train_lora_B,
        "personal-B": instructions.plan.personal_B,
        "personal-extras": instructions.plan.personal_extras,
        "init-gradient": instructions.plan.init_gradient,
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
            train_lora_B=bool(record.get("train-lora-B", True)),
            personal_B=bool(record.get("personal-B", False)),
            personal_extras=bool(record.get("personal-extras", False)),
            init_gradient=str(record.get("init-gradient", "")),
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
