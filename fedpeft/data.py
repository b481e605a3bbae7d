"""Datasets: local files, the generated demo data, and partitioning.

For classification a dataset is a ``datasets.Dataset`` with an integer ``label`` column and a
``text`` column; for causal LMs it has a ``messages`` column of chats (see ``instructions``).
``data.source`` may be a glob pattern naming one file per client (``data.partition = "files"``).
"""

from __future__ import annotations

import glob
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedpeft import demo_data
from fedpeft.config import DataSection
from fedpeft.errors import UserError
from fedpeft.instructions import MESSAGES, to_messages

log = logging.getLogger(__name__)

datasets.utils.logging.disable_progress_bar()  # per-client filters would flood the simulation log

DEMO = "demo"
FILE_COLUMN = "source_file"  # which of the source's files a row came from (for partition = "files")
_READERS = {
    ".jsonl": lambda p, cols: pd.read_json(p, lines=True),
    ".json": lambda p, cols: pd.read_json(p),
    ".csv": lambda p, cols: pd.read_csv(p, header=None if cols else "infer", names=cols),
    ".tsv": lambda p, cols: pd.read_csv(p, sep="\t", header=None if cols else "infer", names=cols),
    ".parquet": lambda p, cols: pd.read_parquet(p),
}


class DataError(UserError):
    """A data problem the user can fix; the message says how."""


@dataclass
class Splits:
    """``train`` is ``None`` on a deployed server, which never reads training data."""

    train: Dataset | None
    test: Dataset | None
    label_names: list[str]


def load_splits(spec: DataSection, seed: int) -> Splits:
    """Labelled text: the whole training set, the held-out set (if any) and the label names."""
    if spec.source == DEMO:
        train, test = demo_data.demo_splits(spec.demo_train_size, spec.demo_test_size, seed)
        return Splits(Dataset.from_dict(train), Dataset.from_dict(test), list(demo_data.LABELS))
    train_frame = read_sources(spec.source, lambda p: read_table(p, spec))
    test_frame = read_table(spec.test_source, spec) if spec.test_source else None
    names = spec.labels or sorted({str(v) for v in train_frame["label"]})
    train = _to_dataset(train_frame, names, spec.source)
    test = None
    if test_frame is not None:
        unseen = sorted(set(test_frame["label"]) - set(names))
        if unseen and not spec.labels:
            raise DataError(
                f"{spec.test_source} has labels {unseen[:3]} that the training data ({spec.source}) never "
                "has, and a class without training rows cannot be learned: remove those rows from the "
                "held-out file or add training rows for them"
            )
        test = _to_dataset(test_frame, names, spec.test_source)
    return Splits(train, test, names)


def load_server_splits(spec: DataSection) -> Splits:
    """What a deployed classification server needs: its own held-out file (``data.test_source``,
    optional) and the label names (``data.labels``, which every client's file uses). Training data
    stays on the clients."""
    if not spec.labels:
        raise DataError(
            "a deployed server never sees the clients' data, so it needs the label names: set "
            'data.labels (e.g. data.labels=["billing", "delivery"]) to the labels in the clients\' files'
        )
    test = (
        _to_dataset(read_table(spec.test_source, spec), spec.labels, spec.test_source)
        if spec.test_source
        else None
    )
    return Splits(None, test, list(spec.labels))


def load_client_file(path: str, spec: DataSection) -> Dataset:
    """A deployed classification client's own training file, labelled with the server's
    ``data.labels``."""
    if not spec.labels:
        raise DataError("the server sent no label names (data.labels); set them in the server's config")
    return _to_dataset(read_table(path, spec), spec.labels, path)


def load_instruction_splits(spec: DataSection, seed: int = 0) -> Splits:
    """Instruction data as chats: the whole training set and the held-out set (if any)."""
    if spec.source == DEMO:
        raise DataError("the demo data is for classification; set data.source to instruction data")
    train = Dataset.from_pandas(
        read_sources(spec.source, lambda p: _chat_frame(p, spec)), preserve_index=False
    )
    test = read_chats(spec.test_source, spec) if spec.test_source else None
    return Splits(train, test, [])


def load_instruction_server_splits(spec: DataSection) -> Splits:
    """What a deployed causal-LM server needs: its own held-out chats, if any."""
    return Splits(None, read_chats(spec.test_source, spec) if spec.test_source else None, [])


def _chat_frame(path: str | Path, spec: DataSection) -> pd.DataFrame:
    """A file of instruction data with its rows as chats in a ``messages`` column."""
    frame = read_file(path, spec)
    chats = to_messages(frame, spec, str(path))
    return frame.drop(columns=[MESSAGES], errors="ignore").assign(**{MESSAGES: chats})


def read_chats(path: str | Path, spec: DataSection) -> Dataset:
    """A file of instruction data as chats (a deployed causal-LM client's own file)."""
    return Dataset.from_pandas(_chat_frame(path, spec), preserve_index=False)


def source_files(source: str) -> list[Path]:
    """The files ``source`` names: a path, or a glob pattern's matches in natural order
    (``client_2`` before ``client_10``)."""
    if not glob.has_magic(source):
        return [Path(source)]
    matches = sorted(
        glob.glob(source), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]
    )
    if not matches:
        raise DataError(f"no file matches data.source pattern {source!r}; check the path")
    return [Path(m) for m in matches]


