"""``lora.init``: one shared seeded adapter for every client, or one drawn per client (the setting
VCMA exists for), through the real server loop and clients (in-process grid, tiny BERT)."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.config import ConfigError, load_config
from fedpeft.testing import LocalGrid
from server.loop import FederatedRun
from strategies import StrategyError
from tests.factories import small_config


def first_round_A(run: FederatedRun) -> list[torch.Tensor]:
    """One module's A from each client's round-1 reply (vcma takes the whole list at once)."""
    seen: list[torch.Tensor] = []
    aggregate = run.strategy.aggregate

    def recording(rnd, state, updates):
        if rnd == 1:
            seen.extend(next(iter(u.factors.values())).A.clone() for u in updates)
        return aggregate(rnd, state, updates)

    run.strategy.aggregate = recording
    return seen


@pytest.mark.parametrize("init", ["shared", "per_client"])
def test_per_client_init_gives_each_client_its_own_A_and_shared_gives_one(tiny_bert_dir, tmp_path, init):
    config = small_config(
        tiny_bert_dir,
        **{"lora.init": init, "strategy.name": "vcma", "server.evaluate": "false", "run.rounds": 1},
    )
    run = FederatedRun(config, tmp_path)
    seen = first_round_A(run)
    run.run(LocalGrid(3))
    assert len(seen) == 3
    # two local steps move A a little: shared starts stay close, independent draws do not
    spread = max(float((a - seen[0]).abs().max()) for a in seen)
    assert (spread < 0.05) if init == "shared" else (spread > 0.2)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["variance_ratio"] == pytest.approx(1.0, abs=0.15)  # what the server keeps, corrected
    if init == "per_client":
        assert row["variance_ratio_averaged"] < 0.6  # three independent A's average to about a third
    else:
        assert row["variance_ratio_averaged"] > 0.9


def test_per_client_init_is_refused_under_secure_aggregation():
    with pytest.raises(ConfigError, match="lora.init = 'shared'"):
        load_config(None, ["lora.init=per_client", "server.secure_aggregation=true", "server.min_clients=3"])


def test_an_unknown_init_is_refused():
    with pytest.raises(ConfigError, match="lora.init must be one of shared, per_client"):
        load_config(None, ["lora.init=random"])


def test_ffa_under_per_client_init_fails_in_one_line_naming_the_setting(tiny_bert_dir, tmp_path):
    config = small_config(
        tiny_bert_dir, **{"lora.init": "per_client", "strategy.name": "ffa", "server.evaluate": "false"}
    )
    with pytest.raises(StrategyError, match="keeps A frozen.*lora.init = 'per_client'"):
        FederatedRun(config, tmp_path)


def test_the_server_logs_the_variance_ratio_of_a_plain_average_under_per_client_init(tiny_bert_dir, tmp_path):
    config = small_config(
        tiny_bert_dir, **{"lora.init": "per_client", "server.evaluate": "false", "run.rounds": 2}
    )
    FederatedRun(config, tmp_path).run(LocalGrid(3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["variance_ratio"] < 0.6  # fedavg of three independent A's: about a third
    assert rows[1]["variance_ratio"] > 0.9  # round 2 starts everyone from the same averaged A
