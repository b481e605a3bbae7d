"""The soak: a long simulation with random client failures, SIGKILLed at random points and resumed.

    nice -n 10 .venv/bin/python benchmarks/soak.py [--rounds 50] [--clients 20] [--rate 0.1]
        [--kills 5] [--round-timeout 10] [--out benchmarks/results/soak.json]

``fedpeft simulate`` (Flower's simulation engine on Ray) of the tiny BERT of the tests (2 layers,
hidden 32: the soak is about fault handling, not learning) on generated data, every client sampled
every round, ``[faults]`` at ``--rate`` (crash, timeout, garbage in equal parts, drawn from the
run seed). While it runs, the whole process group of ``fedpeft simulate`` (its Ray daemons and
workers included) is SIGKILLed ``--kills`` times: after a random round, a random delay into the
next one; one kill in three instead waits for the checkpoint's temporary file to appear, to land
during a checkpoint write. After each kill the script checks that the checkpoint loads, that
metrics.jsonl holds the rounds up to it (plus at most the round recorded just before its
checkpoint was replaced), and that no process of the killed group survived; then it resumes with
``--resume`` and checks that the run says it resumes after the checkpointed round.

At the end: every round 0..N appears once in metrics.jsonl, in order; no temporary file is left;
every drawn fault of every round appears as a drop with its kind's reason, and every other drop is
a "no reply within" in a round where late clients occupied every Ray worker at once (see
client/faults.py). Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from common import REPO, code_version, machine

sys.path.insert(0, str(REPO))  # tests/ is not an installed package
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.faults import simulated_fault  # noqa: E402
from fedpeft.config import RunConfig, load_config  # noqa: E402
from fedpeft.testing import save_tiny_bert  # noqa: E402
from server.checkpoint import load_checkpoint  # noqa: E402

CONFIG = "simulations/quickstart.toml"
REASONS = {"crash": "simulated crash", "garbage": "malformed reply", "timeout": "no reply within"}
ROWS_PER_CLIENT = 20
KILL_SEED = 2026


class SoakFailure(AssertionError):
    """A check of the soak failed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SoakFailure(message)


def overrides(args: argparse.Namespace, model_dir: Path) -> list[str]:
    return [
        f"model.name='{model_dir}'",
        f"run.rounds={args.rounds}",
        f"data.num_clients={args.clients}",
        "data.partition='iid'",
        "data.min_partition_size=5",
        f"data.demo_train_size={args.clients * ROWS_PER_CLIENT}",
        "data.demo_test_size=100",
        "train.local_steps=2",
        "train.batch_size=8",
        "server.fraction=1.0",
        f"server.min_clients={args.clients}",
        f"server.min_replies={max(1, args.clients // 4)}",
        f"server.round_timeout={args.round_timeout}",
        f"faults.rate={args.rate}",
    ]


