"""The command line: user errors are one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulations/quickstart.toml", "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["missing.toml"], "config file missing.toml does not exist"),
        (
            ["simulations/quickstart.toml", "--set", "data.source=/nonexistent.csv"],
            "data file /nonexistent.csv does not exist",
        ),
        (["simulations/quickstart.toml", "--set", "strategy.name=fedsgd"], "unknown strategy 'fedsgd'"),
        (
            ["simulations/quickstart.toml", "--set", "data.demo_train_size=300"],
            "cannot split 300 rows into 8 partitions of at least 50",
        ),
    ],
)
def test_user_errors_are_one_line(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpeft: error: ") and message in lines[0]
