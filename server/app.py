"""The Flower ServerApp.

``app`` is what ``flwr run .`` loads: it reads the fedpeft TOML named by the run config key
``config`` (plus optional ``overrides``, ``;``-separated ``section.key=value``).
``make_server_app`` builds the same app around an already loaded config, for ``fedpeft simulate``.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import RunConfig, load_config
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
    overrides = [o for o in str(context.run_config.get("overrides", "")).split(";") if o.strip()]
    config = load_config(str(context.run_config["config"]), overrides)
    FederatedRun(config, new_run_dir(config)).run(grid)
