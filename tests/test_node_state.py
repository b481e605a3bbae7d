"""What a client carries between rounds survives a restart of its process and a resumed server:
kept in a file per client and run (client/node_state.py) as well as in Flower's Context.state."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from client import node_state, personal
from client.app import simulation_app
from client.runtime import EXAMPLE_DP_STEPS
from fedpeft.testing import LocalGrid
from fedpeft.wire import pack_tensors, unpack_tensors
from server.loop import RUN_KEY_FILE, FederatedRun
from tests.factories import small_config


def test_only_the_kept_records_are_saved_and_they_load_back(tmp_path):
    state = RecordDict(
        {
            personal.PERSONAL_B: pack_tensors({"m": torch.arange(6.0).view(2, 3)}),
            EXAMPLE_DP_STEPS: ConfigRecord({"steps": 40}),
            "secagg": ConfigRecord({"secret": 7}),  # a round's secret: never written
        }
    )
    path = node_state.state_file(tmp_path, "client-a", "0123abcd")
    node_state.save(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["0123abcd.records"]  # no staging file left

    restored = RecordDict()
    node_state.load(path, restored)
    assert set(restored) == {personal.PERSONAL_B, EXAMPLE_DP_STEPS}
    assert torch.equal(unpack_tensors(restored[personal.PERSONAL_B])["m"], torch.arange(6.0).view(2, 3))
    assert restored[EXAMPLE_DP_STEPS]["steps"] == 40


@pytest.mark.parametrize("key", ["../../etc/cron.d/x", "/abs", "ABC", "", "a" * 65])
def test_a_run_key_that_is_not_a_plain_hex_name_is_refused(tmp_path, key):
    with pytest.raises(node_state.BadRunKey, match="lowercase hex"):
        node_state.state_file(tmp_path, "client-a", key)


def test_nothing_to_keep_writes_nothing(tmp_path):
    path = node_state.state_file(tmp_path, "client-a", "0123abcd")
    node_state.save(path, RecordDict({"secagg": ConfigRecord({"secret": 7})}))
    assert not path.parent.exists()


def client_rows(run_dir, rnd: int, metric: str) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["round"] == rnd)
    return {reply["client"]: reply[metric] for reply in row["replies"]}


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "lost"])
def test_a_resumed_fedsa_run_with_restarted_clients_ends_where_a_straight_run_does(
    tiny_bert_dir, tmp_path, kept
):
    """Each client's personal B and head: after the server and every client restart (fresh
    contexts), round 3 starts from the B each client trained in round 2, as in a straight run."""
    settings = {"strategy.name": "fedsa", "data.client_eval_fraction": 0.25}
    config = small_config(tiny_bert_dir, **settings, **{"run.rounds": 3})
    FederatedRun(config, tmp_path / "straight").run(LocalGrid(3, app=simulation_app(config, tmp_path / "s")))

    states = tmp_path / "clients"
    short = small_config(tiny_bert_dir, **settings, **{"run.rounds": 2})
    FederatedRun(short, tmp_path / "resumed").run(LocalGrid(3, app=simulation_app(short, states)))
    key = (tmp_path / "resumed" / RUN_KEY_FILE).read_text()
    assert sorted(p.name for p in states.iterdir()) == ["partition-0", "partition-1", "partition-2"]
    if not kept:
        for path in states.glob(f"*/{key}.records"):
            path.unlink()
    resumed = FederatedRun(config, tmp_path / "resumed", resume=True)
    assert resumed.run_key == key
    resumed.run(LocalGrid(3, app=simulation_app(config, states)))  # fresh contexts: restarted clients

    straight = client_rows(tmp_path / "straight", 3, "train_loss")  # trained from each client's own B
    assert (client_rows(tmp_path / "resumed", 3, "train_loss") == straight) is kept


def test_a_restarted_client_under_example_dp_counts_the_steps_it_took_before(tiny_bert_dir, tmp_path):
    """Its epsilon goes on from where it was, not from zero, when its process restarts mid-run."""
    private = {"example_dp.enabled": "true", "example_dp.noise_multiplier": 1.0, "server.evaluate": "false"}
    config = small_config(tiny_bert_dir, **private)
    short = small_config(tiny_bert_dir, **private, **{"run.rounds": 1})
    states = tmp_path / "clients"
    FederatedRun(short, tmp_path / "resumed").run(LocalGrid(3, app=simulation_app(short, states)))
    resumed = FederatedRun(config, tmp_path / "resumed", resume=True)
    resumed.run(LocalGrid(3, app=simulation_app(config, states)))
    FederatedRun(config, tmp_path / "straight").run(LocalGrid(3, app=simulation_app(config, tmp_path / "s")))
    rows = [
        [json.loads(line)["example_epsilon"] for line in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("straight", "resumed")
    ]
    assert rows[0] == rows[1] and rows[0][0] < rows[0][1]


def test_a_new_run_never_reads_another_runs_state(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"strategy.name": "fedsa", "run.rounds": 1})
    first = FederatedRun(config, tmp_path / "first")
    second = FederatedRun(config, tmp_path / "second")
    assert first.run_key != second.run_key


def test_a_plain_fedavg_run_keeps_no_files(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir)
    FederatedRun(config, tmp_path / "run").run(LocalGrid(3, app=simulation_app(config, tmp_path / "clients")))
    assert not (tmp_path / "clients").exists()
