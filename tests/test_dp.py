"""DP: clipping bounds each client, noise has std z C / m, epsilon matches an independent RDP
computation, the budget stops the run, and resume restores the accountant."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from fedpeft.privacy import PrivacyAccountant, SecureRandom
from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from server.checkpoint import load_checkpoint, save_checkpoint
from strategies import StopFederation, StrategyError, create_strategy
from strategies.clip import DeltaClipper
from strategies.dp import AdaptiveClip
from tests.factories import global_norm

M, N = 4, 20  # clients per round, clients in all


def dp(**options):
    return create_strategy("dp", options, {"clients_per_round": M, "num_clients": N})


def start_state(d_out=200, d_in=150, rank=4):
    gen = torch.Generator().manual_seed(0)
    adapter = {"m": AdapterFactors(torch.randn(rank, d_in, generator=gen), torch.zeros(d_out, rank), 2.0)}
    return GlobalState(adapter=adapter, extras={"head": torch.zeros(10)})


def client(state, shift_B=0.0, shift_head=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = state.adapter["m"]
    B = f.B + shift_B * torch.randn(f.B.shape, generator=gen)
    factors = {"m": AdapterFactors(f.A.clone(), B, f.scale)}
    return ClientUpdate(factors, {"head": state.extras["head"] + shift_head}, 5, 1, f.rank, 8.0)


def test_each_clients_contribution_is_bounded_by_clip_norm_over_m():
    state, C = start_state(), 0.5
    honest = [client(state, shift_B=0.01, seed=s) for s in range(3)]
    huge = client(state, shift_B=1000.0, shift_head=1000.0, seed=9)
    without = dp(inner="ffa", clip_norm=C, noise_multiplier=0.0).aggregate(1, state, honest)
    with_huge = dp(inner="ffa", clip_norm=C, noise_multiplier=0.0).aggregate(1, state, [*honest, huge])
    change = {
        "B": with_huge.adapter["m"].B - without.adapter["m"].B,
        "h": with_huge.extras["head"] - without.extras["head"],
    }
    assert global_norm(change) <= C / M + 1e-6
    assert global_norm(change) > 0.9 * C / M  # the huge client was clipped to exactly C


def test_noise_std_is_z_c_over_m():
    state, C, z = start_state(), 0.8, 1.3
    strategy = dp(inner="ffa", clip_norm=C, noise_multiplier=z, insecure_noise_seed=123)
    out = strategy.aggregate(1, state, [client(state) for _ in range(M)])  # zero deltas: output = noise / m
    noise = torch.cat([out.adapter["m"].B.flatten(), out.extras["head"]])
    assert noise.numel() == 200 * 4 + 10
    # 810 samples: the sample std is within 6% of the truth with overwhelming probability
    assert noise.std().item() == pytest.approx(z * C / M, rel=0.06)
    assert abs(noise.mean().item()) < 4 * z * C / M / math.sqrt(noise.numel())
    assert torch.equal(out.adapter["m"].A, state.adapter["m"].A)  # ffa: no noise on the frozen A


def test_frozen_extras_are_neither_clipped_nor_noised():
    state, C, z = start_state(), 0.8, 1.3
    noised = dp(inner="ffa", clip_norm=C, noise_multiplier=z, insecure_noise_seed=5, freeze_extras=True)
    out = noised.aggregate(1, state, [client(state) for _ in range(M)])
    assert torch.equal(out.extras["head"], state.extras["head"])
    assert out.adapter["m"].B.std().item() == pytest.approx(z * C / M, rel=0.06)  # 800 noised values
    # a head moved far would get every update clipped if it counted; frozen, only B's small delta does
    updates = [client(state, shift_B=1e-3, shift_head=100.0, seed=s) for s in range(M)]
    exact = dp(inner="ffa", clip_norm=C, noise_multiplier=0.0, freeze_extras=True).aggregate(
        1, state, updates
    )
    mean_B = sum(u.factors["m"].B for u in updates) / M
    assert torch.allclose(exact.adapter["m"].B, mean_B, atol=1e-7)
    assert torch.equal(exact.extras["head"], state.extras["head"])


def test_fedavg_inner_noises_A_too():
    state = start_state()
    out = dp(inner="fedavg", clip_norm=1.0, noise_multiplier=1.0).aggregate(1, state, [client(state)] * M)
    assert not torch.equal(out.adapter["m"].A, state.adapter["m"].A)


def reference_epsilon(q: float, sigma: float, rounds: int, delta: float, orders: list[int]) -> float:
    """Independent RDP computation: the sampled Gaussian mechanism at integer orders (Mironov,
    Talwar & Zhang 2019, eq. for integer alpha), composed over rounds, converted with
    Balle et al. 2020's bound as opacus does."""
    best = math.inf
    for a in orders:
        log_terms = (
            [
                math.lgamma(a + 1)
                - math.lgamma(k + 1)
                - math.lgamma(a - k + 1)
                + (a - k) * math.log1p(-q)
                + k * math.log(q)
                + (k * k - k) / (2 * sigma**2)
                for k in range(a + 1)
            ]
            if q < 1
            else [(a * a - a) / (2 * sigma**2)]
        )
        top = max(log_terms)
        rdp = (top + math.log(sum(math.exp(t - top) for t in log_terms))) / (a - 1)
        eps = rounds * rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(("q", "sigma", "rounds"), [(0.2, 1.0, 30), (0.05, 0.8, 200), (1.0, 2.0, 10)])
