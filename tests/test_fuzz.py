"""Fuzzing the wire decoder and the reply validator with hypothesis.

Client replies are honest ones (fp32, B only, int8 and fp16 delta-coded) with one mutation each
whose effect is known (dropped or renamed tensors or keys, wrong types, reshaped tensors, a
truncated, extended or re-typed packed payload, NaN, huge values, absurd ranks, wrong rounds, bad
example counts: refused; unknown extra keys: accepted), mutations whose effect is not known
(flipped bytes, tensors cast to other dtypes), several mutations stacked, and wholly random
records and packed payloads. Every reply goes through
``RoundReplies.decode`` then ``offer``/``close`` (the server's own path, with a norm pool as after
a round); a smaller number goes through the real round loop, ``FederatedRun._attempt``. Nothing
may raise; a refused reply has a reason; an accepted one must be safe to aggregate.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rich.console import Console

from client.app import train
from fedpeft.compression import Packed
from fedpeft.state import ClientUpdate
from fedpeft.testing import LocalGrid
from fedpeft.wire import (
    UPDATE_ARRAYS,
    UPDATE_META,
    UPDATE_METRICS,
    WireError,
    decode_update,
    encode_update,
    pack_tensors,
)
from fedpeft.wire.packed import DTYPES, MAGIC, PACKED_KEY, PACKED_STYPE, PREFIX, Entry, read_manifest
from server.loop import FederatedRun
from server.replies import RoundReplies
from server.validation import ReplyLimits, update_norm
from strategies import create_strategy
from tests.factories import sent_state, small_config, trained

RECORDS = (UPDATE_ARRAYS, UPDATE_META, UPDATE_METRICS)
INVALID, VALID, UNKNOWN = "invalid", "valid", "unknown"
CONTEXT = {"clients_per_round": 4, "num_clients": 10}
STATE = sent_state()
POOL = [update_norm(trained(STATE, seed), STATE) for seed in (11, 12, 13)]  # as after round 0
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=1500)


@dataclass
class Reply:
    """A reply taken apart into plain dicts a mutation can edit (its tensors as numpy arrays, an
    int8 tensor's scales beside it as ``<name>.scale``), and put back together: the tensors packed
    as the wire packs them, then ``edits`` applied to the packed array."""

    tensors: dict[str, np.ndarray]
    meta: dict
    metrics: dict
    missing: str | None = None  # a record left out
    swapped: str | None = None  # a record replaced by one of another kind
    extra_records: dict = field(default_factory=dict)
    edits: list[Callable[[Array], Array]] = field(default_factory=list)

    @classmethod
    def of(cls, content: RecordDict) -> Reply:
        data = content[UPDATE_ARRAYS][PACKED_KEY].data
        manifest = read_manifest(data)
        start = manifest.start
        tensors = {}
        for e in manifest.entries:
            tensors[e.name] = raw(data, start + e.offset, e.dtype, e.numel).reshape(e.shape)
            if e.scale_numel:
                tensors[f"{e.name}.scale"] = raw(
                    data, start + e.scale_offset, torch.float32, e.scale_numel
                ).reshape(e.scale_shape)
        return cls(tensors, dict(content[UPDATE_META]), dict(content[UPDATE_METRICS]))

    def packed(self) -> ArrayRecord:
        """The tensors packed; an int8 tensor's scales that no longer fit it travel as a tensor of
        their own (which the decoder does not know)."""
        out: dict[str, torch.Tensor | Packed] = {}
        for name, values in self.tensors.items():
            scale = self.tensors.get(f"{name}.scale")
            if name.endswith(".scale") and name.removesuffix(".scale") in self.tensors:
                continue
            tensor = torch.from_numpy(values.copy())
            out[name] = tensor if scale is None else Packed(tensor, torch.from_numpy(scale.copy()))
            if isinstance(out[name], Packed):
                try:
                    pack_tensors({name: out[name]})
                except TypeError:
                    out[name], out[f"{name}.scale"] = tensor, torch.from_numpy(scale.copy())
        array = pack_tensors(out)[PACKED_KEY]
        for edit in self.edits:
            array = edit(array)
        return ArrayRecord({PACKED_KEY: array})

    def content(self) -> RecordDict:
        records = {
            UPDATE_ARRAYS: self.packed(),
            UPDATE_META: ConfigRecord(self.meta),
            UPDATE_METRICS: MetricRecord(self.metrics),
        }
        if self.swapped:
            records[self.swapped] = (
                ConfigRecord({"x": 1}) if self.swapped == UPDATE_ARRAYS else ArrayRecord(array_dict={})
            )
        records.pop(self.missing, None)
        return RecordDict({**records, **self.extra_records})

    def float_keys(self) -> list[str]:
        return sorted(k for k, a in self.tensors.items() if a.dtype in (np.float32, np.float16))

    def value_keys(self) -> list[str]:
        """Tensor names other than int8 scales."""
        return sorted(k for k in self.tensors if not k.endswith(".scale"))


def raw(data: bytes, offset: int, dtype: torch.dtype, count: int) -> np.ndarray:
    return np.frombuffer(
        data, dtype=torch.empty(0, dtype=dtype).numpy().dtype, count=count, offset=offset
    ).copy()


def honest(kind: str, seed: int) -> RecordDict:
    update = trained(STATE, seed)
    if kind == "B only":
        return encode_update(update, send_A=False)
    if kind in ("int8", "fp16"):
        return encode_update(update, compression=kind, reference=STATE.adapter)
    return encode_update(update)


def required_meta(r: Reply) -> list[str]:
    return sorted({"round", "rank", "alpha", "sent-A"} | ({"scales"} & r.meta.keys()))


# Mutations: each edits the reply and says whether it is now invalid, still valid, or unknown.

WRONG_TYPES = {
    "round": ["1", 1.5, True, [1]],
    "rank": ["4", 4.0, False, [4]],
    "alpha": ["16", True, [16.0], b"\x00"],
    "sent-A": [1, "true", 0.0, [True]],
    "scales": ["1", 1.0, [True], [b"\x00"]],
}


def drop_record(data, r: Reply) -> str:
    r.missing = data.draw(st.sampled_from(RECORDS))
    return INVALID


def swap_record(data, r: Reply) -> str:
    r.swapped = data.draw(st.sampled_from(RECORDS))
    return INVALID


def drop_meta(data, r: Reply) -> str:
    del r.meta[data.draw(st.sampled_from(required_meta(r)))]
    return INVALID


def mistype_meta(data, r: Reply) -> str:
    key = data.draw(st.sampled_from(required_meta(r)))
    r.meta[key] = data.draw(st.sampled_from(WRONG_TYPES.get(key, WRONG_TYPES["alpha"])))
    return INVALID


def bad_examples(data, r: Reply) -> str:
    if data.draw(st.booleans()):
        del r.metrics["num-examples"]
    else:
        r.metrics["num-examples"] = data.draw(st.sampled_from([0, -1, -(2**40), 3.0, 0.0, [3]]))
    return INVALID


def wrong_round(data, r: Reply) -> str:
    r.meta["round"] = data.draw(st.integers(-(2**63), 2**63 - 1).filter(lambda x: x != 1))
    return INVALID


def absurd_rank(data, r: Reply) -> str:
    r.meta["rank"] = data.draw(st.one_of(st.integers(-(2**63), 0), st.integers(5, 2**63 - 1)))
    return INVALID


def consistent_absurd_rank(data, r: Reply) -> str:
    """Factors of rank 8 on layers whose smaller dimension is 4 to 6 (full fp32 replies only)."""
    if r.meta.get("compression") != "none" or not r.meta.get("sent-A"):
        return absurd_rank(data, r)
    rank = data.draw(st.integers(7, 12))
    for key in [k for k in r.tensors if k.startswith("lora/")]:
        shape = r.tensors[key].shape
        new = (rank, shape[1]) if key.endswith("/A") else (shape[0], rank)
        r.tensors[key] = np.random.default_rng(0).standard_normal(new, dtype=np.float32)
    r.meta["rank"] = rank
    return INVALID


def rename_key(data, r: Reply) -> str:
    key = data.draw(st.sampled_from(r.value_keys()))
    kind, _, rest = key.partition("/")
    new = data.draw(
        st.sampled_from([f"{kind}/{rest}x", f"{kind}x/{rest}", f"{key[:-1]}C", rest, f"{kind}/{rest}/A"])
    )
    r.tensors[new] = r.tensors.pop(key)
    return INVALID


def drop_tensor(data, r: Reply) -> str:
    del r.tensors[data.draw(st.sampled_from(sorted(r.tensors)))]
    return INVALID


def truncate_data(data, r: Reply) -> str:
    cut = data.draw(st.integers(1, 1 << 20))
    r.edits.append(lambda a: payload_array(a.data[:-cut]))
    return INVALID


def extend_data(data, r: Reply) -> str:
    more = data.draw(st.binary(min_size=1, max_size=64))
    r.edits.append(lambda a: payload_array(a.data + more))
    return INVALID


def payload_array(data: bytes) -> Array:
    return Array("uint8", (len(data),), PACKED_STYPE, data)


def reshape_array(data, r: Reply) -> str:
    key = data.draw(st.sampled_from(r.value_keys()))
    values = r.tensors[key]
    if data.draw(st.booleans()):
        shape = (1, *values.shape)
    else:
        axis = data.draw(st.integers(0, values.ndim - 1))
        shape = tuple(
            d + data.draw(st.sampled_from([-1, 1])) if i == axis else d for i, d in enumerate(values.shape)
        )
    r.tensors[key] = np.resize(values, shape)
    return INVALID


def poison_value(data, r: Reply) -> str:
    key = data.draw(st.sampled_from(r.float_keys()))
    values = r.tensors[key].copy()
    if values.size == 0:
        return UNKNOWN
    flat = values.reshape(-1)
    flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    r.tensors[key] = values
    return INVALID


def huge_value(data, r: Reply) -> str:
    key = data.draw(st.sampled_from(r.float_keys()))
    values = r.tensors[key].copy()
    flat = values.reshape(-1)
    biggest = float(np.finfo(values.dtype).max)
    flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([biggest, -biggest, 1e4]))
    r.tensors[key] = values
    return INVALID


def restype(data, r: Reply) -> str:
    stype, dtype = data.draw(
        st.sampled_from([("numpy.ndarray", "uint8"), ("", "uint8"), (PACKED_STYPE, "int8")])
    )
    r.edits.append(lambda a: Array(dtype, a.shape, stype, a.data))
    return INVALID


def bad_scalar(data, r: Reply) -> str:
    bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0]))
    scales = list(r.meta.get("scales", []))
    if not scales or data.draw(st.booleans()):
        r.meta["alpha"] = bad
        return INVALID
    scales[data.draw(st.integers(0, len(scales) - 1))] = bad
    r.meta["scales"] = scales
    return INVALID


def bad_metric(data, r: Reply) -> str:
    r.metrics["train_loss"] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return INVALID


def unknown_keys(data, r: Reply) -> str:
    r.meta[data.draw(st.sampled_from(["note", "client-version"]))] = data.draw(st.text(max_size=20))
    r.metrics["steps"] = data.draw(st.integers(0, 100))
    r.extra_records["annex"] = ConfigRecord({"x": 1})
    return VALID


def flip_byte(data, r: Reply) -> str:
    at, bits = data.draw(st.integers(0, 1 << 20)), data.draw(st.integers(1, 255))

    def flipped(a: Array) -> Array:
        buf = bytearray(a.data)
        if buf:
            buf[at % len(buf)] ^= bits
        return payload_array(bytes(buf))

    r.edits.append(flipped)
    return UNKNOWN


def retype_tensor(data, r: Reply) -> str:
    key = data.draw(st.sampled_from(sorted(r.tensors)))
    dtype = data.draw(
        st.sampled_from([np.float64, np.int64, np.int8, np.uint8, np.bool_, np.float16, np.int32])
    )
    with np.errstate(invalid="ignore", over="ignore"):
        r.tensors[key] = r.tensors[key].astype(dtype)
    return UNKNOWN


KNOWN: list[Callable] = [
    drop_record,
    swap_record,
    drop_meta,
    mistype_meta,
    bad_examples,
    wrong_round,
    absurd_rank,
    consistent_absurd_rank,
    rename_key,
    drop_tensor,
    truncate_data,
    extend_data,
    reshape_array,
    poison_value,
    huge_value,
    restype,
    bad_scalar,
    bad_metric,
    unknown_keys,
]
ANY = [*KNOWN, flip_byte, retype_tensor]
KINDS = ["fp32", "B only", "int8", "fp16"]


# Wholly random records.

NAMES = st.one_of(
    st.sampled_from(
        ["lora/layer.0.q/A", "lora/layer.0.q/B", "lora/layer.0.q/A.scale", "extra/head.bias", "lora//A", "/"]
    ),
    st.text(max_size=12),
)
NPY = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.int8, np.float64, np.bool_, np.int64]),
    shape=st.one_of(
        st.sampled_from([(4, 4), (6, 4), (4, 7), (3,)]), hnp.array_shapes(min_dims=0, max_dims=3)
    ),
).map(Array)
RAW = st.builds(
    lambda dtype, shape, stype, data: Array(dtype, tuple(shape), stype, data),
    st.one_of(st.sampled_from(["float32", "float16", "int8", "<f4", "object", "U3"]), st.text(max_size=5)),
    st.lists(st.integers(-3, 2**40), max_size=4),
    st.sampled_from([SType.NUMPY, SType.NUMPY, "x"]),
    st.binary(max_size=200),
)
MANIFEST_ROW = st.tuples(
    NAMES,
    st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=4)),
    st.lists(st.integers(-1, 9), max_size=3),
    st.integers(-3, 2),
).map(list)


def random_packed(rows: list, data) -> Array:
    """A packed payload of random rows and a random body, usually exactly as long as the rows say."""
    manifest = json.dumps(rows).encode()
    head = PREFIX.pack(MAGIC, len(manifest)) + manifest
    head += bytes(-len(head) % 8)
    try:
        entries = [Entry(str(n), DTYPES[d], tuple(shape), a, 0) for n, d, shape, a in rows]
        size = max(0, sum(e.numel * e.dtype.itemsize + 4 * e.scale_numel + 8 for e in entries))
    except (KeyError, TypeError, IndexError):
        size = 16
    body = data.draw(st.binary(min_size=size, max_size=size + 16))
    return Array(
        "uint8", (len(head) + len(body),), PACKED_STYPE, head + body[: data.draw(st.integers(0, len(body)))]
    )


PACKED = st.builds(random_packed, st.lists(MANIFEST_ROW, max_size=5), st.data())
SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8), st.booleans(), st.binary(max_size=8)
)
RECORD = st.one_of(
    st.dictionaries(NAMES, st.one_of(NPY, RAW), max_size=6).map(lambda d: ArrayRecord(array_dict=d)),
    st.dictionaries(st.just(PACKED_KEY), PACKED, min_size=1).map(lambda d: ArrayRecord(array_dict=d)),
    st.dictionaries(
        st.one_of(st.sampled_from(["round", "rank", "alpha", "sent-A", "delta", "scales"]), NAMES),
        st.one_of(SCALARS, st.lists(st.integers(-5, 5), max_size=3)),
        max_size=6,
    ).map(ConfigRecord),
    st.dictionaries(
        st.one_of(st.just("num-examples"), NAMES),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.lists(st.floats(), max_size=3)),
        max_size=4,
    ).map(MetricRecord),
)
RANDOM_CONTENT = st.dictionaries(
    st.one_of(st.sampled_from(RECORDS), st.text(max_size=8)), RECORD, max_size=4
).map(RecordDict)


# The judge: the server's path for one reply, and what an accepted reply must satisfy.


def judge(content: RecordDict, strategy: str) -> tuple[str | None, ClientUpdate | None]:
    """The server's verdict on ``content`` (None: accepted), and the update if it decoded. The
    decoder alone must fail with ``WireError`` only: the server's catch-all behind it is a last
    resort, not the way malformed replies are meant to be refused."""
    try:
        decode_update(content, "7", STATE.adapter)
    except WireError:
        pass
    replies = RoundReplies(create_strategy(strategy, {}, CONTEXT), 1, STATE, ReplyLimits(previous_norms=POOL))
    update = replies.decode(content, "7")
    if isinstance(update, str):
        return update, None
    reason = replies.offer(update) or dict(replies.close()).get("7")
    assert replies.rejected == (reason is not None)
    return reason, update


def assert_safe(update: ClientUpdate) -> None:
    """An accepted update: round 1, some examples, the global layout, finite float32, its norm
    within 10 x the lower median of the pool it joined (checked here without the validator)."""
    assert update.round == 1 and update.num_examples > 0
    assert update.factors.keys() == STATE.adapter.keys() and update.extras.keys() == STATE.extras.keys()
    got = [t for f in update.factors.values() for t in (f.A, f.B)] + list(update.extras.values())
    sent = [t for f in STATE.adapter.values() for t in (f.A, f.B)] + list(STATE.extras.values())
    for g, s in zip(got, sent, strict=True):
        assert g.shape == s.shape and g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    norm = float(torch.cat([(g - s).flatten() for g, s in zip(got, sent, strict=True)]).double().norm())
    assert norm <= 10 * statistics.median_low([*POOL, norm]) * (1 + 1e-4)


def check(content: RecordDict, strategy: str, expected: str) -> None:
    reason, update = judge(content, strategy)
    if reason is not None:
        assert isinstance(reason, str) and reason.strip(), "a refusal without a reason"
        assert expected != VALID, f"a valid reply was refused: {reason}"
    else:
        assert expected != INVALID, "an invalid reply was accepted"
        assert_safe(update)


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 10**6),
    strategy=st.sampled_from(["fedavg", "vcma"]),
    mutation=st.sampled_from([None, *KNOWN]),
    data=st.data(),
)
def test_one_known_mutation_is_refused_exactly_when_it_breaks_the_reply(kind, seed, strategy, mutation, data):
    reply = Reply.of(honest(kind, seed))
    expected = mutation(data, reply) if mutation else VALID
    check(reply.content(), strategy, expected)


@settings(FUZZ, max_examples=1000)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 10**6),
    mutations=st.lists(st.sampled_from(ANY), min_size=1, max_size=4),
    data=st.data(),
)
def test_stacked_and_unknown_mutations_never_raise_or_let_an_unsafe_update_in(kind, seed, mutations, data):
    stacked(kind, seed, mutations, data)


def stacked(kind: str, seed: int, mutations: list[Callable], data) -> None:
    reply = Reply.of(honest(kind, seed))
    for mutation in mutations:
        try:
            mutation(data, reply)
        except Exception:  # it does not apply to the reply as mutated so far (a key gone, say)
            continue
    check(reply.content(), "fedavg", UNKNOWN)


@settings(FUZZ, max_examples=700)
@given(content=RANDOM_CONTENT, strategy=st.sampled_from(["fedavg", "vcma"]))
def test_random_records_are_refused_with_a_reason(content, strategy):
    reason, _ = judge(content, strategy)
    assert isinstance(reason, str) and reason.strip()


# The same through the real round loop: one client of three sends the fuzzed reply.


class Canned:
    """A client that trains once for real, then answers every round with that reply, or with
    ``fuzzed`` when it is set."""

    def __init__(self) -> None:
        self.content: RecordDict | None = None
        self.fuzzed: RecordDict | None = None

    def __call__(self, msg: Message, context) -> Message:
        if self.content is None:
            self.content = train(msg, context).content
        return Message(self.fuzzed if self.fuzzed is not None else self.content, reply_to=msg)


@pytest.fixture(scope="module")
def loop(tiny_bert_dir, tmp_path_factory):
    """A run of three clients after its first round, its grid, and the fuzzed client's handler."""
    config = small_config(tiny_bert_dir, **{"server.min_replies": 1, "server.evaluate": "false"})
    run = FederatedRun(config, tmp_path_factory.mktemp("fuzz-loop"), console=Console(file=io.StringIO()))
    handlers = [Canned() for _ in range(3)]
    grid = LocalGrid(3, dict(enumerate(handlers)))
    run._fetch_initial_adapter(grid)
    plan = run.strategy.client_instructions(1, run.state)
    first = run._attempt(grid, 1, plan)
    assert first.replies.count == 3
    run.limits.previous_norms = first.replies.norms  # a warm pool, as from round 1 on
    return run, grid, plan, handlers[2]


def attempt(loop, content: RecordDict, expected: str) -> None:
    run, grid, plan, fuzzed_client = loop
    fuzzed_client.fuzzed = content
    try:
        outcome = run._attempt(grid, 1, plan)
    finally:
        fuzzed_client.fuzzed = None
    node = str(grid.nodes[2])
    reasons = [d["reason"] for d in outcome.dropped if d["node"] == node]
    assert outcome.replies.count + len(reasons) == 3 and outcome.replies.rejected == len(reasons)
    assert all(r.strip() for r in reasons)
    assert len(reasons) in {VALID: (0,), INVALID: (1,), UNKNOWN: (0, 1)}[expected], reasons
    result = outcome.replies.aggregate()
    assert all(bool(torch.isfinite(f.B).all()) for f in result.adapter.values())


@settings(FUZZ, max_examples=400)
@given(mutation=st.sampled_from([None, *KNOWN]), data=st.data())
def test_the_round_loop_refuses_broken_replies_and_takes_the_rest(loop, mutation, data):
    reply = Reply.of(loop[3].content)
    expected = mutation(data, reply) if mutation else VALID
    attempt(loop, reply.content(), expected)


@settings(FUZZ, max_examples=200)
@given(content=RANDOM_CONTENT)
def test_the_round_loop_survives_random_records(loop, content):
    attempt(loop, content, INVALID)


@pytest.mark.slow
@settings(FUZZ, max_examples=20_000)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 10**6),
    mutations=st.lists(st.sampled_from(ANY), min_size=1, max_size=4),
    data=st.data(),
)
def test_many_more_stacked_mutations(kind, seed, mutations, data):
    stacked(kind, seed, mutations, data)
