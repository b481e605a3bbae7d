"""A failing client tells the server what kind of failure it was, never its private details."""

from __future__ import annotations

import json

from client import runtime
from client.errors import category
from fedpeft.data import DataError
from fedpeft.testing import LocalGrid
from server.loop import FederatedRun
from tests.factories import small_config

PRIVATE = "rows of /home/alice/claims.csv have labels ['refund'] not in data.labels"


def test_the_server_records_a_category_and_none_of_the_clients_words(tiny_bert_dir, tmp_path, monkeypatch):
    splits = runtime.client_splits

    def failing_for_partition_1(config, context):
        if context.node_config["partition-id"] == 1:
            raise DataError(PRIVATE)
        return splits(config, context)

    monkeypatch.setattr(runtime, "client_splits", failing_for_partition_1)
    config = small_config(tiny_bert_dir, **{"server.min_replies": 2, "run.rounds": 1})
    FederatedRun(config, tmp_path).run(LocalGrid(3))
    records = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(records.splitlines()[-1])
    (drop,) = row["dropped"]
    assert drop["client"] == "partition-1" and "data error" in drop["reason"]
    assert "refund" not in records and "alice" not in records


def test_categories():
    assert category(DataError("x")) == "data error"
    assert category(MemoryError()) == "out of memory"
    assert category(KeyError("secret-field")) == "KeyError (details in the client's log)"
