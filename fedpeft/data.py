"""Datasets for classification: local files, the generated demo data, and partitioning.

A dataset is a ``datasets.Dataset`` with an integer ``label`` column and a ``text`` column.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedpeft import demo_data
from fedpeft.config import DataSection
from fedpeft.errors import UserError

DEMO = "demo"
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
    """The whole training set, the held-out set (if any) and the label names."""
    if spec.source == DEMO:
        train, test = demo_data.demo_splits(spec.demo_train_size, spec.demo_test_size, seed)
        return Splits(Dataset.from_dict(train), Dataset.from_dict(test), list(demo_data.LABELS))
    train_frame = read_table(spec.source, spec)
    test_frame = read_table(spec.test_source, spec) if spec.test_source else None
    names = spec.labels or sorted({str(v) for v in train_frame["label"]})
    train = _to_dataset(train_frame, names, spec.source)
    test = _to_dataset(test_frame, names, spec.test_source) if test_frame is not None else None
    return Splits(train, test, names)


def load_server_splits(spec: DataSection) -> Splits:
    """What a deployed server needs: the label names (``data.labels``, which every client's file
    uses) and its own held-out file (``data.test_source``, optional). Training data stays on the
    clients."""
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
    """A deployed client's own training file, labelled with the server's ``data.labels``."""
    if not spec.labels:
        raise DataError("the server sent no label names (data.labels); set them in the server's config")
    return _to_dataset(read_table(path, spec), spec.labels, path)


def read_table(path: str | Path, spec: DataSection) -> pd.DataFrame:
    """Read a jsonl/json/csv/tsv/parquet file into ``text`` and ``label`` columns (labels as text)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.source / data.test_source")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"cannot read {path.name}: use one of {', '.join(_READERS)} (by file extension)")
    try:
        frame = reader(path, spec.columns)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot parse {path} ({exc}); check its format matches its extension") from exc
    missing = [f for f in (spec.text_field, spec.label_field) if f not in frame.columns]
    if missing:
        raise DataError(
            f"{path} has no field {missing[0]!r} (fields: {', '.join(map(str, frame.columns))}); "
            "set data.text_field / data.label_field, or data.columns for a file without a header"
        )
    frame = frame[[spec.text_field, spec.label_field]].dropna()
    return pd.DataFrame(
        {"text": frame[spec.text_field].astype(str), "label": frame[spec.label_field].astype(str)}
    )


def _to_dataset(frame: pd.DataFrame, names: list[str], source: str | None) -> Dataset:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise DataError(
            f"{source} has labels {unknown[:3]} not in data.labels {names}; add them to data.labels"
        )
    return Dataset.from_dict({"text": list(frame["text"]), "label": [index[v] for v in frame["label"]]})


def partition(train: Dataset, spec: DataSection, partition_id: int, seed: int) -> Dataset:
    """Client ``partition_id``'s share of ``train`` (IID or Dirichlet over labels, flwr-datasets)."""
    if not 0 <= partition_id < spec.num_clients:
        raise DataError(f"partition {partition_id} is out of range for {spec.num_clients} clients")
    if spec.partition == "iid":
        partitioner = IidPartitioner(num_partitions=spec.num_clients)
        train = train.shuffle(seed=seed)  # IidPartitioner takes contiguous shards: order matters
    else:
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
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
