"""Reply validation beyond structure: the norm screen, the byte cap, absurd ranks, dtypes, and
their rejections counted in the metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
from flwr.app import Message

from client.app import train
from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from fedpeft.testing import LocalGrid
from fedpeft.wire import decode_state, decode_update, encode_update
from server.loop import FederatedRun
from server.replies import RoundReplies, moment_segments
from server.validation import (
    NOT_FINITE,
    NormScreen,
    ReplyLimits,
    SpanDistance,
    segments,
    update_norm,
    validate,
)
from strategies import create_strategy
from strategies.accumulate import Probe
from tests import factories
from tests.factories import sent_state, small_config, trained

CONTEXT = {"clients_per_round": 4, "num_clients": 10}


def offer_all(replies: RoundReplies, updates: list[ClientUpdate]) -> list[str | None]:
    reasons = [replies.offer(u) for u in updates]
    closed = dict(replies.close())
    return [closed.get(u.client_id, r) for u, r in zip(updates, reasons, strict=True)]


def test_update_norm_is_the_distance_from_what_the_server_sent():
    state = sent_state()
    update = trained(state, 1)
    sent = [t for f in state.adapter.values() for t in (f.A, f.B)] + list(state.extras.values())
    got = [t for f in update.factors.values() for t in (f.A, f.B)] + list(update.extras.values())
    expected = torch.cat([(g - s).flatten() for g, s in zip(got, sent, strict=True)]).norm()
    assert update_norm(update, state) == pytest.approx(float(expected), rel=1e-5)


def test_the_one_pass_norm_of_replies_in_one_layout_equals_the_per_tensor_one():
    state = sent_state()
    span = SpanDistance()
    for seed in (1, 2, 3):  # float32: the message's own bytes; fp16: decoded into one buffer
        for compression in ("none", "fp16"):
            decoded = decode_update(
                encode_update(trained(state, seed), compression=compression), frozen=state.adapter
            )
            assert (decoded.flat is not None) == (compression == "none")
            assert update_norm(decoded, state, span) == pytest.approx(update_norm(decoded, state), rel=1e-6)
    assert span.squared([(torch.ones(2), torch.zeros(2))]) is None  # another layout: per tensor
    frozen_A = decode_update(encode_update(trained(state, 4), send_A=False), frozen=state.adapter)
    assert frozen_A.flat is not None and span.squared_flat(frozen_A.flat, state) is None  # another layout
    assert update_norm(frozen_A, state, span) == pytest.approx(update_norm(frozen_A, state), rel=1e-6)


def test_a_nan_is_refused_as_such_when_the_norm_screen_stands_in_for_the_finiteness_pass():
    state = sent_state()
    updates = [trained(state, seed) for seed in (1, 2, 3, 4)]
    next(iter(updates[3].factors.values())).B[0, 0] = float("nan")
    replies = RoundReplies(create_strategy("fedavg", {}, CONTEXT), 1, state)
    reasons = offer_all(replies, updates)
    assert reasons[:3] == [None, None, None] and reasons[3] == "invalid update: a tensor holds NaN or Inf"


def test_without_a_global_adapter_the_norm_is_that_of_the_weight_delta():
    update = factories.update(rank=2, seed=3, num_examples=4)
    squares = sum(f.delta().pow(2).sum() for f in update.factors.values())
    squares += sum(t.pow(2).sum() for t in update.extras.values())
    assert update_norm(update, GlobalState()) == pytest.approx(float(squares.sqrt()), rel=1e-5)


@pytest.mark.parametrize("strategy", ["fedavg", "vcma"])  # streaming, and batch
def test_a_scaled_update_is_refused_and_counted(strategy):
    state = sent_state()
    updates = [trained(state, 1), trained(state, 2), trained(state, 3, boost=100.0), trained(state, 4)]
    replies = RoundReplies(create_strategy(strategy, {}, CONTEXT), 1, state)
    reasons = offer_all(replies, updates)
    assert reasons[:2] == [None, None] and reasons[3] is None
    assert "exceeds server.max_norm_ratio = 10 x the lower median" in reasons[2]
    assert replies.rejected == 1 and replies.count == 3 and len(replies.norms) == 3


def test_a_streaming_cold_start_holds_its_first_replies_until_the_round_can_judge_them():
    """Round 1 of a run has no previous norms: the first two replies are held, not folded, and
    judged with the whole round, so a x100 reply that arrives early is refused too. The held
    replies are copies: the decode buffer they were decoded into is reused by the next reply."""
    state = sent_state()
    fedavg = create_strategy("fedavg", {}, CONTEXT)
    updates = [trained(state, 3, boost=100.0), trained(state, 1), trained(state, 2), trained(state, 4)]
    replies = RoundReplies(fedavg, 1, state)
    reasons = [replies.offer(replies.decode(encode_update(u), str(i))) for i, u in enumerate(updates)]
    # two held for the cold start, two taken by the fold that measures them (judged when it runs)
    assert reasons == [None] * 4 and len(replies.held) == 2 and replies.count == 0
    [(client, reason)] = replies.close()
    assert client == "0" and "max_norm_ratio" in reason and replies.count == 3
    expected = fedavg.aggregate(1, state, updates[1:])
    for name, f in replies.aggregate().adapter.items():
        torch.testing.assert_close(f.B, expected.adapter[name].B)

    limits = ReplyLimits(previous_norms=[update_norm(trained(state, s), state) for s in (5, 6, 7)])
    assert "max_norm_ratio" in RoundReplies(fedavg, 1, state, limits).offer(updates[0])  # no cold start


def test_a_batch_strategy_judges_against_the_whole_round_in_any_order():
    state = sent_state()
    updates = [trained(state, 3, boost=100.0), trained(state, 1), trained(state, 2)]
    reasons = offer_all(RoundReplies(create_strategy("vcma", {}, CONTEXT), 1, state), updates)
    assert "max_norm_ratio" in reasons[0] and reasons[1:] == [None, None]


def test_max_norm_ratio_zero_turns_the_screen_off():
    state = sent_state()
    updates = [trained(state, 1), trained(state, 2), trained(state, 3, boost=1e4)]
    replies = RoundReplies(create_strategy("fedavg", {}, CONTEXT), 1, state, ReplyLimits(max_norm_ratio=0))
    assert offer_all(replies, updates) == [None, None, None] and replies.norms == []


def test_the_byte_cap_refuses_a_reply_before_decoding_it():
    state = sent_state()
    honest = encode_update(trained(state, 1))
    padded = trained(state, 2)
    padded.extras["padding"] = torch.zeros(10_000_000 // 4)
    fedavg = create_strategy("fedavg", {}, CONTEXT)
    replies = RoundReplies(fedavg, 1, state)  # the default: twice the adapter + 1 MiB
    assert isinstance(replies.decode(honest, "1"), ClientUpdate)
    reason = replies.decode(encode_update(padded), "2")
    assert reason.startswith("oversized reply: ") and "server.max_reply_bytes" in reason
    small_cap = RoundReplies(fedavg, 1, state, ReplyLimits(max_reply_bytes=100))
    assert small_cap.decode(honest, "1").startswith("oversized reply")
    assert replies.rejected == 1 and small_cap.rejected == 1


def test_a_decoder_failure_it_does_not_anticipate_is_refused_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("server.replies.decode_update", broken)
    replies = RoundReplies(create_strategy("fedavg", {}, CONTEXT), 1, sent_state())
    reason = replies.decode(encode_update(trained(sent_state(), 1)), "1")
    assert reason == "malformed reply: RuntimeError: a bug"
    assert replies.rejected == 1


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda u: setattr(u, "rank", 0), "the declared rank 0 is not positive"),
        (lambda u: setattr(u, "rank", 8), "do not match the declared rank 8"),
        (lambda u: _rerank(u, 6), "the declared rank 6 exceeds the layer's dimensions (6, 4)"),
        (lambda u: _retype(u, torch.float64), "a tensor is torch.float64, not float32"),
        (lambda u: _first(u).__setattr__("scale", float("inf")), "alpha or a LoRA scale"),
        (lambda u: setattr(u, "alpha", -1.0), "alpha or a LoRA scale"),
        (lambda u: u.metrics.__setitem__("train_loss", float("nan")), "a reported metric is NaN"),
        (lambda u: setattr(u, "num_examples", 0), "no training examples"),
    ],
)
def test_structural_problems_have_reasons(edit, reason):
    update = factories.update(rank=4, seed=1, num_examples=3)
    edit(update)
    assert reason in validate(update, 1, None)


def _first(update: ClientUpdate) -> AdapterFactors:
    return next(iter(update.factors.values()))


def _rerank(update: ClientUpdate, rank: int) -> None:
    update.rank = rank
    for f in update.factors.values():
        f.A = torch.randn(rank, f.A.shape[1])
        f.B = torch.randn(f.B.shape[0], rank)


def _retype(update: ClientUpdate, dtype: torch.dtype) -> None:
    _first(update).A = _first(update).A.to(dtype)


def scaled_by(factor: float):
    """A client that trains honestly, then sends ``factor`` x its change to the global adapter and head."""

    def handler(msg: Message, context) -> Message:
        sent = decode_state(msg.content)
        reply = train(msg, context)
        update = decode_update(reply.content, frozen=sent.adapter)
        for name, f in update.factors.items():
            f.A = sent.adapter[name].A + factor * (f.A - sent.adapter[name].A)
            f.B = sent.adapter[name].B + factor * (f.B - sent.adapter[name].B)
        for name, t in update.extras.items():
            update.extras[name] = sent.extras[name] + factor * (t - sent.extras[name])
        return Message(encode_update(update), reply_to=msg)

    return handler


def test_the_loop_counts_rejections_and_a_resumed_run_keeps_the_norm_pool(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"server.min_replies": 2})
    summary = FederatedRun(config, tmp_path).run(LocalGrid(3, {2: scaled_by(100.0)}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]  # round 2 starts from round 1's accepted norms: no cold start
    [drop] = last["dropped"]
    assert drop["client"] == "partition-2" and "max_norm_ratio" in drop["reason"]
    assert last["rejected"] == 1 and len(last["update_norms"]) == 2
    assert summary["replies_rejected"] == sum(r["rejected"] for r in rows[1:]) >= 1
    resumed = FederatedRun(config, tmp_path, resume=True)
    assert resumed.limits.previous_norms == last["update_norms"]


def test_a_layout_verdict_is_kept_per_declared_rank():
    state = sent_state()
    replies = RoundReplies(create_strategy("fedavg", {}, CONTEXT), 1, state)
    good, bad = encode_update(trained(state, 1)), encode_update(trained(state, 2))
    bad["update-meta"]["rank"] = 1  # the same layout, another declared rank
    assert replies.offer(replies.decode(good, "a")) is None
    assert "declared rank 1" in replies.offer(replies.decode(bad, "b"))


def decoded_replies(state: GlobalState, updates: list[ClientUpdate], fp16_at: int) -> list[ClientUpdate]:
    """``updates`` as the server decodes their replies (client ids "0", "1", ...), the one at
    ``fp16_at`` sent in fp16 (not decoded whole: judged on arrival)."""
    return [
        decode_update(encode_update(u, compression="fp16" if i == fp16_at else "none"), str(i), state.adapter)
        for i, u in enumerate(updates)
    ]


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedsa"])  # accumulators that wrap fedavg's
def test_replies_measured_in_the_fold_are_judged_as_each_on_arrival(name):
    """With last round's norms in the pool, float32 replies in the round's layout go to the fold
    unjudged, measured in its pass; an outsized reply and one with a NaN in its last tensor are
    refused once measured (``close`` returns them) and what the fold took of them is taken back.
    The result is the mean of the others; the verdicts, norms and pool are those of judging each
    reply on arrival (an fp16 reply between them is judged at once, after those waiting)."""
    state = sent_state()
    updates = [trained(state, seed) for seed in range(1, 10)]
    updates[2] = trained(state, 3, boost=100.0)
    updates[5].extras["head.bias"][-1] = float("nan")
    decoded = decoded_replies(state, updates, fp16_at=6)
    previous = [update_norm(trained(state, seed), state) for seed in (11, 12, 13)]
    limits = ReplyLimits(previous_norms=previous)
    probed = RoundReplies(create_strategy(name, {}, CONTEXT), 1, state, limits)
    assert [probed.offer(u) for u in decoded[:3]] == [None] * 3
    assert probed.count == 0 and probed.rejected == 0  # waiting for the fold's pass to measure them
    assert [probed.offer(u) for u in decoded[3:]] == [None] * 6
    refused = dict(probed.close())
    assert refused.keys() == {"2", "5"} and "max_norm_ratio" in refused["2"] and "NaN" in refused["5"]
    assert probed.rejected == 2 and probed.count == 7

    one_by_one = RoundReplies(
        create_strategy(name, {}, CONTEXT), 1, state, ReplyLimits(previous_norms=previous)
    )
    reasons = [one_by_one.offer(dataclasses.replace(u, flat=None)) for u in decoded]  # judged on arrival
    assert [i for i, r in enumerate(reasons) if r] == [2, 5] and one_by_one.close() == []
    assert probed.norms == pytest.approx(one_by_one.norms, rel=1e-5)
    assert set(previous) <= set(probed.screen.pool) and len(probed.screen.pool) == 11  # not the NaN
    assert probed.screen.pool == pytest.approx(one_by_one.screen.pool, rel=1e-5)
    got, expected = probed.aggregate(), one_by_one.aggregate()
    for name, f in got.adapter.items():
        torch.testing.assert_close(f.A, expected.adapter[name].A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(f.B, expected.adapter[name].B, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.extras["head.bias"], expected.extras["head.bias"], rtol=1e-6, atol=1e-7)


def test_dp_measures_unjudged_replies_four_at_a_time_and_the_server_refuses_a_nan():
    """Under dp (the norm screen off) float32 replies in the round's layout go to dp's accumulator
    unjudged; one pass measures four, the finite ones are folded clipped, and the one with a NaN
    is refused once measured. The release is the one of the same replies clipped one at a time
    (the same noise), the NaN left out; an fp16 reply between them is judged at once."""
    state = sent_state()
    updates = [trained(state, seed) for seed in range(1, 8)]
    updates[4].extras["head.bias"][-1] = float("nan")
    decoded = decoded_replies(state, updates, fp16_at=2)
    options = {"inner": "fedavg", "clip_norm": 0.05, "noise_multiplier": 0.5, "insecure_noise_seed": 3}
    limits = ReplyLimits(max_norm_ratio=0.0)
    probed = RoundReplies(create_strategy("dp", options, CONTEXT), 1, state, limits)
    assert [probed.offer(u) for u in decoded] == [None] * 7
    assert dict(probed.close()) == {"4": NOT_FINITE} and probed.rejected == 1 and probed.count == 6
    assert probed.norms == []  # nothing per client is recorded under dp
    dp = create_strategy("dp", options, CONTEXT)
    kept = [dataclasses.replace(u, flat=None) for u in decoded if u.client_id != "4"]
    expected = dp.aggregate(1, state, kept)
    got = probed.aggregate()
    assert probed.strategy.last_metrics == dp.last_metrics and 0 < dp.last_metrics["epsilon"]
    for name, f in got.adapter.items():
        torch.testing.assert_close(f.A, expected.adapter[name].A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(f.B, expected.adapter[name].B, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.extras["head.bias"], expected.extras["head.bias"], rtol=1e-6, atol=1e-7)


def test_a_probed_update_is_folded_whole_or_taken_back_when_settled():
    """A fold that left out every changed element of its replies (a cap of zero) folds the rest
    of an accepted one when settled, and leaves a refused one out of the mean and its weight."""
    state = sent_state()
    decoded = [
        decode_update(encode_update(trained(state, seed)), str(seed), state.adapter) for seed in range(4)
    ]
    fedavg = create_strategy("fedavg", {}, CONTEXT)
    accumulator = fedavg.start(1, state)
    span = SpanDistance()
    layout = decoded[0].flat.layout
    probes = [
        Probe(span.reference_of(u.flat, state), *segments(layout), moment_segments(layout), cap=0.0)
        for u in decoded
    ]
    assert all(accumulator.add_probed(u, p) for u, p in zip(decoded, probes, strict=True))
    accumulator.fold_held()
    assert all(p.squared_distance > 0 for p in probes)
    for k, (update, probe) in enumerate(zip(decoded, probes, strict=True)):
        accumulator.settle(update, probe, accepted=k != 1)
    expected = fedavg.aggregate(
        1, state, [dataclasses.replace(u, flat=None) for k, u in enumerate(decoded) if k != 1]
    )
    for name, f in accumulator.result().adapter.items():
        torch.testing.assert_close(f.A, expected.adapter[name].A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(f.B, expected.adapter[name].B, rtol=1e-6, atol=1e-7)


def test_the_norm_screen_takes_the_lower_median_of_its_pool_as_it_grows():
    gen = torch.Generator().manual_seed(5)
    norms = (torch.rand(40, generator=gen) * 10).tolist()
    screen = NormScreen(2.0, norms[:3])
    for k, norm in enumerate(norms[3:], start=4):  # k norms in the pool
        assert screen.add(norm) is None
        median = statistics.median_low(norms[:k])
        assert screen.largest_threshold(3) == 2.0 * statistics.median_low(norms[:k] + [math.inf] * 3)
        assert screen.verdict(2.0 * median) is None and screen.verdict(2.0 * median * 1.001) is not None
    assert NormScreen(2.0, [1.0]).largest_threshold(1) == math.inf  # two norms cannot judge
    assert NormScreen(2.0, [1.0]).largest_threshold(2) == math.inf  # the median would be an unjudged one
    assert NormScreen(2.0, [1.0, 2.0]).largest_threshold(2) == 4.0