def test_epsilon_matches_an_independent_computation(q, sigma, rounds):
    accountant = PrivacyAccountant(sigma, q, delta=1e-5)
    for _ in range(rounds):
        accountant.step()
    ours = accountant.epsilon()
    # opacus searches fractional orders too, so it can only be lower than the integer-order reference
    reference = reference_epsilon(q, sigma, rounds, 1e-5, list(range(2, 64)))
    assert ours == pytest.approx(reference, rel=0.01)


def test_epsilon_is_opacus_rdp_accountants_at_any_number_of_rounds_asked_in_any_order():
    from opacus.accountants import RDPAccountant

    accountant = PrivacyAccountant(0.9, 0.3, delta=1e-5)  # its per-round RDP is worked out once
    for rounds in (40, 1, 7, 40, 300):
        reference = RDPAccountant()
        reference.history = [(0.9, 0.3, rounds)]
        assert accountant.epsilon(rounds) == reference.get_epsilon(delta=1e-5)


def test_epsilon_grows_and_is_reported_per_round():
    state = start_state()
    strategy = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0)
    eps = []
    for rnd in (1, 2, 3):
        strategy.aggregate(rnd, state, [client(state)] * M)
        eps.append(strategy.last_metrics["epsilon"])
    assert eps[0] < eps[1] < eps[2]
    assert strategy.last_metrics["delta"] == 1e-5


def test_budget_stops_before_the_round_that_would_exceed_it():
    state = start_state()
    accountant = PrivacyAccountant(1.0, M / N, 1e-5)
    budget = accountant.epsilon(3) + 1e-9  # exactly three rounds fit
    strategy = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=budget)
    for rnd in (1, 2, 3):
        strategy.client_instructions(rnd, state)
        strategy.aggregate(rnd, state, [client(state)] * M)
    with pytest.raises(StopFederation, match="privacy budget"):
        strategy.client_instructions(4, state)
    assert strategy.last_metrics["epsilon"] <= budget


def test_resume_restores_the_accountant_and_the_noise(tmp_path):
    state = start_state()
    first = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0)
    first.aggregate(1, state, [client(state)] * M)
    saved = GlobalState(
        round=1, adapter=state.adapter, extras=state.extras, strategy_state=first.state_dict()
    )
    save_checkpoint(tmp_path, saved, random.Random(0).getstate())

    restored = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0)  # its own key, until loaded
    restored.load_state_dict(load_checkpoint(tmp_path).state.strategy_state)
    assert restored.accountant.epsilon() == first.accountant.epsilon() > 0
    a = first.aggregate(2, state, [client(state)] * M)
    b = restored.aggregate(2, state, [client(state)] * M)
    assert torch.equal(a.adapter["m"].B, b.adapter["m"].B)


def test_nonlinear_inner_is_refused_unless_opted_in():
    with pytest.raises(StrategyError, match="not, so its noise calibration would not hold"):
        dp(inner="stacking")
    assert dp(inner="stacking", allow_nonlinear=True).inner.name == "stacking"


