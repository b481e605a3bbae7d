"""Time the quickstart federation end to end and record its accuracy before and after training.

    .venv/bin/python benchmarks/quickstart.py [--out benchmarks/results/quickstart.json]

Runs `fedpeft simulate simulations/quickstart.toml` as a user would (a fresh process, Ray start-up
and model loading included) and reads the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, object]:
    """CPU model, core count and torch version: what a figure was measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    models = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.exists()
        else []
    )
    return {
        "cpu": models[0] if models else platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quickstart.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "fedpeft.cli",
            "simulate",
            "simulations/quickstart.toml",
            "--run-dir",
            str(run_dir),
        ]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - started
        summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": "fedpeft simulate simulations/quickstart.toml",
        "wall_seconds": round(wall, 1),
        "rounds_seconds": summary["seconds"],
        "initial_eval_accuracy": summary["initial_eval_accuracy"],
        "final_eval_accuracy": summary["final_eval_accuracy"],
        "bytes_up_per_round": summary["bytes_up"] // summary["rounds"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
