"""DP: clipping bounds each client, noise has std z C / m, epsilon matches an independent RDP
computation, the budget stops the run, and resume restores the accountant."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedpeft.privacy import PrivacyAccountant, clip_update, global_norm
from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from server.checkpoint import load_checkpoint, save_checkpoint
from strategies import StopFederation, StrategyError, create_strategy

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


def test_clip_update_bounds_the_global_norm():
    tensors = {"a": torch.full((3, 3), 10.0), "b": torch.full((4,), -7.0)}
    clipped, was = clip_update(tensors, 1.5)
    assert was and global_norm(clipped) == pytest.approx(1.5)
    same, was = clip_update({"a": torch.full((2,), 0.1)}, 1.5)
    assert not was and torch.equal(same["a"], torch.full((2,), 0.1))


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
    strategy = dp(inner="ffa", clip_norm=C, noise_multiplier=z, seed=123)
    out = strategy.aggregate(1, state, [client(state) for _ in range(M)])  # zero deltas: output = noise / m
    noise = torch.cat([out.adapter["m"].B.flatten(), out.extras["head"]])
    assert noise.numel() == 200 * 4 + 10
    # 810 samples: the sample std is within 6% of the truth with overwhelming probability
    assert noise.std().item() == pytest.approx(z * C / M, rel=0.06)
    assert abs(noise.mean().item()) < 4 * z * C / M / math.sqrt(noise.numel())
    assert torch.equal(out.adapter["m"].A, state.adapter["m"].A)  # ffa: no noise on the frozen A


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
    first = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0, seed=5)
    first.aggregate(1, state, [client(state)] * M)
    saved = GlobalState(
        round=1, adapter=state.adapter, extras=state.extras, strategy_state=first.state_dict()
    )
    save_checkpoint(tmp_path, saved, random.Random(0).getstate())

    restored = dp(inner="ffa", clip_norm=1.0, noise_multiplier=1.0, seed=5)
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
