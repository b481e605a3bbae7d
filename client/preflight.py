"""What ``fedpeft client`` checks before it joins: that this client's data file can be trained on.

A file the run cannot use would otherwise be found only when a round starts, each round again.
Without the run's configuration the check is the file itself (a known format, readable, rows in
it); with it (``--config``, the server's TOML) the file is read, labelled and tokenized exactly as
the ClientApp will, against the model and labels the server will ask for.
"""

from __future__ import annotations

from pathlib import Path

from fedpeft.config import DataSection, load_config
from fedpeft.data import read_file
from fedpeft.errors import UserError
from fedpeft.models import load_tokenizer
from fedpeft.tasks import get_task


class DataCheckError(UserError):
    """This client's data cannot be used; the message names the problem and the fix."""


def check_data(data: Path, config: Path | None) -> str:
    """Read ``data`` as the run will (as far as ``config`` says how); returns a one-line summary,
    raises ``DataCheckError`` with the problem otherwise."""
    try:
        if config is None:
            rows, how = len(read_file(data, DataSection())), "(pass --config to check them against the run)"
        else:
            rows, how = _check_against(data, config)
    except UserError as exc:
        raise DataCheckError(f"{data}: {exc}") from None
    if rows == 0:
        raise DataCheckError(f"{data} holds no rows to train on; pass this client's own training file")
    return f"{rows} rows in {data.name} {how}"


def _check_against(data: Path, config_path: Path) -> tuple[int, str]:
    """The rows ``data`` yields read, labelled and tokenized under the run's configuration."""
    config = load_config(config_path)
    task = get_task(config.model.task)
    rows = task.client_file(str(data), config.data)
    encoded = task.encode_rows(rows, load_tokenizer(config.model.name), config.model.max_length)
    labels = f", labels {', '.join(config.data.labels)}" if task.labelled else ""
    return len(encoded), f"read and tokenized for {config.model.name}{labels}"
