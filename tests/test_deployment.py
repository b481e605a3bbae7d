"""End to end on 127.0.0.1: `fedpeft server` and `fedpeft client` processes with TLS and client
authentication (Flower's SuperLink and SuperNodes), each client with its own data file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.certs import key_id_of_file, make_certs
from tests.deployment import CLIENT_ROWS, Federation, metrics_rows, wait_for

RUN_SECONDS = 600


@pytest.fixture
def federation(tmp_path: Path, tiny_bert_dir: Path):
    fed = Federation(tmp_path, tiny_bert_dir)
    yield fed
    fed.stop_all()


def finished(fed: Federation, run_dir: Path, server: str = "server") -> dict:
    process = fed.processes[server]
    wait_for(lambda: process.poll() is not None, RUN_SECONDS, "the server to finish")
    assert process.returncode == 0, fed.output(server)[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_tls_authenticated_run_with_misbehaving_and_refused_clients(federation: Federation, tmp_path: Path):
    fed = federation
    # Two extra registered clients that misbehave on purpose, reusing alice's data file.
    make_certs(fed.certs.root, ["127.0.0.1"], ["nan-client", "shape-client"])
    fed.data["nan-client"] = fed.data["shape-client"] = fed.data["alice"]
    intruder = make_certs(tmp_path / "intruder-certs", ["127.0.0.1"], ["mallory"])  # never registered

    run_dir = tmp_path / "run"
    fed.start_server(run_dir, "server.min_clients=5")  # every round waits for all five
    for name in CLIENT_ROWS:
        fed.start_client(name)
    fed.start_client("nan-client", "--inject-fault", "nan")
    fed.start_client("shape-client", "--inject-fault", "wrong-shape")
    wait_for(lambda: "registered client shape-client" in fed.output("server"), 120, "client registration")

    insecure = fed.start(
        "insecure",
        ["client", "--server", f"127.0.0.1:{fed.port}", "--data", str(fed.data["bob"])] + ["--insecure"],
    )
    mallory = fed.start(
        "mallory",
        [
            "client",
            "--server",
            f"127.0.0.1:{fed.port}",
            "--data",
            str(fed.data["bob"]),
            "--key",
            str(intruder.client_key("mallory")),
            "--ca",
            str(fed.certs.ca_cert),
        ],
    )
    summary = finished(fed, run_dir)

    assert insecure.wait(120) == 2
    assert "requires TLS but this client was started with --insecure" in fed.output("insecure")
    assert mallory.wait(180) == 2
    mallory_key = key_id_of_file(intruder.client_key("mallory"))
    assert f"the server refused client mallory (key {mallory_key}): its key is not registered" in fed.output(
        "mallory"
    )
    assert f"refused a client whose key is not registered: {mallory_key}" in fed.output("server")

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        counts = {r["client"]: r["num_examples"] for r in row["replies"]}
        assert counts == CLIENT_ROWS  # each client trained on exactly its own file
        reasons = {d["client"]: d["reason"] for d in row["dropped"]}
        assert set(reasons) == {"nan-client", "shape-client"}
        assert "NaN or Inf" in reasons["nan-client"]
        assert "shapes" in reasons["shape-client"] or "differ" in reasons["shape-client"]
        assert all(d["node"].isdigit() for d in row["dropped"])
    log = fed.output("server")
    assert "dropped nan-client (node" in log and "a tensor holds NaN or Inf" in log

    assert summary["rounds"] == 2 and summary["clients_dropped"] == 4
    adapter = Path(summary["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    assert config["peft_type"] == "LORA" and any("lora_A" in k for k in weights)
    assert all(bool(t.isfinite().all()) for t in weights.values())


def start_clients(fed: Federation) -> None:
    for name in CLIENT_ROWS:
        fed.start_client(name)


@pytest.mark.slow
def test_a_client_killed_in_round_2_is_dropped_and_the_run_finishes(federation: Federation, tmp_path: Path):
    fed = federation
    run_dir = tmp_path / "run"
    fed.start_server(run_dir, "run.rounds=3", "server.min_clients=2", "server.round_timeout=45")
    start_clients(fed)
    wait_for(lambda: "round 1/3  clients 3/3" in fed.output("server"), 300, "round 1 with all three clients")
    time.sleep(3)  # round 2's messages are out: carol is loading or training
    fed.kill("carol")
    summary = finished(fed, run_dir)

    assert summary["rounds"] == 3
    round_2 = metrics_rows(run_dir)[2]
    dropped = {d["client"]: d for d in round_2["dropped"]}
    assert set(dropped) == {"carol"} and dropped["carol"]["node"].isdigit()
    assert {r["client"] for r in round_2["replies"]} == {"alice", "bob"}
    assert f"round 2: dropped carol (node {dropped['carol']['node']})" in fed.output("server")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedsa"])
def test_a_killed_and_resumed_server_ends_where_a_straight_run_does(
    federation: Federation, tmp_path: Path, strategy: str
):
    """Under fedsa the global A depends on each client's personal B, which the clients must carry
    across the server's restart (a new Flower run: client/node_state.py)."""
    fed = federation
    start_clients(fed)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fed.start_server(straight, "run.rounds=4", f"strategy.name={strategy}", name="straight")
    finished(fed, straight, "straight")

    fed.start_server(resumed, "run.rounds=4", f"strategy.name={strategy}", name="first")
    # The round line is printed after the round's checkpoint is written.
    wait_for(lambda: "round 2/4  clients" in fed.output("first"), 400, "round 2 of the interrupted run")
    fed.kill("first")
    assert not (resumed / "summary.json").exists()
    fed.start_server(resumed, "run.rounds=4", f"strategy.name={strategy}", resume=True, name="second")
    summary = finished(fed, resumed, "second")

    assert f"resuming {resumed} after round 2" in fed.output("second")
    assert summary["rounds"] == 4
    assert [r["round"] for r in metrics_rows(resumed)] == [0, 1, 2, 3, 4]
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    if strategy == "fedavg":
        trained = [t for key, t in expected.items() if "lora_B" in key]
        assert trained and all(float(t.abs().max()) > 1e-3 for t in trained)  # B starts at zero: it learned
    else:  # each client's B stayed home, in its state file for the run
        key = (resumed / "run-key").read_text()
        assert all((fed.state_dir(name) / name / f"{key}.records").is_file() for name in CLIENT_ROWS)
