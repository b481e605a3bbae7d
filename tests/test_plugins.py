"""Strategies from user code: a file path, an entry point, and the worked example end to end."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import strategies.registry as registry
from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies import StrategyError, available_strategies, create_strategy
from tests.factories import simulate_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "simulations/custom_strategy/krum.py:Krum"


def test_file_strategy_picks_the_update_closest_to_its_neighbours(monkeypatch):
    monkeypatch.chdir(ROOT)
    krum = create_strategy(EXAMPLE, {"byzantine": 1})
    # with 5 updates and f = 1, each is scored on its 2 nearest: 2.0 scores 0.4^2 + 1^2, the lowest
    values = [1.0, 2.0, 2.4, 3.5, 100.0]
    updates = [
        ClientUpdate(
            {"m": AdapterFactors(torch.full((2, 3), v), torch.full((4, 2), -v), 1.0)}, {}, 1, 1, 2, 2.0
        )
        for v in values
    ]
    out = krum.aggregate(1, GlobalState(), updates)
    assert torch.equal(out.adapter["m"].A, torch.full((2, 3), 2.0))
    assert torch.equal(out.adapter["m"].B, torch.full((4, 2), -2.0))
    with pytest.raises(ValueError, match="needs at least 4 updates per round, got 3"):
        krum.aggregate(1, GlobalState(), updates[:3])


def test_missing_file_is_a_clear_error(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(StrategyError, match="cannot load strategy 'nope.py:X'"):
        create_strategy("nope.py:X")


def test_a_method_with_the_wrong_signature_is_refused_when_the_strategy_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "from strategies import Strategy\n"
        "class Two(Strategy):\n"
        "    def aggregate(self, state, updates):\n"
        "        return state\n"
        "class Typed(Strategy):\n"
        "    def aggregate(self, rnd, state, updates) -> dict:\n"
        "        return {}\n"
        "class Fine(Strategy):\n"
        "    def aggregate(self, rnd, state, updates, extra=1):\n"
        "        return state\n"
    )
    with pytest.raises(
        StrategyError, match=r"aggregate\(self, state, updates\) does not match Strategy.aggregate"
    ):
        create_strategy("mine.py:Two")
    with pytest.raises(StrategyError, match=r"-> dict does not match"):
        create_strategy("mine.py:Typed")
    assert create_strategy("mine.py:Fine").name == "strategy"


def test_a_file_path_without_a_class_name_says_to_add_one():
    with pytest.raises(StrategyError, match=r"is a file: name its class too, e.g. 'my/krum.py:MyStrategy'"):
        create_strategy("my/krum.py")


def test_entry_point_strategies_are_found(monkeypatch):
    point = EntryPoint(name="my-median", value="strategies.fedavg:FedAvg", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        registry, "entry_points", lambda group, name=None: [p for p in [point] if name in (None, p.name)]
    )
    assert "my-median" in available_strategies()
    assert create_strategy("my-median").name == "fedavg"


def test_custom_strategy_example_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    simulate_cli(
        "simulations/custom_strategy/config.toml",
        run_dir,
        ["run.rounds=2", "data.demo_train_size=800", "data.demo_test_size=100", "train.local_steps=4"],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == "krum" and summary["rounds"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_documented_server_momentum_matches_fedavgm_across_a_resume():
    """The worked example of docs/writing-a-strategy.md, against the built-in rule it re-derives,
    over 3 rounds with a save and load of its state after round 2."""
    from tests.factories import sent_state, trained

    mine, builtin = (
        create_strategy("simulations/custom_strategy/momentum.py:ServerMomentum"),
        create_strategy("fedavgm"),
    )
    a = b = sent_state()
    for rnd in (1, 2, 3):
        if rnd == 3:
            restored = type(mine)()
            restored.load_state_dict(mine.state_dict())
            mine = restored
        a = mine.aggregate(rnd, a, [trained(a, rnd * 10 + k) for k in range(3)])
        b = builtin.aggregate(rnd, b, [trained(b, rnd * 10 + k) for k in range(3)])
        for module, f in b.adapter.items():
            torch.testing.assert_close(a.adapter[module].A, f.A)
            torch.testing.assert_close(a.adapter[module].B, f.B)
