"""The Flower ServerApp.

``app`` is what ``flwr run .`` (and ``fedpeft server``) loads. Its run-config keys:

- ``config``: the fedpeft TOML file; ``overrides``: ``;``-separated ``section.key=value``;
- ``run-dir``: where to write the run (empty: a new folder in ``run.output_dir``);
  ``resume``: continue the run in ``run-dir`` from its checkpoint;
- ``deployment``: the clients are real SuperNodes with their own data files, so the server
  reads no training data (``data.labels`` names the labels, ``data.test_source`` is its own
  held-out file).

``make_server_app`` builds the same app around an already loaded config, for ``fedpeft simulate``.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import RunConfig, load_config
from fedpeft.tasks import get_task
from server.loop import FederatedRun


def new_run_dir(config: RunConfig) -> Path:
    """``<output_dir>/<name>-<timestamp>``, unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.output_dir) / f"{config.run.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def make_server_app(federated_run: FederatedRun) -> ServerApp:
    """A ServerApp around a run that is already set up (so set-up errors surface before Flower
    starts any client)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federated_run.run(grid)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    overrides = [o for o in str(settings.get("overrides", "")).split(";") if o.strip()]
    config = load_config(str(settings["config"]), overrides)
    run_dir = Path(str(settings.get("run-dir", ""))) if settings.get("run-dir") else new_run_dir(config)
    deployed = bool(settings.get("deployment", False))
    splits = get_task(config.model.task).server_splits(config.data) if deployed else None
    FederatedRun(config, run_dir, resume=bool(settings.get("resume", False)), splits=splits).run(grid)
