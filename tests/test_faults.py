"""Simulated client faults ([faults]): reproducible draws, each kind dropped with its reason,
poisoned clients' amplified updates, and the refusal in deployment."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from client.app import simulation_app, train
from client.faults import simulated_fault, simulated_faults
from fedpeft.config import ConfigError, FaultsSection, load_config
from fedpeft.testing import LocalGrid
from fedpeft.wire import decode_state, decode_update
from server.deployment import ServerOptions, prepare
from server.loop import FederatedRun
from tests.deployment import write_rows
from tests.factories import metrics_rows, simulate_cli, small_config

REASONS = {"crash": "simulated crash", "garbage": "malformed reply", "timeout": "no reply within"}


def expected_faults(config, rnd):
    """partition id -> the fault it simulates in round ``rnd``."""
    return {
        p: kind
        for p in range(config.data.num_clients)
        if (kind := simulated_fault(config.faults, config.run.seed, rnd, p)) is not None
    }


def assert_drops_match_the_draws(config, rows) -> Counter:
    """Every drawn fault is a drop with its kind's reason; every other client is aggregated."""
    seen: Counter = Counter()
    for row in rows[1:]:
        faults = expected_faults(config, row["round"])
        dropped = {d["client"]: d["reason"] for d in row["dropped"]}
        assert set(dropped) == {f"partition-{p}" for p in faults}, row["round"]
        for p, kind in faults.items():
            reason = dropped[f"partition-{p}"]
            assert REASONS[kind] in reason
            assert "\n" not in reason and len(reason) < 400, reason  # no traceback in the metrics
            seen[kind] += 1
        assert row["clients_aggregated"] == config.data.num_clients - len(faults)
    return seen


def test_simulated_faults_are_reproducible_and_follow_the_rate():
    faults = FaultsSection(rate=0.1)
    draws = [simulated_fault(faults, 7, rnd, p) for rnd in range(1, 201) for p in range(20)]
    assert draws == [simulated_fault(faults, 7, rnd, p) for rnd in range(1, 201) for p in range(20)]
    counts = Counter(draws)
    assert 0.08 < 1 - counts[None] / len(draws) < 0.12
    assert {k for k in counts if k} == {"crash", "timeout", "garbage"}
    assert draws != [simulated_fault(faults, 8, rnd, p) for rnd in range(1, 201) for p in range(20)]
    assert not any(simulated_fault(FaultsSection(), 7, 1, p) for p in range(100))
    only = FaultsSection(rate=1.0, kinds=["garbage"])
    assert {simulated_fault(only, 7, 1, p) for p in range(100)} == {"garbage"}


def test_crash_and_garbage_clients_are_dropped_with_their_reasons(tiny_bert_dir, tmp_path):
    config = small_config(
        tiny_bert_dir,
        **{
            "data.num_clients": 6,
            "run.rounds": 3,
            "server.min_replies": 1,
            "faults.rate": 0.5,
            "faults.kinds": '["crash", "garbage"]',
        },
    )
    FederatedRun(config, tmp_path).run(LocalGrid(6, app=simulation_app(config, tmp_path / "clients")))
    seen = assert_drops_match_the_draws(config, metrics_rows(tmp_path))
    assert seen["crash"] >= 1 and seen["garbage"] >= 1  # this seed draws both kinds


def test_a_poisoned_client_sends_received_plus_scale_times_its_delta(tiny_bert_dir, tmp_path):
    """Partition 0 trains twice on the same round message, honest and poisoned (training is
    seeded by run seed, round and partition, so both train identically)."""
    config = small_config(tiny_bert_dir, **{"run.rounds": 1})
    poisoning = simulated_faults(FaultsSection(poisoned=[0], poison_scale=10.0), config.run.seed, 60.0)
    replies = []

    def honest_and_poisoned(msg, context):
        honest = train(msg, context)
        poisoned = poisoning(msg, context, train)
        received = decode_state(msg.content)
        replies.append((received, decode_update(honest.content), decode_update(poisoned.content)))
        return honest

    FederatedRun(config, tmp_path).run(LocalGrid(3, {0: honest_and_poisoned}))
    received, honest, poisoned = replies[0]
    for name, f in honest.factors.items():
        start = received.adapter[name]
        for part in ("A", "B"):
            expected = getattr(start, part) + 10.0 * (getattr(f, part) - getattr(start, part))
            torch.testing.assert_close(getattr(poisoned.factors[name], part), expected)
    for name, t in honest.extras.items():
        start = received.extras[name]
        torch.testing.assert_close(poisoned.extras[name], start + 10.0 * (t - start))
    assert any(not torch.equal(f.B, received.adapter[n].B) for n, f in honest.factors.items())


def test_a_simulation_drops_each_fault_kind_with_its_reason_and_completes(tiny_bert_dir, tmp_path):
    """Through Flower's simulation engine (Ray): crashes become error replies, garbage is
    malformed, and a late client misses the deadline while the others still reply in time."""
    overrides = {
        "model.name": f"'{tiny_bert_dir}'",
        "run.seed": 10,  # draws a crash, a timeout and a garbage reply among 5 clients in round 1
        "run.rounds": 1,
        "data.num_clients": 5,
        "data.demo_train_size": 200,
        "data.min_partition_size": 5,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "lora.rank": 2,
        "server.fraction": 1.0,
        "server.min_clients": 5,
        "server.min_replies": 1,
        "server.round_timeout": 8,
        "server.evaluate": "false",
        "faults.rate": 0.6,
    }
    items = [f"{k}={v}" for k, v in overrides.items()]
    simulate_cli("simulations/quickstart.toml", tmp_path / "run", items)
    config = load_config(None, items)
    rows = [{"round": 0}, *metrics_rows(tmp_path / "run")]
    assert [r["round"] for r in rows] == [0, 1]
    assert assert_drops_match_the_draws(config, rows).keys() == {"crash", "garbage", "timeout"}
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("faults.rate=1.5", "faults.rate must be in"),
        ("faults.kinds=['crash', 'hang']", "faults.kinds must be"),
        ("faults.kinds=[]", "faults.kinds must be"),
        ("faults.poisoned=[8]", "faults.poisoned must list partition ids"),
    ],
)
def test_faults_config_mistakes_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["faults.rate=0.1", "faults.poisoned=[1]"])
def test_fedpeft_server_refuses_faults(tmp_path, override):
    test_file = write_rows(tmp_path / "test.jsonl", ["refund please", "where is it"], [0, 1])
    config = tmp_path / "deploy.toml"
    config.write_text(f'[data]\nlabels = ["billing", "delivery"]\ntest_source = "{test_file}"\n')
    prepare(ServerOptions(config, insecure=True, run_dir=tmp_path / "ok"))
    with pytest.raises(ConfigError, match="simulates misbehaving clients in `fedpeft simulate` only"):
        prepare(ServerOptions(config, (override,), insecure=True, run_dir=tmp_path / "refused"))


def test_poisoning_is_refused_under_secure_aggregation_where_a_reply_cannot_be_edited():
    with pytest.raises(ConfigError, match="faults.poisoned edits plain replies"):
        load_config(None, ["faults.poisoned=[1]", "server.secure_aggregation=true", "server.min_clients=3"])
