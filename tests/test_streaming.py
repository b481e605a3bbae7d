"""Streaming aggregation: each linear strategy's accumulator against an independent float64
reference, in any arrival order, and a server that keeps no reply after folding it."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from fedpeft.wire import decode_update, encode_update
from server.replies import RoundReplies, a_variances
from server.validation import ReplyLimits, update_norm
from strategies import accumulate, create_strategy
from strategies.accumulate import WeightedSum
from tests import factories

CONTEXT = {"clients_per_round": 4, "num_clients": 10}


def start_state() -> GlobalState:
    return GlobalState(round=0, adapter=factors_like(seed=100), extras=factories.extras(100))


def factors_like(seed: int) -> dict[str, AdapterFactors]:
    return factories.factors(rank=4, seed=seed, scale=16.0 / 4)


def client(seed: int, num_examples: int, state: GlobalState, frozen_A: bool = False) -> ClientUpdate:
    update = factories.update(rank=4, seed=seed, num_examples=num_examples)
    if frozen_A:
        for name, f in update.factors.items():
            f.A = state.adapter[name].A
    return update


def weighted_mean64(updates: list[ClientUpdate], pick) -> torch.Tensor:
    total = sum(u.num_examples for u in updates)
    return sum(pick(u).double() * (u.num_examples / total) for u in updates).float()


@pytest.mark.parametrize("name", ["fedavg", "ffa"])
def test_accumulator_matches_a_float64_weighted_mean_in_any_order(name):
    """fp32 tolerance, not bitwise: the running sum rounds after every add, so the order of
    arrival changes the last bits."""
    state = start_state()
    counts = [(0, 5), (1, 17), (2, 1), (3, 40)]
    updates = [client(seed, n, state, frozen_A=name == "ffa") for seed, n in counts]
    strategy = create_strategy(name, {}, CONTEXT)
    batch = strategy.aggregate(1, state, updates)
    accumulator = strategy.start(1, state)
    for update in reversed(updates):
        accumulator.add(update)
    streamed = accumulator.result()
    for module in state.adapter:
        for part in ("A", "B"):
            expected = weighted_mean64(updates, lambda u, m=module, p=part: getattr(u.factors[m], p))
            for result in (batch, streamed):
                got = getattr(result.adapter[module], part)
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        if name == "ffa":
            assert torch.equal(batch.adapter[module].A, state.adapter[module].A)
    for extra in state.extras:
        expected = weighted_mean64(updates, lambda u, e=extra: u.extras[e])
        torch.testing.assert_close(streamed.extras[extra], expected, rtol=1e-6, atol=1e-6)


def test_dp_accumulator_matches_batch_and_a_float64_clipped_mean():
    state = start_state()
    updates = [client(seed, 10, state, frozen_A=True) for seed in range(4)]
    options = {"inner": "ffa", "clip_norm": 3.0, "noise_multiplier": 0.0}
    batch = create_strategy("dp", options, CONTEXT).aggregate(1, state, updates)
    accumulator = create_strategy("dp", options, CONTEXT).start(1, state)
    for update in reversed(updates):
        accumulator.add(update)
    streamed = accumulator.result()

    def delta(u: ClientUpdate) -> dict[str, torch.Tensor]:
        d = {f"B/{m}": u.factors[m].B.double() - f.B.double() for m, f in state.adapter.items()}
        return d | {f"extra/{k}": t.double() - state.extras[k].double() for k, t in u.extras.items()}

    clipped = []
    for u in updates:
        d = delta(u)
        norm = torch.sqrt(sum(t.pow(2).sum() for t in d.values()))
        clipped.append({k: t * min(1.0, 3.0 / float(norm)) for k, t in d.items()})
    for module, f in state.adapter.items():
        expected = (f.B.double() + sum(c[f"B/{module}"] for c in clipped) / 4).float()
        torch.testing.assert_close(batch.adapter[module].B, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(streamed.adapter[module].B, expected, rtol=1e-5, atol=1e-6)


def test_a_streaming_round_keeps_no_update_after_folding_it():
    state = start_state()
    update = client(0, 5, state)
    update.client_id = "1"
    limits = ReplyLimits(previous_norms=[update_norm(update, state)] * 3)  # no cold start to hold it
    replies = RoundReplies(create_strategy("fedavg", {}, CONTEXT), 1, state, limits)
    alive = weakref.ref(update.factors["layer.0.q"].B)
    assert replies.offer(update) is None
    del update
    gc.collect()
    assert alive() is None and replies.count == 1 and replies.pending == []
    assert replies.close() == []


def test_a_streaming_round_drops_an_invalid_update_on_arrival():
    state = start_state()
    replies = RoundReplies(create_strategy("ffa", {}, CONTEXT), 1, state)
    bad = client(1, 5, state, frozen_A=True)
    bad.factors["layer.0.q"].B[0, 0] = float("inf")
    assert "NaN or Inf" in replies.offer(bad)
    assert "round 2, not 1" in replies.offer(factories.update(rank=4, seed=2, num_examples=5, rnd=2))
    assert replies.offer(client(3, 5, state, frozen_A=True)) is None
    assert replies.close() == [] and replies.count == 1


def test_the_streaming_mean_does_not_depend_on_arrival_order():
    """A rerun round folds the replies in another order; with float64 sums the float32 mean is the
    same (to the bit here; in general within one float32 ulp, where a sum lands on a rounding
    boundary). Float32 sums differ for this very set of updates."""
    from strategies import FedAvg
    from tests.factories import sent_state, trained

    state = sent_state()
    updates = [trained(state, seed, boost=10.0) for seed in range(20)]
    for k, u in enumerate(updates):
        u.num_examples = 7 + 13 * k
    results = []
    for order in (
        range(20),
        reversed(range(20)),
        [3, 17, 0, 9, 12, 5, 19, 1, 8, 14, 2, 11, 6, 16, 4, 18, 7, 15, 10, 13],
    ):
        out: GlobalState = FedAvg().aggregate(1, state, [updates[i] for i in order])
        results.append(out)
    for other in results[1:]:
        for module, f in results[0].adapter.items():
            assert torch.equal(other.adapter[module].A, f.A) and torch.equal(other.adapter[module].B, f.B)
        for name, t in results[0].extras.items():
            assert torch.equal(other.extras[name], t)


@pytest.mark.parametrize("name", ["fedavg", "ffa"])
def test_replies_folded_whole_give_the_per_tensor_result_bitwise(name):
    state = start_state()
    frozen_A = name == "ffa"
    replies = [
        encode_update(client(seed, 3 + seed, state, frozen_A), send_A=not frozen_A) for seed in range(7)
    ]  # the first gathered, then a group of FOLD_WIDTH = 4 held and folded, then two held until the result
    whole = [decode_update(r, str(k), state.adapter) for k, r in enumerate(replies)]
    apart = [dataclasses.replace(u, flat=None) for u in whole]
    strategy = create_strategy(name, {}, CONTEXT)
    accumulator = strategy.start(1, state)
    for update in whole:
        accumulator.add(update)
    assert accumulator.sum.layout.known is whole[0].flat.layout  # folded as spans
    a, b = accumulator.result(), strategy.aggregate(1, state, apart)
    for module, f in a.adapter.items():
        assert torch.equal(f.A, b.adapter[module].A) and torch.equal(f.B, b.adapter[module].B)
    assert (
        all(torch.equal(t, b.extras[n]) for n, t in a.extras.items()) and a.extras.keys() == b.extras.keys()
    )


def test_fedavg_averages_the_sent_A_of_replies_that_did_not_send_it():
    state = start_state()  # such replies do not lie in the sum's layout: gathered, A taken from the state
    replies = [encode_update(client(seed, 3 + seed, state, True), send_A=False) for seed in range(5)]
    whole = [decode_update(r, str(k), state.adapter) for k, r in enumerate(replies)]
    strategy = create_strategy("fedavg", {}, CONTEXT)
    accumulator = strategy.start(1, state)
    for update in whole:
        accumulator.add(update)
    a = accumulator.result()
    b = strategy.aggregate(1, state, [dataclasses.replace(u, flat=None) for u in whole])
    for module, f in a.adapter.items():
        torch.testing.assert_close(f.A, state.adapter[module].A)
        assert torch.equal(f.A, b.adapter[module].A) and torch.equal(f.B, b.adapter[module].B)


def test_replies_without_A_count_the_variance_of_the_sent_A_once_each():
    state = start_state()
    replies = RoundReplies(create_strategy("ffa", {}, CONTEXT), 1, state)
    for seed in range(3):
        reply = encode_update(client(seed, 4, state, frozen_A=True), send_A=False)
        assert replies.offer(decode_update(reply, str(seed), state.adapter)) is None
    assert not replies.close()
    ((modules, sums),) = replies.variance_sums.items()
    expected = [3 * float(state.adapter[m].A.double().var()) for m in modules]
    assert sums.tolist() == pytest.approx(expected, rel=1e-5)


def test_a_variances_of_a_reply_decoded_whole_match_each_module_var():
    state = start_state()
    update = decode_update(encode_update(client(1, 5, state)), frozen=state.adapter)
    assert update.flat is not None
    expected = {m: float(f.A.double().var()) for m, f in update.factors.items()}
    assert a_variances(update).as_dict() == pytest.approx(expected, rel=1e-5)
    assert a_variances(dataclasses.replace(update, flat=None)).as_dict() == pytest.approx(expected, rel=1e-5)


def test_a_sum_takes_the_last_finished_sums_buffer_zeroed_and_gives_its_mean_once():
    first = WeightedSum()
    first.add({"x": torch.ones(5)}, 2.0)
    first.mean()
    buffer = accumulate._spare[0]
    second = WeightedSum()
    second.add({"x": torch.full((5,), 3.0)}, 1.0)
    assert second.pending.total is buffer  # a server's next round: no fresh pages to fault in
    assert torch.equal(second.mean()["x"], torch.full((5,), 3.0))
    with pytest.raises(RuntimeError, match="once"):
        second.mean()