def test_dp_needs_run_facts():
    with pytest.raises(StrategyError, match="needs the option"):
        create_strategy("dp", {"inner": "ffa"})


def test_two_runs_draw_different_noise_unless_in_the_insecure_test_mode():
    state = start_state()
    zero_deltas = [client(state) for _ in range(M)]

    def noise(**options):
        out = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0, **options).aggregate(1, state, zero_deltas)
        return out.adapter["m"].B

    assert not torch.equal(noise(), noise())  # a secret key drawn from the OS for each run
    assert torch.equal(noise(insecure_noise_seed=7), noise(insecure_noise_seed=7))


def test_the_secure_stream_resumes_exactly_from_its_state():
    source = SecureRandom()
    source.normal(10, 1.0)
    restored = SecureRandom.from_state_dict(source.state_dict())
    assert torch.equal(source.normal(1000, 1.0), restored.normal(1000, 1.0))
    assert np.array_equal(source.uniform(100), restored.uniform(100))


def test_secure_normals_have_the_moments_of_a_gaussian():
    z = SecureRandom().normal(200_001, 3.0).double()
    assert abs(float(z.mean())) < 5 * 3.0 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(3.0, rel=0.01)
    assert float((z.abs() > 3.0).double().mean()) == pytest.approx(0.3173, abs=0.005)  # P(|Z| > 1 sigma)


def test_poisson_sampling_takes_each_client_independently_with_probability_q():
    strategy = dp(inner="ffa")  # q = M / N = 0.2
    candidates = list(range(100, 100 + N))
    draws = [strategy.select_clients(r, candidates) for r in range(3000)]
    counts = np.array([len(d) for d in draws])
    assert counts.mean() == pytest.approx(M, rel=0.03)
    assert counts.var() == pytest.approx(N * 0.2 * 0.8, rel=0.1)  # binomial: independent draws
    per_client = np.array([sum(c in d for d in draws) for c in candidates]) / len(draws)
    assert np.all(np.abs(per_client - 0.2) < 0.035)
    assert (counts == 0).any()  # a round may sample nobody


def test_a_round_without_replies_releases_noise_only_and_is_charged():
    state, C, z = start_state(), 0.5, 1.0
    strategy = dp(inner="ffa", clip_norm=C, noise_multiplier=z)
    out = strategy.aggregate(1, state, [])
    noise = torch.cat([(out.adapter["m"].B - state.adapter["m"].B).flatten(), out.extras["head"]])
    assert float(noise.std()) == pytest.approx(z * C / M, rel=0.1)
    assert strategy.accountant.rounds == 1 and strategy.last_metrics["epsilon"] > 0


def test_adaptive_clipping_follows_the_geometric_rule_towards_the_quantile():
    state = start_state()
    strategy = dp(inner="ffa", clip_norm=0.1, noise_multiplier=0.0, target_quantile=0.8, clip_norm_lr=0.2)
    updates = [client(state, shift_B=s, seed=k) for k, s in enumerate((0.0, 1e-4, 1.0, 1.0))]  # 2 of 4 short
    norms = []
    for rnd in range(1, 4):
        before = strategy.clip_norm
        strategy.aggregate(rnd, state, updates)
        unclipped = sum(DeltaClipper("t", state, False).measure(u) <= before for u in updates)
        assert strategy.last_metrics["noised_unclipped_fraction"] == unclipped / M  # no count noise at z = 0
        assert strategy.clip_norm == pytest.approx(before * math.exp(-0.2 * (unclipped / M - 0.8)))
        norms.append(strategy.clip_norm)
    assert 0.1 < norms[0] < norms[1] < norms[2]  # half unclipped, below the 0.8 target: C grows


class FixedNoise:
    def normal(self, n: int, std: float) -> torch.Tensor:
        return torch.full((n,), 0.3)


