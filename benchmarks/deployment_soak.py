"""The deployment soak: real `fedpeft server` and `fedpeft client` processes on 127.0.0.1 (TLS and
client keys), SIGKILLed at random and restarted as docs/deployment.md says.

    .venv/bin/python benchmarks/deployment_soak.py [--rounds 20] [--clients 5] [--kills 8]
        [--seed 2026] [--out benchmarks/results/deployment_soak.json]

The tiny BERT of the tests on generated data (the soak is about processes, not learning), every
client sampled every round. While the run goes on, a random process is SIGKILLed every 20 to 60 s
(`--kills` times): a client (one time in three the server instead). A killed process's whole tree
must be gone 10 s later (no SuperNode, SuperLink, ServerApp or `flwr run` outliving it); a client is
then started again with the same command, the server with `--resume RUN_DIR`. At the end every round
0..N must appear once in metrics.jsonl, in order, and no process of the federation may remain.
Exits non-zero if a check fails; the figures (wall time, kills, restarts, the rounds each kill
landed in, drops recorded) go to the results JSON with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from common import REPO, machine, results_header

sys.path.insert(0, str(REPO))  # tests/ is not an installed package

from fedpeft.testing import save_tiny_bert  # noqa: E402
from tests.deployment import Federation, metrics_rows, rounds_done, wait_for  # noqa: E402

SERVER = "server"


class SoakFailure(AssertionError):
    """A check of the soak failed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SoakFailure(message)


def tree_of(fed: Federation, name: str) -> list[int]:
    """The pids of ``name``'s process and everything it started."""
    try:
        root = psutil.Process(fed.processes[name].pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def survivors(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(process.cmdline())[:120])
        except psutil.NoSuchProcess:
            pass
    return out


def federation_processes(fed: Federation) -> list[str]:
    """Every live process whose command line names this federation's directory or port."""
    marks = (str(fed.root), f":{fed.port}")
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(mark in line for mark in marks):
            found.append(line[:120])
    return found


def soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    fed = Federation(
        root, save_tiny_bert(root / "tiny-bert"), client_rows={f"c{i}": 40 for i in range(args.clients)}
    )
    run_dir = root / "run"
    settings = [f"run.rounds={args.rounds}", f"server.min_clients={args.clients - 1}", "server.min_replies=2"]
    random_kills = random.Random(args.seed)
    started = time.monotonic()
    fed.start_server(run_dir, *settings)
    for name in fed.client_rows:
        fed.start_client(name)
    kills: list[dict[str, Any]] = []
    try:
        while fed.processes[SERVER].poll() is None:
            if len(kills) < args.kills:
                time.sleep(random_kills.uniform(20, 60))
                if fed.processes[SERVER].poll() is not None:
                    break
                victim = (
                    SERVER if random_kills.random() < 1 / 3 else random_kills.choice(list(fed.client_rows))
                )
                pids = tree_of(fed, victim)
                fed.kill(victim)
                time.sleep(10)
                left = survivors(pids)
                check(not left, f"after SIGKILL of {victim}, these outlived it: {left}")
                kills.append(
                    {
                        "victim": victim,
                        "after_round": rounds_done(run_dir),
                        "seconds": time.monotonic() - started,
                    }
                )
                if victim == SERVER:
                    fed.start_server(run_dir, *settings, resume=True)
                else:
                    fed.start_client(victim)
            else:
                time.sleep(2)
        check(fed.processes[SERVER].returncode == 0, f"the server failed: {fed.output(SERVER)[-2000:]}")
        seconds = time.monotonic() - started
    finally:
        fed.stop_all()
    wait_for(lambda: not federation_processes(fed), 30, "every process of the federation to end")
    rounds = [row["round"] for row in metrics_rows(run_dir)]
    check(rounds == list(range(args.rounds + 1)), f"metrics.jsonl rounds {rounds}")
    dropped = sum(len(row.get("dropped", [])) for row in metrics_rows(run_dir))
    return {"seconds": round(seconds, 1), "kills": kills, "rounds": rounds, "drops_recorded": dropped}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "deployment_soak.json")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped: still stop the federation
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedpeft-soak-") as tmp:
        try:
            result = soak(args, Path(tmp))
        except SoakFailure as failure:
            print(f"deployment soak FAILED: {failure}", file=sys.stderr)
            return 1
    out = results_header("deployment_soak", None) | {"args": vars(args) | {"out": str(args.out)}, **result}
    out["machine"] = machine(load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("seconds", "kills", "drops_recorded")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
