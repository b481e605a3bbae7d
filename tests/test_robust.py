"""Robust aggregation: exact median and trimmed mean on hand-made cases, one poisoned client out of
10 against fedavg, and clipping that streams exactly as it aggregates in batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies import FedAvg, StrategyError, create_strategy
from strategies.clip import Clip
from strategies.coordinatewise import trimmed_mean
from tests.factories import global_norm

CONTEXT = {"clients_per_round": 10, "num_clients": 10}


def update(A: torch.Tensor, B: torch.Tensor, head: torch.Tensor, num_examples: int = 10) -> ClientUpdate:
    return ClientUpdate({"m": AdapterFactors(A, B, 2.0)}, {"head": head}, num_examples, 1, A.shape[0], 4.0)


def per_coordinate(values: list[list[float]]) -> list[ClientUpdate]:
    """Client k's A, B and head all hold ``values[k]`` (6 coordinates) in different shapes."""
    return [update(torch.tensor(v).view(2, 3), torch.tensor(v).view(3, 2), torch.tensor(v)) for v in values]


def delta_state(rank: int = 2, d_out: int = 6, d_in: int = 5, seed: int = 0) -> GlobalState:
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
    return GlobalState(
        adapter={"m": AdapterFactors(A, B, 2.0)}, extras={"head": torch.randn(4, generator=gen)}
    )


