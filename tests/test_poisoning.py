"""The AG News poisoning benchmark on a smaller scale: one client of 10 sends its update scaled by
100; the median stays near clean FedAvg and plain FedAvg does not (real data, 3 short runs of
10 clients: minutes, slow). trimmed_mean and clip meet the same poisoned update in
tests/test_robust.py, and at full scale in benchmarks/poisoning.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
AGNEWS = SHARED_DATA / "agnews" / "alps"


@pytest.mark.slow
@pytest.mark.skipif(
    not AGNEWS.is_dir(), reason=f"real datasets absent: {AGNEWS} (see ../shared/data/README.md)"
)
def test_robust_rules_withstand_one_client_scaled_by_100(tmp_path):
    out = tmp_path / "poisoning.json"
    small = ["--rounds", "3", "--local-steps", "8", "--final-test-rows", "500", "--test-limit", "100"]
    runs = "poisoned fedavg,poisoned median"  # and clean fedavg, always run first
    subprocess.run(
        [sys.executable, "benchmarks/poisoning.py", *small, "--only", runs, "--out", str(out)]
        + ["--runs-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    federated = json.loads(out.read_text())["federated"]
    clean = federated["clean fedavg"]["test_accuracy"]
    assert clean > 0.5  # it learned something: the comparison means something
    assert federated["poisoned fedavg"]["test_accuracy"] < clean - 0.1
    # 500 test rows and 3 short rounds: a looser tolerance than the benchmark's 1 point
    assert abs(federated["poisoned median"]["test_accuracy"] - clean) <= 0.05
