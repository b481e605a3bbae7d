"""Configuration: defaults, overrides, and one clear line for every mistake."""

from __future__ import annotations

import pytest

from fedpeft.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_quickstart_config_loads():
    config = load_config("simulations/quickstart.toml")
    assert config.strategy.name == "fedavg" and config.data.source == "demo"
    assert config.min_replies == config.server.min_clients


def test_overrides_are_typed_and_win(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.1\n[strategy]\nname = 'fedavg'\nextra = 3\n")
    config = load_config(
        path, ["train.lr=1e-3", "run.rounds=7", "data.source=/tmp/x.csv", 'lora.target_modules=["q", "v"]']
    )
    assert config.train.lr == 1e-3 and config.run.rounds == 7
    assert config.data.source == "/tmp/x.csv" and config.lora.target_modules == ["q", "v"]
    assert config.strategy.options == {"extra": 3}


def test_int_is_accepted_for_float():
    assert load_config(None, ["lora.alpha=16"]).lora.alpha == 16


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[train]\nlrr = 1\n", [], r"unknown key 'train\.lrr'; valid keys in \[train\]: local_steps"),
        ("[trian]\n", [], r"unknown section \[trian\]; valid sections: run"),
        ("[train]\nlr = 'fast'\n", [], r"'train\.lr' must be float, got 'fast'"),
        ("[run]\nrounds = 2.5\n", [], r"'run\.rounds' must be int"),
        ("[run]\nrounds = true\n", [], r"'run\.rounds' must be int"),
        ("[run\n", [], r"is not valid TOML"),
        ("", ["rounds=3"], r"must look like section\.key=value"),
        ("", ["run.rounds=0"], r"run\.rounds must be at least 1"),
        ("", ["server.fraction=1.5"], r"server\.fraction must be in \(0, 1\]"),
        (
            "",
            ["data.partition=random"],
            r"data\.partition must be one of iid, dirichlet, field, files, got 'random'",
        ),
        (
            "",
            ["lora.client_ranks=[4, 4]"],
            r"must mix at least two ranks; for one rank on every client set lora\.rank",
        ),
        ("", ["lora.client_ranks=[0, 4]"], r"lora\.client_ranks must be a list of positive integers"),
        ("", ["server.min_clients=20"], r"server\.min_clients \(20\) exceeds data\.num_clients \(8\)"),
    ],
)
def test_config_errors_are_one_clear_line(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_client_config_is_a_copy():
    config = load_config(None)
    client = config.client_config()
    client.data.labels = ["x"]
    client.lora.client_ranks = [2]
    assert config.data.labels is None and config.lora.client_ranks is None
