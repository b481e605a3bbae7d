"""Property tests of each strategy's defining identity, on rectangular layers with mixed ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState, LowRankDelta
from strategies import FFA, VCMA, FedAvg, FedEx, Stacking, StrategyError, create_strategy
from strategies.lowrank import recompress
from tests.factories import total_delta

RANKS = [1, 4, 8, 16]
CONTEXT = {"clients_per_round": 3, "num_clients": 10}


@st.composite
def federation(draw, mixed_ranks: bool):
    """K clients' updates on 2 rectangular modules, a prior global state, and example counts."""
    k = draw(st.integers(1, 5))
    shapes = {}
    for name in ("m.q", "m.fc"):
        d_out = draw(st.integers(3, 24))
        d_in = draw(st.integers(3, 24).filter(lambda d, d_out=d_out: d != d_out))
        shapes[name] = (d_out, d_in)
    ranks = (
        [draw(st.sampled_from(RANKS)) for _ in range(k)]
        if mixed_ranks
        else [draw(st.sampled_from(RANKS))] * k
    )
    counts = [draw(st.integers(1, 100)) for _ in range(k)]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    alpha = 16.0
    base_rank = ranks[0]

    def factors(rank):
        return {
            n: AdapterFactors(
                torch.randn(rank, di, generator=gen), torch.randn(do, rank, generator=gen), alpha / rank
            )
            for n, (do, di) in shapes.items()
        }

    trained = [draw(st.integers(1, 640)) for _ in range(k)]
    updates = [
        ClientUpdate(
            factors(r),
            {"head": torch.randn(4, 5, generator=gen)},
            n,
            round=1,
            rank=r,
            alpha=alpha,
            num_trained=t,
        )
        for r, n, t in zip(ranks, counts, trained, strict=True)
    ]
    merged = {
        n: LowRankDelta(torch.randn(do, 2, generator=gen), torch.randn(2, di, generator=gen))
        for n, (do, di) in shapes.items()
    }
    prior = GlobalState(
        round=0, merged=merged, adapter=factors(base_rank), extras={"head": torch.zeros(4, 5)}
    )
    return prior, updates


def weights(updates, weighting="examples"):
    raw = {
        "examples": [u.num_examples for u in updates],
        "steps": [u.num_trained for u in updates],
        "uniform": [1] * len(updates),
    }[weighting]
    return [w / sum(raw) for w in raw]


def exact_sum(updates, module, weighting="examples"):
    p = weights(updates, weighting)
    return sum(pk * u.factors[module].delta() for pk, u in zip(p, updates, strict=True))


def merged_delta(state, module):
    return state.merged[module].delta() if module in state.merged else 0


@settings(max_examples=60, deadline=None)
@given(federation(mixed_ranks=True))
def test_stacking_is_exact_for_mixed_ranks(case):
    prior, updates = case
    out = Stacking(rank_cap=64).aggregate(1, prior, updates)
    assert out.adapter is None
    for module in prior.merged:
        expected = prior.merged[module].delta() + exact_sum(updates, module)
        torch.testing.assert_close(total_delta(out, module), expected, rtol=1e-4, atol=1e-4)
    head = sum(p * u.extras["head"] for p, u in zip(weights(updates), updates, strict=True))
    torch.testing.assert_close(out.extras["head"], head)


@settings(max_examples=60, deadline=None)
@given(federation(mixed_ranks=False))
def test_fedex_adds_the_exact_residual(case):
    prior, updates = case
    strategy = FedEx(rank_cap=64)
    out = strategy.aggregate(1, prior, updates)
    for module in prior.merged:
        # W0' + s B̄ Ā = W0 + (old merged) + s sum_k p_k B_k A_k
        expected = prior.merged[module].delta() + exact_sum(updates, module)
        torch.testing.assert_close(total_delta(out, module), expected, rtol=1e-4, atol=1e-4)
        mean_A = sum(p * u.factors[module].A for p, u in zip(weights(updates), updates, strict=True))
        torch.testing.assert_close(out.adapter[module].A, mean_A)
    assert strategy.last_metrics["discarded_energy"] < 1e-10