def test_the_released_count_moves_by_half_a_client_when_one_joins_or_leaves():
    """Andrew et al.'s z_Δ = (z⁻² - (2 σ_b)⁻²)^(-1/2) holds for a count of sensitivity 1/2: the bits
    are centred before the noise (the number of replies is private under Poisson sampling)."""
    rule = AdaptiveClip.create(0.5, 0.2, 2.0, 1.0, M)
    _, base = rule.next_norm(1.0, 2, 3, M, FixedNoise())  # 3 replies, 2 within C
    _, joined_unclipped = rule.next_norm(1.0, 3, 4, M, FixedNoise())
    _, joined_clipped = rule.next_norm(1.0, 2, 4, M, FixedNoise())
    assert joined_unclipped - base == pytest.approx(0.5 / M) and base - joined_clipped == pytest.approx(
        0.5 / M
    )
    assert base == pytest.approx((2 - 3 / 2 + 0.3) / M + 0.5)


def test_adaptive_clipping_spends_part_of_the_noise_on_the_count_and_the_total_is_charged():
    strategy = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0, target_quantile=0.5, count_noise_std=2.0)
    z_delta = strategy.update_noise_multiplier
    assert z_delta == pytest.approx(
        (1.0 - (2 * 2.0) ** -2) ** -0.5
    )  # Andrew et al.: z^-2 = z_d^-2 + (2 s_b)^-2
    assert strategy.accountant.noise_multiplier == 1.0
    with pytest.raises(StrategyError, match="count_noise_std = 0.4 must exceed noise_multiplier / 2"):
        dp(inner="ffa", noise_multiplier=1.0, target_quantile=0.5, count_noise_std=0.4)


def test_prv_accountant_agrees_that_the_rdp_epsilon_is_an_upper_bound():
    """A second accountant of another kind (opacus' PRV: numerical composition of privacy loss
    distributions) is tighter than RDP, and not by much in this regime."""
    from opacus.accountants import PRVAccountant

    q, sigma, rounds = 0.1, 1.0, 50
    rdp = PrivacyAccountant(sigma, q, delta=1e-5)
    prv = PRVAccountant()
    for _ in range(rounds):
        rdp.step()
        prv.step(noise_multiplier=sigma, sample_rate=q)
    tight = prv.get_epsilon(delta=1e-5)
    assert 0.6 * rdp.epsilon() < tight <= rdp.epsilon()


def test_a_dp_run_logs_nothing_per_client_and_survives_a_round_that_samples_nobody(tiny_bert_dir, tmp_path):
    import io
    import json

    from rich.console import Console

    from fedpeft.testing import LocalGrid
    from server.loop import FederatedRun
    from tests.factories import small_config

    dp_options = {"strategy.name": "dp", "strategy.inner": "ffa", "strategy.clip_norm": 0.5, "run.rounds": 3}
    config = small_config(tiny_bert_dir, **dp_options)
    out = io.StringIO()
    run = FederatedRun(config, tmp_path, console=Console(file=out, width=200))
    sampled = []
    poisson = run.strategy.select_clients

    def select(rnd, candidates):
        chosen = [] if rnd == 2 else poisson(rnd, candidates)
        sampled.append(chosen)
        return chosen

    run.strategy.select_clients = select
    run.run(LocalGrid(3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and sampled[1] == []
    per_client = {"replies", "update_norms", "train_loss", "dropped", "clients_sampled", "clients_aggregated"}
    assert all(not per_client & set(r) for r in rows)
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"]  # the empty round is charged
    assert "train_loss" not in out.getvalue() and "partition-" not in out.getvalue()


def test_under_dp_a_round_is_checkpointed_before_anything_of_it_is_released(tiny_bert_dir, tmp_path):
    """The checkpoint holds the secret stream's advance: a crash after the release but before it
    would redo the round with the same noise on other updates, whose difference it would reveal."""
    from fedpeft.testing import LocalGrid
    from server.checkpoint import load_checkpoint
    from server.loop import FederatedRun
    from tests.factories import small_config

    config = small_config(
        tiny_bert_dir, **{"strategy.name": "dp", "strategy.inner": "ffa", "strategy.clip_norm": 0.5}
    )
    run = FederatedRun(config, tmp_path)
    checkpointed_at_release = []
    record = run.recorder.record

    def checked(row):
        if row["round"] > 0:
            checkpointed_at_release.append((row["round"], load_checkpoint(tmp_path).state.round))
        record(row)

    run.recorder.record = checked
    run.run(LocalGrid(3))
    assert checkpointed_at_release == [(1, 1), (2, 2)]
