"""Killed runs resume cleanly: a metrics row cut short by a kill, and the soak benchmark in small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.testing import LocalGrid
from server.loop import FederatedRun
from tests.factories import metrics_rows, small_config

ROOT = Path(__file__).resolve().parents[1]


def test_resume_drops_a_metrics_row_cut_short_by_a_kill(tiny_bert_dir, tmp_path):
    """A SIGKILL during the write of round 2's row (before round 2's checkpoint) leaves half a line."""
    FederatedRun(small_config(tiny_bert_dir, **{"run.rounds": 1}), tmp_path).run(LocalGrid(3))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"round": 2, "clients_sampled": 3, "dropp')
    FederatedRun(small_config(tiny_bert_dir), tmp_path, resume=True).run(LocalGrid(3))
    assert [r["round"] for r in metrics_rows(tmp_path)] == [0, 1, 2]


def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(tiny_bert_dir, tmp_path):
    """Killed in round 1: config.json and the round-0 row are there, no checkpoint yet."""
    FederatedRun(small_config(tiny_bert_dir), tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "eval_loss": 1.0}\n')
    FederatedRun(small_config(tiny_bert_dir), tmp_path, resume=True).run(LocalGrid(3))
    assert [r["round"] for r in metrics_rows(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_a_faulty_simulation_killed_three_times_resumes_to_the_end(tmp_path):
    """benchmarks/soak.py in small: 5 rounds x 6 clients at a 30% fault rate, SIGKILLed 3 times
    (once during a checkpoint write); the script checks each kill and audits every drop."""
    out = tmp_path / "soak.json"
    args = ["--rounds", "5", "--clients", "6", "--rate", "0.3", "--kills", "3", "--round-timeout", "5"]
    done = subprocess.run(
        [sys.executable, "benchmarks/soak.py", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rounds_completed"] == 5 and result["resumes"] == 3
    assert result["failures_handled"] == result["failures_injected_total"] > 0
    assert result["kill_points"][2]["aimed_at_checkpoint_write"]