@settings(max_examples=30, deadline=None)
@given(federation(mixed_ranks=False), st.sampled_from(["steps", "uniform"]))
def test_every_weighting_gives_its_weights_to_fedavg_stacking_and_fedex(case, weighting):
    prior, updates = case
    p = weights(updates, weighting)
    averaged = create_strategy("fedavg", {"weighting": weighting}).aggregate(1, prior, updates)
    for module in prior.merged:
        mean_B = sum(pk * u.factors[module].B for pk, u in zip(p, updates, strict=True))
        torch.testing.assert_close(averaged.adapter[module].B, mean_B)
    head = sum(pk * u.extras["head"] for pk, u in zip(p, updates, strict=True))
    torch.testing.assert_close(averaged.extras["head"], head)
    for name in ("stacking", "fedex"):
        strategy = create_strategy(name, {"weighting": weighting})
        assert strategy.client_instructions(1, prior).weighting == weighting
        out = strategy.aggregate(1, prior, updates)
        for module in prior.merged:
            expected = prior.merged[module].delta() + exact_sum(updates, module, weighting)
            torch.testing.assert_close(total_delta(out, module), expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_weighting_is_refused_naming_the_choices():
    with pytest.raises(StrategyError, match="weighting must be one of examples, steps, uniform"):
        create_strategy("fedavg", {"weighting": "rows"})


def test_steps_weighting_needs_the_examples_trained():
    update = one_client()
    with pytest.raises(ValueError, match="num_trained"):
        create_strategy("fedavg", {"weighting": "steps"}).aggregate(1, GlobalState(), [update, update])


@settings(max_examples=60, deadline=None)
@given(federation(mixed_ranks=False))
def test_ffa_is_exact_with_frozen_A(case):
    prior, updates = case
    for u in updates:  # FFA clients never change A: it is the frozen shared init
        for module, f in u.factors.items():
            f.A = prior.adapter[module].A
    out = FFA().aggregate(1, prior, updates)
    for module in prior.merged:
        assert torch.equal(out.adapter[module].A, prior.adapter[module].A)
        expected = prior.merged[module].delta() + exact_sum(updates, module)
        torch.testing.assert_close(total_delta(out, module), expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(federation(mixed_ranks=False))
def test_vcma_restores_the_unweighted_mean_client_variance_of_A_and_keeps_its_mean(case):
    prior, updates = case
    out = VCMA(epsilon=0.0).aggregate(1, prior, updates)
    p = weights(updates)
    for module in prior.merged:
        clients = [u.factors[module].A for u in updates]
        mean = sum(pk * a for pk, a in zip(p, clients, strict=True))
        got = out.adapter[module].A
        if got.numel() > 1:  # a single value has no variance to restore
            target = sum(a.var() for a in clients) / len(clients)  # unweighted, as the paper's code
            torch.testing.assert_close(got.var(), target, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(got.mean(), mean.mean(), rtol=1e-4, atol=1e-5)


def test_vcma_weighted_target_weighs_the_variances_like_the_average():
    gen = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(
            {"m": AdapterFactors(s * torch.randn(4, 30, generator=gen), torch.zeros(5, 4), 1.0)},
            {},
            n,
            1,
            4,
            4.0,
        )
        for s, n in ((1.0, 1), (3.0, 3))
    ]
    out = VCMA(epsilon=0.0, weighted_target=True).aggregate(1, GlobalState(), updates)
    target = (1 * updates[0].factors["m"].A.var() + 3 * updates[1].factors["m"].A.var()) / 4
    torch.testing.assert_close(out.adapter["m"].A.var(), target, rtol=1e-4, atol=0)


def vcma_round(extras_per_client):
    gen = torch.Generator().manual_seed(1)
    updates = [
        ClientUpdate(
            {"m": AdapterFactors(torch.randn(4, 30, generator=gen), torch.randn(5, 4, generator=gen), 1.0)},
            extras,
            1,
            1,
            4,
            4.0,
        )
        for extras in extras_per_client
    ]
    return updates, VCMA().aggregate(1, GlobalState(), updates), FedAvg().aggregate(1, GlobalState(), updates)


def test_vcma_leaves_B_as_averaged():
    _, out, plain = vcma_round([{}, {}, {}])
    assert torch.equal(out.adapter["m"].B, plain.adapter["m"].B)
    assert not torch.equal(out.adapter["m"].A, plain.adapter["m"].A)


def test_vcma_leaves_biases_as_averaged_and_rescales_dense_weights():
    gen = torch.Generator().manual_seed(2)
    heads = [
        {"head.bias": torch.randn(4, generator=gen), "head.weight": torch.randn(4, 6, generator=gen)}
        for _ in range(3)
    ]
    _, out, plain = vcma_round(heads)
    assert torch.equal(out.extras["head.bias"], plain.extras["head.bias"])
    target = sum(h["head.weight"].var() for h in heads) / 3
    assert abs(float(out.extras["head.weight"].var() / target) - 1) < 0.1  # the fixed epsilon leaves a little


def test_vcma_leaves_single_values_as_averaged():
    _, out, plain = vcma_round([{"temperature": torch.tensor([float(k)])} for k in range(3)])
    assert torch.equal(out.extras["temperature"], plain.extras["temperature"])


def test_vcma_reports_the_variance_ratio_of_the_plain_average_of_A():
    updates, _, _ = vcma_round([{}] * 8)  # 8 independent A's: averaging leaves about 1/8 of the variance
    strategy = VCMA(epsilon=0.0)
    strategy.aggregate(1, GlobalState(), updates)
    assert 0.08 < strategy.last_metrics["variance_ratio_averaged"] < 0.2


@settings(max_examples=30, deadline=None)
@given(federation(mixed_ranks=True), st.integers(1, 6))
def test_recompression_below_the_true_rank_is_the_best_approximation(case, cap):
    prior, updates = case
    module = "m.q"
    exact = Stacking(rank_cap=64).aggregate(1, prior, updates).merged[module]
    truncated, discarded = recompress(exact, cap)
    s = torch.linalg.svdvals(exact.delta().double())
    best_error = float((s[cap:] ** 2).sum())
    error = float(((truncated.delta() - exact.delta()).double() ** 2).sum())
    assert truncated.rank <= cap
    assert error == pytest.approx(best_error, rel=1e-3, abs=1e-6)
    assert discarded == pytest.approx(best_error / float((s**2).sum()), rel=1e-3, abs=1e-9)


def one_client(rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = {
        "m": AdapterFactors(
            torch.randn(rank, 7, generator=gen), torch.randn(5, rank, generator=gen), 4.0 / rank
        )
    }
    return ClientUpdate(f, {"head": torch.randn(3, generator=gen)}, 10, 1, rank, 4.0)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedavg", {}),
        ("stacking", {}),
        ("vcma", {}),
        ("fedex", {}),
        ("ffa", {}),
        ("median", {}),
        ("trimmed_mean", {}),
        ("clip", {"clip_norm": 1e6}),
        ("fedavgm", {"momentum": 0.0}),
    ],
)
def test_single_client_gives_that_clients_model(name, options):
    update = one_client()
    prior = GlobalState(
        adapter={"m": AdapterFactors(update.factors["m"].A, torch.zeros(5, 4), 1.0)},
        extras={"head": torch.zeros(3)},
    )
    out = create_strategy(name, options).aggregate(1, prior, [update])
    torch.testing.assert_close(total_delta(out, "m"), update.factors["m"].delta(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.extras["head"], update.extras["head"])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedavg", {}),
        ("stacking", {"rank_cap": 8}),
        ("vcma", {}),
        ("fedex", {"rank_cap": 8}),
        ("ffa", {}),
        ("dp", {"inner": "ffa", "noise_multiplier": 0.7, "clip_norm": 0.5}),
        ("dp", {"inner": "fedavg", "noise_multiplier": 0.3, "clip_norm": 2.0, "epsilon_budget": 100.0}),
        ("median", {}),
        ("trimmed_mean", {"trim": 1}),
        ("clip", {"inner": "fedadam", "median_multiple": 1.0}),
        ("fedavgm", {"inner": "ffa"}),
        ("fedadam", {}),
        ("fedyogi", {"inner_options": {"weighting": "uniform"}}),
        ("dp", {"inner": "fedadagrad", "clip_norm": 2.0, "noise_multiplier": 0.3}),
    ],
)
def test_state_survives_save_and_load_mid_run(name, options):
    """Round 2 aggregated by a strategy restored from round 1's state_dict equals the original's."""
    updates = [one_client(seed=s) for s in range(3)]
    frozen = updates[0].factors["m"].A
    for u in updates:
        u.factors["m"].A = frozen.clone()
    start = GlobalState(
        adapter={"m": AdapterFactors(frozen, torch.zeros(5, 4), 1.0)}, extras={"head": torch.zeros(3)}
    )
    first = create_strategy(name, options, CONTEXT)
    first.client_instructions(1, start)
    middle = first.aggregate(1, start, updates)
    restored = create_strategy(name, options, CONTEXT)
    restored.load_state_dict(first.state_dict())
    a = first.aggregate(2, middle, updates)
    b = restored.aggregate(2, middle, updates)
    assert torch.equal(total_delta(a, "m"), total_delta(b, "m"))
    assert torch.equal(a.extras["head"], b.extras["head"])
    assert getattr(first, "last_metrics", {}) == getattr(restored, "last_metrics", {})


def test_mixed_ranks_are_refused_by_averaging_strategies():
    updates = [one_client(rank=2), one_client(rank=4)]
    for name in ("fedavg", "vcma", "fedex", "ffa", "median", "trimmed_mean"):
        with pytest.raises(ValueError, match="stacking"):
            create_strategy(name).aggregate(1, GlobalState(adapter=updates[0].factors), updates)
