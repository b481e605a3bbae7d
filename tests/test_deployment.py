"""End to end on 127.0.0.1: `fedpeft server` and `fedpeft client` processes with TLS and client
authentication (Flower's SuperLink and SuperNodes), each client with its own data file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedpeft.certs import make_certs
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
    assert "the server refused client mallory: its key is not registered" in fed.output("mallory")

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
