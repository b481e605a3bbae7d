"""FedAU: its weight estimates against a transcription of the authors' loop, its step against a
hand computation over rounds (with a save/load mid-run), and the simulated participation it is for."""

from __future__ import annotations

import random

import pytest
import torch

from client.app import simulation_app
from client.faults import availability, unavailable
from fedpeft.config import ConfigError, load_config
from fedpeft.state import trained_tensors
from fedpeft.testing import LocalGrid
from server.loop import FederatedRun
from strategies import FedAU, create_strategy
from strategies.registry import StrategyError
from tests.factories import metrics_rows, sent_state, small_config, trained


def authors_weights(participation: list[set[int]], num_clients: int, cutoff: int) -> list[dict[int, float]]:
    """Each round's weights of its participants, as ``weighting_method == 'adaptive'`` in the
    authors' main.py computes them: every client tracked from the first round, the mean of its
    intervals (1 before any), the round's intervals recorded after its weights are used."""
    absent = [0] * num_clients
    intervals: list[list[int]] = [[] for _ in range(num_clients)]
    out = []
    for participants in participation:
        weights = {}
        for n in range(num_clients):
            if n in participants:
                weights[n] = sum(intervals[n]) / len(intervals[n]) if intervals[n] else 1.0
                intervals[n].append(absent[n] + 1)
                absent[n] = 0
            else:
                absent[n] += 1
                if absent[n] >= cutoff:
                    intervals[n].append(absent[n])
                    absent[n] = 0
        out.append(weights)
    return out


def test_weights_follow_the_authors_estimate_including_late_comers():
    rng = random.Random(0)
    probabilities = [0.9, 0.5, 0.2, 0.05, 0.3]
    participation = [{n for n, p in enumerate(probabilities) if rng.random() < p} for _ in range(60)]
    expected = authors_weights(participation, len(probabilities), cutoff=7)
    strategy = FedAU(num_clients=len(probabilities), cutoff=7)
    for rnd, participants in enumerate(participation, start=1):
        got = {n: strategy.weight(str(n), rnd) for n in participants}
        assert got == pytest.approx(expected[rnd - 1])
        strategy.record(rnd, {str(n) for n in participants})
    rare = strategy.weight("3", len(participation) + 1)
    assert rare > strategy.weight("0", len(participation) + 1)  # the rare client counts for more


def hand_step(state, updates, weights, num_clients, lr):
    current = trained_tensors(state.adapter, state.extras, trains_A=True)
    out = {}
    for key, x in current.items():
        sent = [trained_tensors(u.factors, u.extras, True)[key] for u in updates]
        step = sum(w * (t - x) for t, w in zip(sent, weights, strict=True))
        out[key] = x + lr / num_clients * step
    return out


def test_the_step_is_x_plus_lr_over_n_times_the_weighted_deltas_over_rounds_and_a_resume():
    participation = [{"0", "1"}, {"1"}, {"0", "2"}, {"1", "2"}]
    straight = FedAU(num_clients=4, cutoff=3, server_lr=0.7)
    state = sent_state()
    for rnd, participants in enumerate(participation, start=1):
        if rnd == 3:  # the checkpoint a restarted server continues from
            resumed = FedAU(num_clients=4, cutoff=3, server_lr=0.7)
            resumed.load_state_dict(straight.state_dict())
            straight = resumed
        updates = [trained(state, int(c)) for c in sorted(participants)]
        weights = [straight.weight(u.client_id, rnd) for u in updates]
        expected = hand_step(state, updates, weights, 4, 0.7)
        state = straight.aggregate(rnd, state, updates)
        got = trained_tensors(state.adapter, state.extras, trains_A=True)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    assert straight.weight("1", 5) == pytest.approx((1 + 1 + 2) / 3)  # intervals 1, 1, 2


def test_one_client_of_one_returns_its_model():
    state = sent_state()
    update = trained(state, 0)
    out = FedAU(num_clients=1).aggregate(1, state, [update])
    for key, value in trained_tensors(update.factors, update.extras, True).items():
        torch.testing.assert_close(trained_tensors(out.adapter, out.extras, True)[key], value)


def test_known_probabilities_weigh_by_their_inverse():
    strategy = FedAU(num_clients=3, probabilities={"0": 0.25})
    assert strategy.weight("0", 1) == 4.0 and strategy.weight("1", 1) == 1.0


