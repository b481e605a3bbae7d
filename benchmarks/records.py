"""What every benchmark's results carry: the code version, the machine, the command, and a results
file that grows one piece at a time. Only the standard library and torch: it also runs on a
remote GPU machine that has no fedpeft dependencies beyond the model stack."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def results_header(benchmark: str, argv: list[str] | None) -> dict[str, Any]:
    """What every results file starts with: the benchmark, date, exact command and code version."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "benchmark": benchmark,
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/{benchmark}.py " + " ".join(args),
        "code": code_version(),
    }


def write_results(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def code_version() -> dict[str, Any]:
    """The git commit measured, and the tracked files that differed from it; on a copy of the
    working tree (a remote GPU machine), the commit its caller names in ``FEDPEFT_COMMIT``."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    named = os.environ.get("FEDPEFT_COMMIT")  # a copy whose .git, if any, is not the code's
    if named:
        return {"commit": named, "modified": []}
    return {"commit": git("rev-parse", "HEAD"), "modified": git("diff", "--name-only", "HEAD").split()}


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine(load_before: float) -> dict[str, Any]:
    """What a figure was measured on; the 1-minute load average at start and end shows whether
    another process shared the CPU (then wall times are inflated)."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


class RunsFile:
    """A results file that grows one piece at a time, so a long benchmark can run in parts:
    ``{"runs": [...], "benchmark", "machine", "date", "commit"}``, each run stamped with its own
    date, code version, command and load."""

    def __init__(self, path: Path, benchmark: str) -> None:
        self.path, self.benchmark = path, benchmark
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"runs": []}

    def get(self, piece: str) -> dict[str, Any] | None:
        return next((r for r in self.data["runs"] if r["piece"] == piece), None)

    def copy(self, source: str, piece: str) -> None:
        """Record ``source``'s run (stamps and all) as ``piece`` too: the same measurement."""
        run = {**self.get(source), "piece": piece, "copied_from": source}
        self.data["runs"] = [r for r in self.data["runs"] if r["piece"] != piece] + [run]
        write_results(self.data, self.path)

    def superseded(self, piece: str, **matching: Any) -> dict[str, Any] | None:
        """The latest superseded run of ``piece`` whose fields equal ``matching``."""
        runs = [r for r in self.data.get("superseded", []) if r["piece"] == piece]
        return next((r for r in reversed(runs) if all(r.get(k) == v for k, v in matching.items())), None)

    def supersede(self, piece: str, because: str) -> None:
        """Move ``piece``'s run to ``superseded`` with the reason, so that it runs again."""
        run = self.get(piece)
        if run is None:
            return
        self.data["runs"].remove(run)
        self.data.setdefault("superseded", []).append({**run, "superseded_because": because})
        write_results(self.data, self.path)

    def measure(self, piece: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one piece, stamp it, and add it (replacing an earlier run of the same piece)."""
        load_before = os.getloadavg()[0]
        result = {
            "piece": piece,
            **run(),
            "date": datetime.date.today().isoformat(),
            "commit": code_version(),
            "command": f"python benchmarks/{self.benchmark}.py " + " ".join(sys.argv[1:]),
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        self.data["runs"] = [r for r in self.data["runs"] if r["piece"] != piece] + [result]
        self.data.update(
            {
                "benchmark": self.benchmark,
                "machine": {"processor": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__},
                "date": result["date"],
                "commit": result["commit"]["commit"],
            }
        )
        write_results(self.data, self.path)
        return result
