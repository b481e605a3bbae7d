"""Configuration: defaults, overrides, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedpeft.config import ConfigError, load_config
from server.loop import build_strategy

SHIPPED = sorted(Path("simulations").glob("*.toml"))


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_quickstart_config_loads():
    config = load_config("simulations/quickstart.toml")
    assert config.strategy.name == "fedavg" and config.data.source == "demo"
    assert config.min_replies == config.server.min_clients


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_builds_its_strategy(path):
    config = load_config(path)
    plan = build_strategy(config).client_instructions(1, None)
    assert plan.weighting == config.strategy.options.get("weighting", "examples")


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
    client = config.client_config(data=config.data.replace(labels=["x"]))
    with pytest.raises(ValidationError, match="frozen"):
        client.lora.client_ranks = [2]  # a configuration is frozen: nobody edits it in place
    assert client.data.labels == ["x"]
    assert config.data.labels is None and config.lora.client_ranks is None


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the models: regenerate it with
    `python -m fedpeft.config > docs/configuration.md` after changing a field."""
    from pathlib import Path

    from fedpeft.config import reference

    assert (Path(__file__).parents[1] / "docs" / "configuration.md").read_text() == reference()


def test_every_field_is_described_and_list_elements_are_type_checked():
    from fedpeft.config import RunConfig

    for section, info in RunConfig.model_fields.items():
        for key, field in info.annotation.model_fields.items():
            assert field.description, f"{section}.{key} has no description"
    with pytest.raises(ConfigError, match=r"'lora\.target_modules' must be a list of str, got \[1, 2\]"):
        load_config(None, ["lora.target_modules=[1, 2]"])
    with pytest.raises(ConfigError, match=r"'data\.labels' must be a list of str, got \[1, 2\]"):
        load_config(None, ["data.labels=[1, 2]"])


def test_a_configuration_is_hashable_and_equal_by_value():
    a, b = load_config(None, ["train.lr=1e-3"]), load_config(None, ["train.lr=1e-3"])
    assert a == b and hash(a) == hash(b) and hash(a.client_config()) == hash(b.client_config())
    assert a != load_config(None, ["train.lr=2e-3"])
