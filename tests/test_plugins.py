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
from tests.conftest import simulate_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "simulations/custom_strategy/median.py:CoordinateMedian"


def test_file_strategy_computes_a_coordinate_median(monkeypatch):
    monkeypatch.chdir(ROOT)
    median = create_strategy(EXAMPLE)
    values = [1.0, 2.0, 100.0]
    updates = [
        ClientUpdate(
            {"m": AdapterFactors(torch.full((2, 3), v), torch.full((4, 2), -v), 1.0)}, {}, 1, 1, 2, 2.0
        )
        for v in values
    ]
    out = median.aggregate(1, GlobalState(), updates)
    assert torch.equal(out.adapter["m"].A, torch.full((2, 3), 2.0))
    assert torch.equal(out.adapter["m"].B, torch.full((4, 2), -2.0))


def test_missing_file_is_a_clear_error(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(StrategyError, match="cannot load strategy 'nope.py:X'"):
        create_strategy("nope.py:X")


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
    assert summary["strategy"] == "coordinate-median" and summary["rounds"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
