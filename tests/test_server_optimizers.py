"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) against a hand computation of Reddi et
al.'s Algorithm 2 over 3 rounds, resumed from saved state mid-run, streaming, and composed with dp."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies import FedAvg, StrategyError, create_strategy
from strategies.base import aggregate_stream
from tests import factories

OPTIMIZERS = ["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
CONTEXT = {"clients_per_round": 3, "num_clients": 10}


def round_updates(state: GlobalState, rnd: int) -> list[ClientUpdate]:
    """Three clients' replies to ``state`` with different example counts (weights 5, 1, 2)."""
    updates = []
    for k, examples in enumerate((50, 10, 20)):
        update = factories.trained(state, seed=100 * rnd + k, boost=1.0 + k)
        update.num_examples, update.round = examples, rnd
        updates.append(update)
    return updates


def flat(state: GlobalState) -> dict[str, torch.Tensor]:
    out = {f"{p}/{m}": getattr(f, p).double() for m, f in state.adapter.items() for p in ("A", "B")}
    return out | {f"x/{k}": t.double() for k, t in state.extras.items()}


def hand_step(name: str, x: float, delta: float, moments: dict, key: str, **hp) -> float:
    """One coordinate's step by the formulas in the papers (float64, scalar by scalar)."""
    if name == "fedavgm":
        v = hp["momentum"] * moments.get(key, 0.0) + delta
        moments[key] = v
        return x + hp["server_lr"] * v
    b1, b2, tau = hp["beta_1"], hp["beta_2"], hp["tau"]
    m_prev, v_prev = moments.get(key, (0.0, tau**2))
    m = b1 * m_prev + (1 - b1) * delta
    if name == "fedadagrad":
        v = v_prev + delta**2
    elif name == "fedadam":
        v = b2 * v_prev + (1 - b2) * delta**2
    else:
        v = v_prev - (1 - b2) * delta**2 * math.copysign(1.0, v_prev - delta**2) * (v_prev != delta**2)
    moments[key] = (m, v)
    return x + hp["server_lr"] * m / (math.sqrt(v) + tau)


HYPER = {
    "fedavgm": {"server_lr": 0.7, "momentum": 0.8},
    "fedadagrad": {"server_lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-2},
    "fedadam": {"server_lr": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
    "fedyogi": {"server_lr": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_three_rounds_match_the_papers_formulas_and_resume_identically(name):
    hp = HYPER[name]
    strategy = create_strategy(name, dict(hp))
    state = factories.sent_state()
    expected = {k: v.clone() for k, v in flat(state).items()}
    moments: dict = {}
    for rnd in (1, 2, 3):
        updates = round_updates(state, rnd)
        mean = flat(FedAvg().aggregate(rnd, state, updates))
        for key, x in expected.items():
            delta = mean[key] - flat(state)[key]
            expected[key] = torch.tensor(
                [
                    hand_step(name, xi, di, moments, f"{key}[{i}]", **hp)
                    for i, (xi, di) in enumerate(
                        zip(x.flatten().tolist(), delta.flatten().tolist(), strict=True)
                    )
                ],
                dtype=torch.float64,
            ).view(x.shape)
        if rnd == 2:  # a restarted server: a new instance loads the saved state and carries on
            saved = strategy.state_dict()
            strategy = create_strategy(name, dict(hp))
            strategy.load_state_dict(saved)
        state = strategy.aggregate(rnd, state, updates)
        for key, value in flat(state).items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_at_server_lr_one_is_fedavg():
    state = factories.sent_state()
    updates = round_updates(state, 1)
    plain = flat(FedAvg().aggregate(1, state, updates))
    stepped = flat(
        create_strategy("fedavgm", {"momentum": 0.0, "server_lr": 1.0}).aggregate(1, state, updates)
    )
    for key in plain:
        torch.testing.assert_close(stepped[key], plain[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_streaming_equals_batch_and_honours_the_inner_weighting(name):
    state = factories.sent_state()
    updates = round_updates(state, 1)
    options = {"inner_options": {"weighting": "uniform"}}
    batch = create_strategy(name, options).aggregate(1, state, updates)
    streamed = aggregate_stream(create_strategy(name, options), 1, state, updates)
    weighted = create_strategy(name, {}).aggregate(1, state, updates)
    for key, value in flat(batch).items():
        torch.testing.assert_close(flat(streamed)[key], value)
    assert any(not torch.allclose(flat(weighted)[k], v) for k, v in flat(batch).items())


def test_around_ffa_the_frozen_A_stays_and_only_B_and_extras_move():
    state = factories.sent_state()
    strategy = create_strategy("fedadam", {"inner": "ffa"})
    assert not strategy.client_instructions(1, state).train_lora_A
    updates = round_updates(state, 1)
    for u in updates:  # an FFA client sends back the A it received
        u.factors = {m: AdapterFactors(state.adapter[m].A, f.B, f.scale) for m, f in u.factors.items()}
    out = strategy.aggregate(1, state, updates)
    for m, f in out.adapter.items():
        assert torch.equal(f.A, state.adapter[m].A) and not torch.equal(f.B, state.adapter[m].B)
    assert set(strategy.state_dict()["moments"]["m"]) == {
        *(f"B/{m}" for m in state.adapter),
        *(f"extra/{k}" for k in state.extras),
    }


def test_inside_dp_it_steps_on_the_noised_mean():
    state = factories.sent_state()
    updates = round_updates(state, 1)
    dp_options = {"clip_norm": 0.05, "noise_multiplier": 0.5, "insecure_noise_seed": 3, **CONTEXT}
    wrapped = create_strategy("dp", {"inner": "fedadam", "inner_options": {"server_lr": 0.05}, **dp_options})
    plain = create_strategy("dp", {"inner": "fedavg", **dp_options})
    noised_mean = plain.aggregate(1, state, updates)  # same noise generator seed: the same noise
    by_hand = create_strategy("fedadam", {"server_lr": 0.05}).aggregate(
        1, state, [ClientUpdate(noised_mean.adapter, noised_mean.extras, 1, 1, 4, 16.0, num_trained=1)]
    )
    out = wrapped.aggregate(1, state, updates)
    for key, value in flat(by_hand).items():
        torch.testing.assert_close(flat(out)[key], value)
    assert wrapped.state_dict()["inner"]["steps"] == 1  # the optimizer's state is in dp's checkpoint


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inner": "dp"}, "put fedadam inside dp"),
        (
            {
                "inner": "strategies.dp:DifferentialPrivacy",
                "inner_options": {"clients_per_round": 2, "num_clients": 4, "noise_multiplier": 1.0},
            },
            "put fedadam inside dp",
        ),
        ({"inner": "stacking"}, "wraps a linear strategy"),
        ({"server_lr": 0.0}, "server_lr must be positive"),
        ({"beta_1": 1.0}, "0 <= beta_1, beta_2 < 1"),
    ],
)
def test_bad_compositions_and_options_are_refused_in_one_line(options, message):
    with pytest.raises(StrategyError, match=message):
        create_strategy("fedadam", options, context=CONTEXT)


def test_fedavgm_refuses_a_momentum_of_one():
    with pytest.raises(StrategyError, match=r"momentum must be in \[0, 1\)"):
        create_strategy("fedavgm", {"momentum": 1.0})


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_fedsbs_initialisation_rounds_pass_through_and_the_cores_are_stepped(name):
    """The sketch rounds' results are a frame, not an update: the optimizer must not step on them."""
    from fedpeft.lora_sb import gradient_sketch
    from strategies.fedsb import CORE, fedsb_stage
    from tests.test_fedsb import RANK, low_rank_gradients, reply

    wrapped, plain = create_strategy(name, {"inner": "fedsb"}), create_strategy("fedsb")
    state = GlobalState(adapter=factories.factors(RANK, 7, scale=2.0), extras=factories.extras(0))
    for _ in range(2):
        stage = fedsb_stage(state)
        replies = [
            reply(gradient_sketch(state.adapter, low_rank_gradients(k), stage), 10, k) for k in range(3)
        ]
        state, expected = wrapped.aggregate(1, state, replies), plain.aggregate(1, state, replies)
        for module, f in expected.adapter.items():
            assert torch.equal(state.adapter[module].A, f.A) and torch.equal(state.adapter[module].B, f.B)
    assert fedsb_stage(state) == CORE and wrapped.steps == 0
