"""Data: the generated demo set, local files, partitioning."""

from __future__ import annotations

import json

import pytest

from fedpeft import demo_data
from fedpeft.config import DataSection
from fedpeft.data import DataError, load_splits, partition
from tests.factories import SHARED_DATA


def test_demo_data_is_deterministic_balanced_and_held_out():
    a, b = load_splits(DataSection(), seed=3), load_splits(DataSection(), seed=3)
    assert a.train["text"] == b.train["text"] and a.test["label"] == b.test["label"]
    assert load_splits(DataSection(), seed=4).train["text"] != a.train["text"]
    assert a.label_names == demo_data.LABELS
    counts = [a.train["label"].count(k) for k in range(4)]
    assert counts == [500] * 4
    assert len(set(a.train["text"])) > 1500  # mostly distinct texts
    assert set(a.test["text"]) - set(a.train["text"])  # the held-out split has unseen texts


def test_headerless_tsv_with_quotes(tmp_path):
    path = tmp_path / "news.tsv"
    path.write_text('"Stocks, ""bonds"" rally"\tBusiness\nTeam wins\tSports\nRain\tWorld\n')
    splits = load_splits(DataSection(source=str(path), test_source=str(path), columns=["text", "label"]), 0)
    assert splits.label_names == ["Business", "Sports", "World"]
    assert splits.train["text"][0] == 'Stocks, "bonds" rally'
    assert splits.train["label"] == [0, 1, 2]


def test_jsonl_with_named_fields_and_fixed_labels(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(json.dumps({"body": f"t{i}", "y": "pos" if i % 2 else "neg"}) for i in range(6))
    )
    spec = DataSection(source=str(path), text_field="body", label_field="y", labels=["pos", "neg"])
    splits = load_splits(spec, 0)
    assert splits.train["label"] == [1, 0, 1, 0, 1, 0] and splits.test is None


@pytest.mark.parametrize(
    ("content", "spec", "message"),
    [
        (None, {}, "does not exist"),
        ("a,b\n1,2\n", {}, "has no field 'text'"),
        ("text,label\nx,spam\n", {"labels": ["ham"]}, r"labels \['spam'\] not in data.labels"),
    ],
)
def test_data_errors_name_the_fix(tmp_path, content, spec, message):
    path = tmp_path / "rows.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_splits(DataSection(source=str(path), **spec), 0)


def test_a_held_out_label_without_training_rows_names_both_files(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\na,ham\nb,ham\n")
    test.write_text("text,label\nc,spam\n")
    with pytest.raises(
        DataError, match=r"test.csv has labels \['spam'\] that the training data \(.*train.csv\)"
    ):
        load_splits(DataSection(source=str(train), test_source=str(test)), 0)


def test_rows_without_a_label_are_counted_in_the_log(tmp_path, caplog):
    path = tmp_path / "rows.csv"
    path.write_text("text,label\na,ham\nb,\nc,spam\n")
    assert len(load_splits(DataSection(source=str(path)), 0).train) == 2
    assert "dropped 1 of 3 rows without a text or a label" in caplog.text


def test_unknown_extension(tmp_path):
    path = tmp_path / "rows.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="use one of .jsonl"):
        load_splits(DataSection(source=str(path)), 0)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_cover_the_data_once(scheme):
    spec = DataSection(num_clients=5, partition=scheme, dirichlet_alpha=0.3, min_partition_size=20)
    train = load_splits(spec, 0).train
    parts = [partition(train, spec, i, seed=1) for i in range(5)]
    assert sum(len(p) for p in parts) == len(train)
    assert min(len(p) for p in parts) >= 20
    texts = [t for p in parts for t in p["text"]]
    assert sorted(texts) == sorted(train["text"])


def test_dirichlet_is_non_iid_and_seeded():
    spec = DataSection(num_clients=4, partition="dirichlet", dirichlet_alpha=0.1, min_partition_size=10)
    train = load_splits(spec, 0).train
    part = partition(train, spec, 0, seed=2)
    shares = [part["label"].count(k) / len(part) for k in range(4)]
    assert max(shares) > 0.5
    assert partition(train, spec, 0, seed=2)["text"] == part["text"]


def test_impossible_partition_is_a_data_error():
    spec = DataSection(num_clients=8, partition="dirichlet", dirichlet_alpha=0.1, min_partition_size=400)
    with pytest.raises(DataError, match="lower data.min_partition_size"):
        partition(load_splits(spec, 0).train, spec, 0, seed=0)


AGNEWS = SHARED_DATA / "agnews" / "alps"


@pytest.mark.skipif(
    not AGNEWS.is_dir(), reason=f"real datasets absent: {AGNEWS} (see ../shared/data/README.md)"
)
def test_agnews_tsv_loads_with_four_topics():
    spec = DataSection(
        source=str(AGNEWS / "dev.tsv"), test_source=str(AGNEWS / "test.tsv"), columns=["text", "label"]
    )
    splits = load_splits(spec, 0)
    assert splits.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert len(splits.test) == 7600 and len(splits.train) > 9900
    assert all(len(t) > 20 for t in splits.train["text"][:100])
