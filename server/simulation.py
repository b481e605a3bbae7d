"""Run a whole federation on one machine through Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.data import partition
from fedpeft.tasks import get_task
from server.app import make_server_app
from server.loop import FederatedRun


def simulate(config: RunConfig, run_dir: Path, *, resume: bool = False, verbose: bool = False) -> Path:
    """Run ``config.data.num_clients`` virtual clients; returns the run directory. The clients'
    own output (Ray's workers: their logs, Flower's actor warnings) reaches the console only with
    ``verbose``; what the server learns of a failing client is in its drop reason either way."""
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
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": config.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "logging_level": logging.ERROR, "log_to_driver": verbose},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        run_simulation(
            server_app=make_server_app(federated_run),
            client_app=simulation_app(config),
            num_supernodes=config.data.num_clients,
            backend_config=backend_config,
        )
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without finishing the run; see the log above and {run_dir}")
    return run_dir