def honest(state: GlobalState, seed: int, scale: float = 1.0) -> ClientUpdate:
    """The state plus a common step and a little client noise; the step times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    f = state.adapter["m"]

    def step(t: torch.Tensor) -> torch.Tensor:
        common = torch.linspace(-0.5, 0.5, t.numel()).view(t.shape)
        return t + scale * (common + 0.05 * torch.randn(t.shape, generator=gen))

    return update(step(f.A), step(f.B), step(state.extras["head"]), num_examples=10 + seed)


def distance(a: GlobalState, b: GlobalState) -> float:
    fa, fb = a.adapter["m"], b.adapter["m"]
    return global_norm({"A": fa.A - fb.A, "B": fa.B - fb.B, "head": a.extras["head"] - b.extras["head"]})


def test_median_of_an_odd_count_is_the_middle_value_per_coordinate():
    values = [[1, 5, -3, 0, 2, 7], [2, 100, -1, 0, 9, 7], [100, 4, -2, 1, -50, 7]]
    out = create_strategy("median").aggregate(1, GlobalState(), per_coordinate(values))
    expected = torch.tensor([2.0, 5, -2, 0, 2, 7])
    assert torch.equal(out.adapter["m"].A, expected.view(2, 3))
    assert torch.equal(out.adapter["m"].B, expected.view(3, 2))
    assert torch.equal(out.extras["head"], expected)
    assert out.adapter["m"].scale == 2.0


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    values = [[1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 1], [3, 0, 0, 0, 0, 2], [100, 0, 0, 0, 0, -9]]
    out = create_strategy("median").aggregate(1, GlobalState(), per_coordinate(values))
    assert torch.equal(out.extras["head"], torch.tensor([2.5, 0, 0, 0, 0, 0.5]))


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    values = [
        [0, 9, 1, 1, 1, 1],
        [1, 8, 1, 1, 1, 1],
        [2, 7, 1, 1, 1, 1],
        [3, 6, 1, 1, 1, 1],
        [4, 5, 1, 1, 1, 1],
    ]
    values.append([100, -100, 1, 1, 1, 1])
    updates = per_coordinate(values)
    out = create_strategy("trimmed_mean", {"trim": 1}).aggregate(1, GlobalState(), updates)
    assert torch.equal(out.extras["head"], torch.tensor([2.5, 6.5, 1, 1, 1, 1]))  # mean of 1..4 and 5..8
    by_fraction = create_strategy("trimmed_mean", {"beta": 0.2}).aggregate(1, GlobalState(), updates)
    assert torch.equal(by_fraction.adapter["m"].A, out.adapter["m"].A)  # floor(0.2 * 6) = 1
    untrimmed = create_strategy("trimmed_mean", {"trim": 0}).aggregate(1, GlobalState(), updates)
    expected = torch.tensor(values, dtype=torch.float32).mean(0)
    torch.testing.assert_close(untrimmed.extras["head"], expected)


@pytest.mark.parametrize(
    ("name", "options"), [("median", {}), ("trimmed_mean", {}), ("trimmed_mean", {"trim": 4})]
)
def test_identical_updates_aggregate_to_that_update(name, options):
    one = honest(delta_state(), seed=3)
    out = create_strategy(name, options, CONTEXT).aggregate(1, GlobalState(), [one] * 10)
    torch.testing.assert_close(out.adapter["m"].A, one.factors["m"].A, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.adapter["m"].B, one.factors["m"].B, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.extras["head"], one.extras["head"], rtol=1e-6, atol=0)


def test_chunking_does_not_change_the_result():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 11, generator=gen) for _ in range(7)]
    whole = trimmed_mean(tensors, trim=2)
    assert torch.equal(trimmed_mean(tensors, trim=2, chunk_values=7 * 5), whole)  # 5 coordinates a chunk
    assert torch.equal(trimmed_mean(tensors, trim=3), torch.stack(tensors).median(dim=0).values)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 7),
    seed=st.integers(0, 2**16),
    order=st.randoms(use_true_random=False),
    name=st.sampled_from(["median", "trimmed_mean"]),
)
def test_coordinate_wise_rules_ignore_the_order_of_the_clients(k, seed, order, name):
    gen = torch.Generator().manual_seed(seed)
    updates = [
        update(
            torch.randn(2, 3, generator=gen), torch.randn(4, 2, generator=gen), torch.randn(5, generator=gen)
        )
        for _ in range(k)
    ]
    shuffled = list(updates)
    order.shuffle(shuffled)
    strategy = create_strategy(name, {"beta": 0.25} if name == "trimmed_mean" else {})
    a, b = strategy.aggregate(1, GlobalState(), updates), strategy.aggregate(1, GlobalState(), shuffled)
    assert torch.equal(a.adapter["m"].A, b.adapter["m"].A) and torch.equal(a.adapter["m"].B, b.adapter["m"].B)
    assert torch.equal(a.extras["head"], b.extras["head"])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("median", {}),
        ("trimmed_mean", {}),
        ("clip", {"median_multiple": 2.0}),
        ("clip", {"clip_norm": 3.0}),
        ("clip", {"inner": "median", "clip_norm": 3.0}),
    ],
)
def test_one_client_in_ten_scaled_by_100_moves_robust_rules_little_and_fedavg_far(name, options):
    state = delta_state()
    clean = [honest(state, seed) for seed in range(10)]
    poisoned = [*clean[:9], honest(state, seed=9, scale=100.0)]
    reference = FedAvg().aggregate(1, state, clean)
    step = distance(reference, state)  # the length of the clean round's step
    robust = create_strategy(name, options, CONTEXT).aggregate(1, state, poisoned)
    assert distance(robust, reference) < 0.25 * step
    assert distance(FedAvg().aggregate(1, state, poisoned), reference) > 5 * step


def test_clip_bounds_each_clients_delta_and_reports_it():
    state = delta_state()
    updates = [honest(state, seed) for seed in range(3)]
    norms = [distance(GlobalState(adapter=u.factors, extras=u.extras), state) for u in updates]
    bound = sorted(norms)[1] * 0.5  # below every norm: all three are clipped
    clip = create_strategy("clip", {"clip_norm": bound})
    out = clip.aggregate(1, state, updates)
    for u in updates:  # clipping alone: a single client lands at exactly the bound from the state
        single = create_strategy("clip", {"clip_norm": bound}).aggregate(1, state, [u])
        assert distance(single, state) == pytest.approx(bound, rel=1e-5)
    assert distance(out, state) <= bound + 1e-6
    assert clip.last_metrics["clipped_fraction"] == 1.0
    assert clip.last_metrics["median_update_norm"] == pytest.approx(sorted(norms)[1], rel=1e-5)
    assert clip.last_metrics["clip_bound"] == bound


def test_adaptive_clip_bound_is_a_multiple_of_the_rounds_median_norm():
    state = delta_state()
    updates = [honest(state, seed, scale=s) for seed, s in enumerate([1.0, 2.0, 4.0])]
    clip = create_strategy("clip", {"median_multiple": 1.5})
    clip.aggregate(1, state, updates)
    assert clip.last_metrics["clip_bound"] == pytest.approx(1.5 * clip.last_metrics["median_update_norm"])
    assert clip.last_metrics["clipped_fraction"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("inner", ["fedavg", "ffa"])
def test_streaming_clip_equals_batch_clip(inner):
    state = delta_state()
    updates = [honest(state, seed, scale=1.0 + 3 * seed) for seed in range(4)]
    if inner == "ffa":
        for u in updates:
            u.factors["m"].A = state.adapter["m"].A
    streaming = create_strategy("clip", {"inner": inner, "clip_norm": 2.0})
    assert streaming.start(1, state) is not None  # a fixed bound around a streaming rule streams
    batch = Clip(create_strategy(inner), clip_norm=2.0, median_multiple=None)
    accumulator = streaming.start(1, state)
    for u in reversed(updates):
        accumulator.add(u)
    streamed, batched = accumulator.result(), batch.aggregate(1, state, updates)
    torch.testing.assert_close(streamed.adapter["m"].A, batched.adapter["m"].A)
    torch.testing.assert_close(streamed.adapter["m"].B, batched.adapter["m"].B)
    torch.testing.assert_close(streamed.extras["head"], batched.extras["head"])
    assert streaming.last_metrics == pytest.approx(batch.last_metrics)
    if inner == "ffa":
        assert torch.equal(streamed.adapter["m"].A, state.adapter["m"].A)


def test_clip_streams_only_with_a_fixed_bound_and_a_streaming_inner_strategy():
    state = delta_state()  # start() is None: the server collects the round for one aggregate()
    assert create_strategy("clip", {"median_multiple": 2.0}).start(1, state) is None
    assert create_strategy("clip", {"inner": "median", "clip_norm": 1.0}).start(1, state) is None
    assert not create_strategy("clip", {"clip_norm": 1.0}).linear


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("trimmed_mean", {"trim": 5}, "would drop all 10 sampled clients per round"),
        ("trimmed_mean", {"trim": 1, "beta": 0.1}, "not both"),
        ("trimmed_mean", {"beta": 0.5}, r"beta must be in \[0, 0.5\)"),
        ("clip", {}, "exactly one of clip_norm"),
        ("clip", {"clip_norm": 1.0, "median_multiple": 2.0}, "exactly one of clip_norm"),
        ("clip", {"clip_norm": 0.0}, "must be > 0"),
    ],
)
def test_bad_options_are_clear_errors(name, options, message):
    with pytest.raises(StrategyError, match=message):
        create_strategy(name, options, CONTEXT)


def test_trimming_every_reply_of_a_round_is_a_clear_error():
    trimmed = create_strategy("trimmed_mean", {"trim": 2}, CONTEXT)
    updates = [honest(delta_state(), seed) for seed in range(4)]
    with pytest.raises(StrategyError, match="would drop all 4 replies in round 3; lower trim"):
        trimmed.aggregate(3, GlobalState(), updates)


def test_clip_needs_the_adapter_the_clients_started_from():
    with pytest.raises(StrategyError, match="clip needs the global adapter"):
        create_strategy("clip", {"clip_norm": 1.0}).aggregate(1, GlobalState(), [honest(delta_state(), 0)])
