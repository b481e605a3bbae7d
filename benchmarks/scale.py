"""Many virtual clients on one machine: seconds per round and peak memory of a simulation with
100 and 1,000 clients, 10 sampled per round.

    nice -n 10 .venv/bin/python benchmarks/scale.py [--clients 100 1000] [--rounds 3]
        [--out benchmarks/results/scale.json]

Runs ``fedpeft simulate simulations/quickstart.toml`` in a fresh process per size (Flower's
simulation engine on Ray, one virtual client per core at a time), IID partitions of generated data
(20 rows per client), 5 local steps per round, no central evaluation. Memory is the peak of the
summed resident memory of the whole process tree (driver, Ray's daemons and workers), sampled
every 0.5 s: an upper bound, since pages shared between processes count once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import REPO, code_version, machine

ROWS_PER_CLIENT = 20


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return total


def simulate(clients: int, rounds: int) -> dict:
    overrides = [
        f"data.num_clients={clients}",
        "data.partition='iid'",
        "data.min_partition_size=5",
        f"data.demo_train_size={clients * ROWS_PER_CLIENT}",
        f"server.fraction={10 / clients}",
        "server.evaluate=false",
        f"run.rounds={rounds}",
        "train.local_steps=5",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "simulations/quickstart.toml"]
        cmd += ["--run-dir", str(run_dir)] + [a for o in overrides for a in ("--set", o)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(process))
            time.sleep(0.5)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            return {"clients": clients, "failed": child.stderr.read().decode()[-2000:]}
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds_rows = [r for r in rows if r["round"] > 0]
    return {
        "clients": clients,
        "sampled_per_round": rounds_rows[0]["clients_sampled"],
        "wall_seconds": round(wall, 1),
        "round_seconds": [r["seconds"] for r in rounds_rows],
        "peak_tree_rss_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scale.json")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    runs = []
    for clients in args.clients:
        runs.append(simulate(clients, args.rounds))
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(load),
        "code": code_version(),
        "command": "nice -n 10 .venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