def read_sources(source: str, read: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    """All files ``source`` names, concatenated; with a ``source_file`` index when it is a pattern."""
    files = source_files(source)
    if not glob.has_magic(source):
        return read(files[0])
    return pd.concat([read(f).assign(**{FILE_COLUMN: i}) for i, f in enumerate(files)], ignore_index=True)


def read_file(path: str | Path, spec: DataSection) -> pd.DataFrame:
    """Read a jsonl/json/csv/tsv/parquet file as it is (every field)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.source / data.test_source")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"cannot read {path.name}: use one of {', '.join(_READERS)} (by file extension)")
    try:
        return reader(path, spec.columns)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot parse {path} ({exc}); check its format matches its extension") from exc


def read_table(path: str | Path, spec: DataSection) -> pd.DataFrame:
    """Read a jsonl/json/csv/tsv/parquet file into ``text`` and ``label`` columns (labels as text)."""
    frame = read_file(path, spec)
    missing = [f for f in (spec.text_field, spec.label_field) if f not in frame.columns]
    if missing:
        raise DataError(
            f"{path} has no field {missing[0]!r} (fields: {', '.join(map(str, frame.columns))}); "
            "set data.text_field / data.label_field, or data.columns for a file without a header"
        )
    kept = frame[[spec.text_field, spec.label_field]].dropna()
    if len(kept) < len(frame):
        log.warning(
            "%s: dropped %d of %d rows without a text or a label", path, len(frame) - len(kept), len(frame)
        )
    frame = kept
    return pd.DataFrame(
        {"text": frame[spec.text_field].astype(str), "label": frame[spec.label_field].astype(str)}
    )


def _to_dataset(frame: pd.DataFrame, names: list[str], source: str | None) -> Dataset:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise DataError(
            f"{source} has labels {unknown[:3]} not in data.labels {names}; add them to data.labels "
            "or remove those rows"
        )
    columns = {"text": list(frame["text"]), "label": [index[v] for v in frame["label"]]}
    if FILE_COLUMN in frame.columns:
        columns[FILE_COLUMN] = list(frame[FILE_COLUMN])
    return Dataset.from_dict(columns)


def partition(train: Dataset, spec: DataSection, partition_id: int, seed: int) -> Dataset:
    """Client ``partition_id``'s share of ``train``: IID, Dirichlet over labels (or over
    ``data.partition_field``) through flwr-datasets, by field value, or one source file each.
    An empty share is an error: that client could not train."""
    if len(train) < spec.num_clients:
        raise DataError(
            f"{len(train)} rows cannot give each of data.num_clients = {spec.num_clients} clients a "
            "row; lower data.num_clients or use more data"
        )
    share = _partition(train, spec, partition_id, seed)
    if len(share) == 0:
        raise DataError(
            f"partition {partition_id} of {spec.num_clients} has no rows ({len(train)} rows in all); "
            "lower data.num_clients or use more data"
        )
    return share


def _partition(train: Dataset, spec: DataSection, partition_id: int, seed: int) -> Dataset:
    if not 0 <= partition_id < spec.num_clients:
        raise DataError(f"partition {partition_id} is out of range for {spec.num_clients} clients")
    if spec.partition == "files":
        return _file_partition(train, spec, partition_id)
    if spec.partition == "field":
        return _field_partition(train, spec, partition_id)
    if spec.partition == "iid":
        partitioner = IidPartitioner(num_partitions=spec.num_clients)
        train = train.shuffle(seed=seed)  # IidPartitioner takes contiguous shards: order matters
    else:
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_clients,
            partition_by=_column(train, spec.partition_field or "label"),
            alpha=spec.dirichlet_alpha,
            min_partition_size=spec.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = train
    try:
        with warnings.catch_warnings():  # its retry warnings repeat what the error below says
            warnings.simplefilter("ignore", UserWarning)
            return partitioner.load_partition(partition_id)
    except ValueError as exc:
        raise DataError(
            f"cannot split {len(train)} rows into {spec.num_clients} partitions of at least "
            f"{spec.min_partition_size} ({exc}); lower data.min_partition_size or data.num_clients, "
            "or raise data.dirichlet_alpha"
        ) from exc


def _column(train: Dataset, name: str) -> str:
    if name not in train.column_names:
        raise DataError(
            f"the training data has no field {name!r} to partition by (fields: "
            f"{', '.join(train.column_names)}); set data.partition_field"
        )
    return name


def _file_partition(train: Dataset, spec: DataSection, partition_id: int) -> Dataset:
    if FILE_COLUMN not in train.column_names:
        raise DataError(
            "data.partition = 'files' needs data.source to be a glob pattern, one file per client"
        )
    files = max(train[FILE_COLUMN]) + 1
    if files != spec.num_clients:
        raise DataError(
            f"data.source matches {files} files but data.num_clients is {spec.num_clients}; make them equal"
        )
    return train.filter(lambda row: row == partition_id, input_columns=FILE_COLUMN)


def _field_partition(train: Dataset, spec: DataSection, partition_id: int) -> Dataset:
    """Distinct values of the field in sorted order, dealt round-robin to the clients (a client
    holds every row of its values). flwr-datasets' NaturalIdPartitioner needs one value per client;
    this also serves fewer clients than values."""
    column = _column(train, spec.partition_field or "")
    values = sorted({str(v) for v in train[column]})
    if len(values) < spec.num_clients:
        raise DataError(
            f"data.partition_field {column!r} has {len(values)} distinct values, fewer than "
            f"data.num_clients ({spec.num_clients}); lower data.num_clients"
        )
    mine = {v for i, v in enumerate(values) if i % spec.num_clients == partition_id}
    return train.filter(lambda value: str(value) in mine, input_columns=column)