class Simulation:
    """One ``fedpeft simulate`` process in its own process group, its output in a log file."""

    def __init__(self, items: list[str], run_dir: Path, resume: bool, log: Path) -> None:
        cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", CONFIG]
        cmd += ["--resume" if resume else "--run-dir", str(run_dir)]
        cmd += [a for item in items for a in ("--set", item)]
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> list[int]:
        """SIGKILL the whole process group; returns the pids of the group that survived."""
        tree = [self.process, *psutil.Process(self.process.pid).children(recursive=True)]
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        gone, alive = psutil.wait_procs([p for p in tree if p is not self.process], timeout=10)
        return [p.pid for p in alive]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def last_round(run_dir: Path) -> int:
    """The last round in metrics.jsonl (-1: none yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return -1
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["round"] if lines else -1
    except json.JSONDecodeError:
        return -1  # a row being written


def wait_for(condition, sim: Simulation, what: str, timeout: float = 1800.0, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        check(
            sim.process.poll() is None,
            f"fedpeft simulate exited while waiting for {what}:\n{sim.output()[-3000:]}",
        )
        check(time.monotonic() < deadline, f"timed out waiting for {what}")
        time.sleep(poll)


def kill_and_check(sim: Simulation, run_dir: Path, target: int, mid_write: bool, rng: random.Random) -> dict:
    """Wait until round ``target`` is checkpointed, kill at a random point (or during a
    checkpoint write), and check what the kill left behind."""
    tmp = run_dir / "checkpoint.tmp"
    wait_for(
        lambda: last_round(run_dir) >= target and (run_dir / "checkpoint.safetensors").is_file(),
        sim,
        f"round {target}",
    )
    if mid_write:
        wait_for(tmp.exists, sim, "a checkpoint write", poll=0.0002)
    else:
        time.sleep(rng.uniform(0.0, 4.0))
    survivors = sim.kill()
    check(not survivors, f"processes of the killed group survived: {survivors}")
    checkpointed = load_checkpoint(run_dir).state.round
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    try:
        json.loads(lines[-1])
        cut_short = False
    except json.JSONDecodeError:
        cut_short = True  # a row the kill interrupted: resume drops it (server/report.py)
    rounds = [json.loads(line)["round"] for line in lines[: len(lines) - cut_short]]
    check(
        rounds[: checkpointed + 1] == list(range(checkpointed + 1)),
        f"metrics rows {rounds} before the checkpoint",
    )
    check(
        rounds[checkpointed + 1 :] in ([], [checkpointed + 1]),
        f"metrics rows {rounds} after checkpoint {checkpointed}",
    )
    return {
        "after_round": target,
        "aimed_at_checkpoint_write": mid_write,
        "checkpoint_round": checkpointed,
        "temp_file_at_kill": tmp.exists(),
        "metrics_row_beyond_checkpoint": len(rounds) > checkpointed + 1,
        "metrics_row_cut_short": cut_short,
    }


def check_resumed(sim: Simulation, run_dir: Path, checkpointed: int) -> None:
    expected = f"resuming {run_dir} after round {checkpointed}"
    wait_for(lambda: expected in " ".join(sim.output().split()), sim, f"'{expected}'", timeout=600)


def audit(config: RunConfig, rows: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Every drawn fault is a drop with its reason; other drops are starved clients (all workers late)."""
    injected, handled, starved = Counter(), Counter(), 0
    for row in rows[1:]:
        sampled = {r["client"] for r in row["replies"]} | {d["client"] for d in row["dropped"]}
        check(len(sampled) == row["clients_sampled"], f"round {row['round']}: clients unaccounted for")
        drawn = {
            client: kind
            for client in sampled
            if (
                kind := simulated_fault(
                    config.faults, config.run.seed, row["round"], int(client.split("-")[1])
                )
            )
        }
        late = sum(kind == "timeout" for kind in drawn.values())
        for drop in row["dropped"]:
            kind = drawn.get(drop["client"])
            if kind is None:
                check(
                    REASONS["timeout"] in drop["reason"] and late >= workers,
                    f"round {row['round']}: unexpected drop {drop}",
                )
                starved += 1
            else:
                check(
                    REASONS[kind] in drop["reason"],
                    f"round {row['round']}: {kind} dropped as {drop['reason']!r}",
                )
                handled[kind] += 1
        injected.update(drawn.values())
    check(injected == handled, f"injected {dict(injected)} but dropped {dict(handled)}")
    return {
        "failures_injected": dict(sorted(injected.items())),
        "failures_injected_total": sum(injected.values()),
        "failures_handled": sum(handled.values()),
        "starved_by_late_clients": starved,
        "client_replies_aggregated": sum(r["clients_aggregated"] for r in rows[1:]),
        "client_slots": sum(r["clients_sampled"] for r in rows[1:]),
    }


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    items = overrides(args, save_tiny_bert(work / "tiny-bert"))
    config = load_config(REPO / CONFIG, items)
    run_dir = work / "run"
    rng = random.Random(KILL_SEED)
    targets = sorted(rng.sample(range(1, args.rounds - 1), args.kills))
    started = time.perf_counter()
    sim = Simulation(items, run_dir, resume=False, log=work / "simulate-0.log")
    kills = []
    for i, target in enumerate(targets, start=1):
        kill = kill_and_check(sim, run_dir, target, mid_write=i % 3 == 0, rng=rng)
        print(f"kill {i}: {kill}", flush=True)
        kills.append(kill)
        sim = Simulation(items, run_dir, resume=True, log=work / f"simulate-{i}.log")
        check_resumed(sim, run_dir, kill["checkpoint_round"])
    check(sim.process.wait() == 0, f"the last fedpeft simulate failed:\n{sim.output()[-3000:]}")
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check([r["round"] for r in rows] == list(range(args.rounds + 1)), "metrics rounds are not 0..N once each")
    leftovers = sorted(p.name for p in run_dir.iterdir() if p.suffix == ".tmp")
    check(not leftovers, f"temporary files left: {leftovers}")
    check(load_checkpoint(run_dir).state.round == args.rounds, "the final checkpoint is not the last round")
    workers = (os.cpu_count() or 1) // config.simulation.cpus_per_client
    return {
        "rounds_completed": len(rows) - 1,
        **audit(config, rows, workers),
        "kills": len(kills),
        "resumes": len(kills),
        "kill_points": kills,
        "ray_workers": workers,
        "seconds_total": round(seconds, 1),
        "seconds_in_rounds": round(sum(r["seconds"] for r in rows[1:]), 1),
        "rounds_with_a_late_client": sum(
            any(
                simulated_fault(config.faults, config.run.seed, r["round"], p) == "timeout"
                for p in range(args.clients)
            )
            for r in rows[1:]
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--round-timeout", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedpeft-soak-") as tmp:
        try:
            result = soak(args, Path(tmp))
        except SoakFailure as failure:
            print(f"SOAK FAILED: {failure}", file=sys.stderr)
            return 1
    report = {
        "benchmark": "soak",
        "command": " ".join(["benchmarks/soak.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(load_before),
        "code": code_version(),
        "setup": {
            "rounds": args.rounds,
            "clients": args.clients,
            "fault_rate": args.rate,
            "round_timeout_s": args.round_timeout,
            "model": "tiny BERT (2 layers, hidden 32), LoRA r = 8, 2 local steps of batch 8",
        },
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in report.items() if k not in ("kill_points", "machine", "code")}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
