"""Simulation resources: GPU shares per client, and joining a running Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedpeft.config import load_config
from fedpeft.errors import UserError
from server.simulation import check_gpus, ray_backend_config
from tests.factories import simulate_cli


def test_private_ray_instance_is_local_and_sized_to_this_machine():
    config = load_config(None, ["simulation.cpus_per_client=2", "simulation.gpus_per_client=0.125"])
    backend = ray_backend_config(config, verbose=False)
    assert backend["client_resources"] == {"num_cpus": 2, "num_gpus": 0.125}
    assert backend["init_args"]["address"] == "local"  # never a cluster `ray start` left running
    assert backend["init_args"]["num_cpus"] == os.cpu_count()


def test_a_cluster_address_brings_its_own_resources():
    backend = ray_backend_config(load_config(None, ["simulation.ray_address='10.0.0.1:6379'"]), verbose=False)
    assert backend["init_args"]["address"] == "10.0.0.1:6379"
    assert "num_cpus" not in backend["init_args"]


def test_gpu_clients_without_a_gpu_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="gpus_per_client = 0.5 but this machine has no CUDA GPU"):
        check_gpus(load_config(None, ["simulation.gpus_per_client=0.5"]))
    check_gpus(load_config(None, ["simulation.gpus_per_client=0.5", "simulation.ray_address='auto'"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_simulation_joins_a_running_ray_cluster(tmp_path):
    """`ray start --head` as a user would run it, then `fedpeft simulate` with its address: the run
    finishes on that cluster's workers (ray.init with an address never starts one of its own)."""
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", f"--temp-dir={ray_tmp}",
         "--include-dashboard=false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not Path(ray_tmp, "ray_current_cluster").is_file():
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        overrides = ["run.rounds=1", "train.local_steps=2", "data.num_clients=2", "server.min_clients=2",
                     "server.fraction=1.0", f"simulation.ray_address='127.0.0.1:{port}'"]  # fmt: skip
        simulate_cli("simulations/quickstart.toml", run_dir, overrides)
        assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
