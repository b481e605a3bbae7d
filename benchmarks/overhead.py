"""What the federated stack costs beyond training: one client, N local steps, against a plain peft
training loop of the same N steps on the same data, in the same run.

    nice -n 10 .venv/bin/python benchmarks/overhead.py [--rounds 5] [--steps 20]
        [--out benchmarks/results/overhead.json]

Three measurements of the quickstart model and data (MiniLM, LoRA r = 8 on query/value plus the
head, batch 16), one client holding the whole training set, no central evaluation:
- ``plain``: load the model, tokenize the data, ``fedpeft.training.train`` for N = rounds x steps;
- ``in_process``: ``FederatedRun`` with the real ClientApp functions behind an in-process grid
  (every fedpeft layer, no Ray), with a per-round breakdown of where the time goes;
- ``simulation``: ``fedpeft simulate`` in a fresh process (Flower's simulation engine on Ray),
  wall time with and without the engine's start-up.
Then one central evaluation is timed on its own (what ``server.evaluate = true`` adds per round).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, code_version, machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO))  # tests/ is not an installed package

import torch  # noqa: E402

import client.app
import client.runtime
import fedpeft.lora
import server.loop
from fedpeft.config import RunConfig, load_config
from fedpeft.data import load_splits, partition
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.state import GlobalState
from fedpeft.testing import LocalGrid  # noqa: E402
from fedpeft.training import encode, train
from server.evaluation import CentralEvaluator

CONFIG = REPO / "simulations" / "quickstart.toml"


def run_config(rounds: int, steps: int) -> tuple[RunConfig, list[str]]:
    overrides = [
        "data.num_clients=1",
        "server.min_clients=1",
        "server.fraction=1.0",
        "server.evaluate=false",
        f"run.rounds={rounds}",
        f"train.local_steps={steps}",
    ]
    return load_config(CONFIG, overrides), overrides


def plain(config: RunConfig) -> dict[str, float]:
    """The same N steps as one ordinary peft training loop."""
    started = time.perf_counter()
    splits = load_splits(config.data, config.run.seed)
    spec = ClassifierSpec.from_config(
        config.model.name, len(splits.label_names), config.lora, config.run.seed
    )
    model = load_classifier(spec)
    tokenizer = load_tokenizer(config.model.name)
    data = encode(
        partition(splits.train, config.data, 0, config.run.seed), tokenizer, config.model.max_length
    )
    loaded = time.perf_counter()
    train(
        model,
        tokenizer,
        data,
        steps=config.run.rounds * config.train.local_steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        seed=config.run.seed,
    )
    done = time.perf_counter()
    return {"seconds": done - started, "load_seconds": loaded - started, "train_seconds": done - loaded}


class Stopwatch:
    """Wraps functions by name and adds up the time spent in each phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
                self.calls[phase] += 1

        setattr(owner, name, timed)


def in_process(config: RunConfig) -> dict[str, Any]:
    """The federated run with every fedpeft layer in this process, timed per phase."""
    watch = Stopwatch()
    watch.wrap(client.runtime, "load_classifier", "model load (client)")
    watch.wrap(client.runtime, "client_data", "data partition + tokenize (client)")
    watch.wrap(fedpeft.lora.AdapterHost, "load_state", "state apply (client)")
    watch.wrap(client.app, "train_locally", "training (client)")
    watch.wrap(client.app, "decode_state", "deserialize state (client)")
    watch.wrap(client.app, "encode_update", "serialize update (client)")
    watch.wrap(server.loop, "encode_train_message", "serialize state (server)")
    watch.wrap(server.loop, "decode_update", "deserialize update (server)")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = server.loop.FederatedRun(config, Path(tmp) / "run")
        run.run(LocalGrid(1))
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    watch.seconds["aggregation (server)"] = sum(r["aggregation_seconds"] for r in rows)
    accounted = sum(watch.seconds.values())
    phases = {k: round(v, 4) for k, v in sorted(watch.seconds.items(), key=lambda kv: -kv[1])}
    return {
        "seconds": seconds,
        "phases_seconds_total": phases,
        "other_seconds": round(seconds - accounted, 4),  # set-up, round 0, export, logging, checkpoints
        "model_loads": watch.calls["model load (client)"],
        "training_calls": watch.calls["training (client)"],
    }


def simulation(overrides: list[str]) -> dict[str, float]:
    """``fedpeft simulate`` in a fresh process, as a user runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", str(CONFIG), "--run-dir", str(run_dir)]
        for item in overrides:
            cmd += ["--set", item]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        wall = time.perf_counter() - started
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # run_seconds: from the server's start (the first query starts Ray's workers, which import
    # torch and load the model); round_seconds: each round, from sending to the checkpoint
    return {
        "wall_seconds": wall,
        "run_seconds": summary["seconds"],
        "round_seconds": [r["seconds"] for r in rows if r["round"] > 0],
    }


def evaluation_seconds(config: RunConfig) -> float:
    evaluator = CentralEvaluator(config, load_splits(config.data, config.run.seed))
    state = GlobalState()
    evaluator(state, 1)  # the evaluator's model load, once
    started = time.perf_counter()
    evaluator(state, 1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="local steps per round")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a virtual client with simulation.cpus_per_client = 1
    load = os.getloadavg()[0]
    config, overrides = run_config(args.rounds, args.steps)
    baseline = plain(config)
    stack = in_process(config)
    simulated = simulation(overrides)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(load),
        "code": code_version(),
        "command": "nice -n 10 .venv/bin/python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        "steps": args.rounds * args.steps,
        "rounds": args.rounds,
        "plain": baseline,
        "in_process": stack,
        "simulation": simulated,
        "ratio_in_process": stack["seconds"] / baseline["seconds"],
        "ratio_simulation_rounds_only": sum(simulated["round_seconds"]) / baseline["seconds"],
        "ratio_simulation_without_startup": simulated["run_seconds"] / baseline["seconds"],
        "ratio_simulation_with_startup": simulated["wall_seconds"] / baseline["seconds"],
        "central_evaluation_seconds": evaluation_seconds(config),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
