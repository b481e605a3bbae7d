"""Every mistake a user can make in a config or its inputs: `fedpeft simulate` exits with code 2
and one line that names the problem and the fix, before any client is started."""

from __future__ import annotations

import re

import pytest

from fedpeft.cli import main

ROWS = "".join(f"text {i} about item {i},{'ab'[i % 2]}\n" for i in range(40))
FILES = {
    "broken.toml": "[run]\nrounds = \n",
    "ok.toml": '[run]\nname = "t"\n',
    "rows.csv": "text,label\n" + ROWS,
    "ragged.csv": 'text,label\n"an unclosed quote,a\nmore,b\n',
    "bad.jsonl": '{"text": "fine", "label": "a"}\n{"text": broken\n',
    "nolabel.csv": "text,topic\n" + ROWS,
    "image.png": "not a table",
}


def _data(*extra: str) -> list[str]:
    return ["data.num_clients=2", "server.min_clients=2", "data.demo_train_size=40", *extra]


# (config file, overrides, the problem, the fix): both are regular expressions the line must match.
CASES = {
    "bad TOML": ("broken.toml", [], r"broken\.toml is not valid TOML", r"fix the syntax"),
    "missing config": ("absent.toml", [], r"absent\.toml does not exist", r"pass the path of a TOML file"),
    "unknown key": (
        "ok.toml",
        ["run.roundz=3"],
        r"unknown key 'run\.roundz'",
        r"valid keys in \[run\]: .*rounds",
    ),
    "unknown section": ("ok.toml", ["rn.rounds=3"], r"unknown section \[rn\]", r"valid sections: run"),
    "wrong type": ("ok.toml", ["run.rounds='three'"], r"'run\.rounds' must be int", r"got 'three'"),
    "bad override": ("ok.toml", ["rounds"], r"override 'rounds'", r"section\.key=value"),
    "unknown strategy": ("ok.toml", ["strategy.name=fedsgd"], r"unknown strategy 'fedsgd'", r"choose one of"),
    "unknown strategy option": (
        "ok.toml",
        ["strategy.momentum=0.9"],
        r"strategy 'fedavg' has no option 'momentum'",
        r"valid options",
    ),
    "missing data file": (
        "ok.toml",
        _data("data.source='absent.csv'"),
        r"data file absent\.csv does not exist",
        r"check data\.source",
    ),
    "unknown file type": (
        "ok.toml",
        _data("data.source='image.png'"),
        r"cannot read image\.png",
        r"use one of",
    ),
    "unreadable csv rows": (
        "ok.toml",
        _data("data.source='ragged.csv'"),
        r"cannot parse ragged\.csv",
        r"check its",
    ),
    "unreadable jsonl rows": (
        "ok.toml",
        _data("data.source='bad.jsonl'"),
        r"cannot parse bad\.jsonl",
        r"check its",
    ),
    "missing field": (
        "ok.toml",
        _data("data.source='nolabel.csv'"),
        r"has no field 'label'",
        r"set data\.text_field / data\.label_field",
    ),
    "no held-out data": (
        "ok.toml",
        _data("data.source='rows.csv'"),
        r"central evaluation needs a held-out split",
        r"set data\.test_source or server\.evaluate = false",
    ),
    "empty partition": (
        "ok.toml",
        ["data.num_clients=50", "data.demo_train_size=30"],
        r"30 rows cannot give each of data\.num_clients = 50 clients a row",
        r"lower data\.num_clients",
    ),
    "partitions too small": (
        "ok.toml",
        ["data.partition='dirichlet'", "data.demo_train_size=60", "data.min_partition_size=40"],
        r"cannot split 60 rows into 8 partitions of at least 40",
        r"lower data\.min_partition_size",
    ),
    "rank larger than a layer": (
        "ok.toml",
        ["lora.rank=512"],
        r"LoRA rank 512 exceeds the smaller dimension \(384\) of layer",
        r"set lora\.rank .* to at most 384",
    ),
    "client rank larger than a layer": (
        "ok.toml",
        ["lora.client_ranks=[8, 1000]", "strategy.name='stacking'"],
        r"LoRA rank 1000 exceeds",
        r"at most 384",
    ),
    "unknown target modules": (
        "ok.toml",
        ["lora.target_modules=['nope']"],
        r"cannot add LoRA to .*\{'nope'\} not found",
        r"set lora\.target_modules",
    ),
    "unknown model": (
        "ok.toml",
        ["model.name='/no/such/model'"],
        r"cannot load model",
        r"give a local model",
    ),
    "privacy budget already spent": (
        "ok.toml",
        ["strategy.name='dp'", "strategy.epsilon_budget=0.01"],
        r"epsilon_budget = 0\.01 cannot pay for a single round",
        r"raise epsilon_budget or noise_multiplier",
    ),
    "negative max_reply_bytes": (
        "ok.toml",
        ["server.max_reply_bytes=-1"],
        r"server\.max_reply_bytes must be a byte count >= 0",
        r"0 derives the cap",
    ),
    "max_norm_ratio below 1": (
        "ok.toml",
        ["server.max_norm_ratio=0.5"],
        r"server\.max_norm_ratio must be 0 \(no norm check\) or at least 1",
        r"e\.g\. 10",
    ),
    "max_norm_ratio not a number": (
        "ok.toml",
        ["server.max_norm_ratio='high'"],
        r"'server\.max_norm_ratio' must be float",
        r"got 'high'",
    ),
}


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch):
    """A case that got past every check would start Ray: fail it instead."""

    def refuse(**kwargs):
        raise AssertionError("the run reached the simulation: the error was not caught before it")

    monkeypatch.setattr("flwr.simulation.run_simulation", refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_naming_the_problem_and_the_fix(case, tmp_path, monkeypatch, capsys):
    config, overrides, problem, fix = CASES[case]
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    argv = ["simulate", config, "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("fedpeft: error: ")
    assert re.search(problem, lines[0]) and re.search(fix, lines[0]), lines[0]


def test_resuming_a_directory_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ok.toml").write_text(FILES["ok.toml"])
    assert main(["simulate", str(tmp_path / "ok.toml"), "--resume", str(tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "holds no checkpoint to resume; pass the directory of an earlier run" in line
