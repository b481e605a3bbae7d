"""Checkpoints: exact round trip, and never a half-written file in place."""

from __future__ import annotations

import random

import torch

from server.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from tests import factories


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = factories.state()
    state.strategy_state = {"momentum": torch.arange(6.0).reshape(2, 3), "steps": 4, "name": "x"}
    rng = random.Random(5)
    rng.random()
    save_checkpoint(tmp_path, state, rng.getstate())
    back = load_checkpoint(tmp_path)
    assert back.state.round == state.round
    for name, f in state.adapter.items():
        assert torch.equal(back.state.adapter[name].A, f.A) and back.state.adapter[name].scale == f.scale
    for name, d in state.merged.items():
        assert torch.equal(back.state.merged[name].U, d.U) and torch.equal(back.state.merged[name].V, d.V)
    assert torch.equal(back.state.extras["head.bias"], state.extras["head.bias"])
    assert torch.equal(back.state.strategy_state["momentum"], state.strategy_state["momentum"])
    assert back.state.strategy_state["steps"] == 4 and back.state.strategy_state["name"] == "x"
    restored = random.Random()
    restored.setstate(back.rng_state)
    assert restored.random() == rng.random()


def test_fresh_state_checkpoint_keeps_adapter_absent(tmp_path):
    save_checkpoint(tmp_path, factories.GlobalState(round=0), random.Random(0).getstate())
    assert load_checkpoint(tmp_path).state.adapter is None


def test_checkpoint_replaces_atomically(tmp_path):
    save_checkpoint(tmp_path, factories.state(0), random.Random(0).getstate())
    save_checkpoint(tmp_path, factories.state(1), random.Random(0).getstate())
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]
    back = load_checkpoint(tmp_path)
    assert torch.equal(back.state.extras["head.weight"], factories.state(1).extras["head.weight"])