def test_refusals():
    with pytest.raises(StrategyError, match="num_clients"):
        FedAU(num_clients=0)
    with pytest.raises(StrategyError, match="probabilities"):
        FedAU(num_clients=2, probabilities={"0": 0.0})
    state = sent_state()
    with pytest.raises(ValueError, match="two updates from client '0'"):
        FedAU(num_clients=2).aggregate(1, state, [trained(state, 0), trained(state, 0)])
    assert create_strategy("fedau", context={"num_clients": 7}).num_clients == 7


def test_simulated_availability_is_per_client_and_seeded(tmp_path):
    config = load_config("simulations/quickstart.toml", ["faults.availability_beta=[2, 5]"])
    faults = config.faults
    probabilities = [availability(faults, 0, k) for k in range(200)]
    assert len(set(probabilities)) == 200 and 0.2 < sum(probabilities) / 200 < 0.37  # Beta(2, 5): 0.286
    assert probabilities == [availability(faults, 0, k) for k in range(200)]
    k = min(range(200), key=lambda k: abs(probabilities[k] - 0.5))
    sits_out = sum(unavailable(faults, 0, rnd, k) for rnd in range(1, 2001)) / 2000
    assert sits_out == pytest.approx(1 - probabilities[k], abs=0.04)
    with pytest.raises(ConfigError, match="availability_beta"):
        load_config("simulations/quickstart.toml", ["faults.availability_beta=[0, 5]"])


def test_fedau_federates_clients_that_sit_out_rounds(tiny_bert_dir, tmp_path):
    """Every client is sampled each round; those simulated unavailable are dropped with the
    reason, the others are aggregated by fedau, which learns from their history."""
    options = {
        "data.num_clients": 4,
        "run.rounds": 4,
        "server.fraction": 1.0,
        "server.min_replies": 1,
        "strategy.name": "fedau",
        "faults.availability_beta": "[2, 2]",
    }
    config = small_config(tiny_bert_dir, **options)
    run = FederatedRun(config, tmp_path)
    run.run(LocalGrid(4, app=simulation_app(config, tmp_path / "clients")))
    rows = metrics_rows(tmp_path)[1:]
    absent, replied = 0, set()
    for rnd, row in enumerate(rows, start=1):
        expected = {f"partition-{k}" for k in range(4) if unavailable(config.faults, config.run.seed, rnd, k)}
        dropped = {d["client"] for d in row["dropped"] if "simulated unavailability" in d["reason"]}
        assert dropped == expected
        assert {r["client"] for r in row["replies"]} == {f"partition-{k}" for k in range(4)} - expected
        absent += len(expected)
        replied |= {r["client"] for r in row["replies"]}
    assert absent > 0  # this seed makes some client sit out
    assert set(run.strategy.clients) == replied  # one history per client heard from


def test_a_round_every_client_sits_out_passes_without_an_update(tiny_bert_dir, tmp_path):
    """With ``server.min_replies = 0`` a round whose sampled clients all sit out keeps the global
    state (its evaluation repeats the round before's), and fedau counts it as a round each known
    client missed: every client's closed intervals and current absence add up to all the rounds."""
    rounds, clients = 4, 2
    options = {
        "data.num_clients": clients,
        "run.rounds": rounds,
        "server.min_clients": clients,
        "server.min_replies": 0,
        "strategy.name": "fedau",
        "faults.availability_beta": "[1, 1]",
    }
    config = small_config(tiny_bert_dir, **options)

    def empty_rounds(seed: int) -> list[int]:
        return [
            rnd
            for rnd in range(1, rounds + 1)
            if all(unavailable(config.faults, seed, rnd, k) for k in range(clients))
        ]

    # a seed with an empty round after the first (so there is a state to keep), and a round with replies
    seed = next(s for s in range(100) if 1 not in empty_rounds(s) and 0 < len(empty_rounds(s)) < rounds - 1)
    config = small_config(tiny_bert_dir, **options, **{"run.seed": seed})
    run = FederatedRun(config, tmp_path)
    run.run(LocalGrid(clients, app=simulation_app(config, tmp_path / "clients")))
    rows = metrics_rows(tmp_path)
    for rnd in empty_rounds(seed):
        assert rows[rnd]["clients_aggregated"] == 0
        assert rows[rnd]["eval_loss"] == rows[rnd - 1]["eval_loss"]
    for history in run.strategy.clients.values():
        assert history.mean_interval * history.intervals + history.absent == pytest.approx(rounds)
