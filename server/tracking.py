"""Experiment tracking sinks (``[tracking]``): each round's metrics, the configuration and the final
adapter, sent to TensorBoard and/or MLflow beside the run directory's own ``metrics.jsonl``.

Both libraries are optional (``pip install 'fedpeft[tracking]'``); a sink asked for without its
library is a one-line error before the first round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from fedpeft.config import RunConfig
from fedpeft.errors import UserError

MLFLOW_RUN_FILE = "mlflow-run-id"  # a resumed run logs into the same MLflow run


class TrackingError(UserError):
    """A tracking sink that cannot be used; the message says what to install or set."""


class Tracker(Protocol):
    def round(self, row: dict[str, Any]) -> None:
        """One row of ``metrics.jsonl``, as it is written."""

    def finish(self, summary: dict[str, Any], adapter_dir: Path) -> None:
        """The run's summary and its exported adapter; the sink is closed after."""


def open_trackers(config: RunConfig, run_dir: Path) -> list[Tracker]:
    """The sinks ``config.tracking`` asks for."""
    trackers: list[Tracker] = []
    if config.tracking.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    if config.tracking.mlflow_uri:
        trackers.append(MLflowTracker(config, run_dir))
    return trackers


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a row (not the round number, not per-client lists)."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "round"
    }


class TensorBoardTracker:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError(
                "tracking.tensorboard needs TensorBoard: pip install 'fedpeft[tracking]'"
            ) from None
        self.writer = SummaryWriter(str(log_dir))

    def round(self, row: dict[str, Any]) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, global_step=row["round"])
        self.writer.flush()

    def finish(self, summary: dict[str, Any], adapter_dir: Path) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```")
        self.writer.close()


class MLflowTracker:
    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        try:
            import mlflow
        except ImportError:
            raise TrackingError("tracking.mlflow_uri needs MLflow: pip install 'fedpeft[tracking]'") from None
        self.mlflow = mlflow
        uri = config.tracking.mlflow_uri or ""
        if uri == "local":
            uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        name = config.tracking.mlflow_experiment
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (
                (run_dir / "mlflow-artifacts").resolve().as_uri() if uri.startswith("sqlite") else None
            )
            experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        id_file = run_dir / MLFLOW_RUN_FILE
        resumed = id_file.read_text().strip() if id_file.is_file() else None
        self.run = mlflow.start_run(run_id=resumed, experiment_id=experiment_id, run_name=run_dir.name)
        id_file.write_text(self.run.info.run_id)
        if resumed is None:
            mlflow.log_params(flat_config(config))

    def round(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(numbers(row), step=row["round"])

    def finish(self, summary: dict[str, Any], adapter_dir: Path) -> None:
        self.mlflow.log_metrics({f"summary_{k}": v for k, v in numbers(summary).items()})
        self.mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        self.mlflow.end_run()


def flat_config(config: RunConfig) -> dict[str, str]:
    """``section.key`` -> value as text (MLflow parameters are strings of at most 6,000 characters)."""
    out = {}
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            out[f"{section}.{key}"] = json.dumps(value)[:6000]
    return out
