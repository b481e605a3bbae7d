"""Run a whole federation on one machine through Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.data import partition
from fedpeft.errors import UserError
from fedpeft.tasks import get_task
from server.app import make_server_app
from server.loop import FederatedRun

CLIENT_STATE_DIR = "clients"  # in the run directory: what the simulated clients keep between rounds


def simulate(config: RunConfig, run_dir: Path, *, resume: bool = False, verbose: bool = False) -> Path:
    """Run ``config.data.num_clients`` virtual clients; returns the run directory. The clients'
    own output (Ray's workers: their logs, Flower's actor warnings) reaches the console only with
    ``verbose``; what the server learns of a failing client is in its drop reason either way."""
    check_gpus(config)
    splits = get_task(config.model.task).splits(config.data, config.run.seed)
    # Partitioning errors (too few rows for min_partition_size, an empty share) surface here, not
    # inside Ray actors; IID shares shrink towards the last partition.
    for partition_id in sorted({0, config.data.num_clients - 1}):
        partition(splits.train, config.data, partition_id, config.run.seed)
    federated_run = FederatedRun(config, run_dir, resume=resume, splits=splits)
    from flwr.simulation import run_simulation

    from client.app import simulation_app

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray workers inherit the environment: keep third-party deprecation chatter out of the log.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    backend_config = ray_backend_config(config, verbose)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        run_simulation(
            server_app=make_server_app(federated_run),
            client_app=simulation_app(config, run_dir / CLIENT_STATE_DIR),
            num_supernodes=config.data.num_clients,
            backend_config=backend_config,
        )
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without finishing the run; see the log above and {run_dir}")
    return run_dir


def ray_backend_config(config: RunConfig, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings: each client's CPUs and (fractional) GPUs, and either a private
    Ray instance sized to this machine or the running cluster at ``simulation.ray_address``."""
    sim = config.simulation
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if sim.ray_address is None:  # "local": never the cluster a `ray start` on this machine left
        init_args |= {"address": "local", "num_cpus": os.cpu_count() or 1}
    else:  # a running cluster brings its own resources
        init_args["address"] = sim.ray_address
    return {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client},
        "init_args": init_args,
    }


def check_gpus(config: RunConfig) -> None:
    """A ``UserError`` for GPU clients on a private Ray instance of a machine without CUDA (Ray would
    wait forever for a GPU that never comes)."""
    import torch

    gpus = config.simulation.gpus_per_client
    if gpus > 0 and config.simulation.ray_address is None and not torch.cuda.is_available():
        raise UserError(
            f"simulation.gpus_per_client = {gpus} but this machine has no CUDA GPU; set it to 0, or "
            "join a cluster that has GPUs with simulation.ray_address"
        )
