"""AG News: final test accuracy of FedAvg over LoRA next to a centralized LoRA run.

What it measures. The federated run simulates ``--clients`` Flower clients (default 10) holding a
Dirichlet(``--alpha``) label split of the AG News training file; each round ``--fraction`` of them
run ``--local-steps`` AdamW steps on the embedded MiniLM + LoRA and the server averages them with
FedAvg. The centralized run trains the same model (same LoRA config, same seed, so the same
starting weights) on the whole training file for exactly as many optimizer steps as the federation
took in total (rounds x aggregated clients x local steps), with the same batch size and learning
rate. Both final models, and the untrained start, are scored on the full AG News test file.
The per-round curve in the federated run is on the first ``--test-limit`` test rows only.

Data: ``<data-dir>/agnews/alps/dev.tsv`` (10,001 rows, used for training) and ``test.tsv``
(7,600 rows), where ``<data-dir>`` defaults to ``shared/data`` next to the repository.

Run from the repository root (half an hour or more on a 2-core CPU):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/agnews_fedavg.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_DATA_DIR,
    REPO,
    agnews_config,
    full_test,
    machine,
    missing_agnews,
    results_header,
    train_and_score,
    write_results,
)

from fedpeft.config import RunConfig, config_to_dict
from fedpeft.data import load_splits
from fedpeft.state import GlobalState
from server.app import new_run_dir
from server.checkpoint import load_checkpoint
from server.evaluation import CentralEvaluator
from server.simulation import simulate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding agnews/alps/")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    p.add_argument("--fraction", type=float, default=0.5, help="share of clients sampled per round")
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--test-limit", type=int, default=1000, help="test rows for the per-round curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", type=Path, help="federated run directory (default: a new one in runs/)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "agnews_fedavg.json")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, data_dir: Path) -> RunConfig:
    return agnews_config(
        data_dir,
        {
            "run.name": "agnews-fedavg",
            "run.seed": args.seed,
            "run.rounds": args.rounds,
            "model.max_length": args.max_length,
            "data.num_clients": args.clients,
            "data.dirichlet_alpha": args.alpha,
            "data.test_limit": args.test_limit,
            "train.local_steps": args.local_steps,
            "train.batch_size": args.batch_size,
            "train.lr": args.lr,
            "server.fraction": args.fraction,
            "strategy.name": "fedavg",
        },
    )


def run_federated(config: RunConfig, run_dir: Path, scorer: CentralEvaluator) -> dict[str, Any]:
    print(
        f"[federated] {config.data.num_clients} clients, {config.run.rounds} rounds -> {run_dir}", flush=True
    )
    started = time.perf_counter()
    simulate(config, run_dir)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rounds = [r for r in rows if r["round"] > 0]
    steps = sum(r["clients_aggregated"] for r in rounds) * config.train.local_steps
    print("[federated] scoring the final global adapter on the full test set", flush=True)
    state = load_checkpoint(run_dir).state
    final = scorer(state, init_seed=0)  # init_seed is unused: the state carries an adapter
    return {
        "run_dir": str(run_dir),
        "optimizer_steps": steps,
        "clients_per_round": [r["clients_aggregated"] for r in rounds],
        "test_accuracy": final["eval_accuracy"],
        "test_loss": final["eval_loss"],
        "curve_test_rows": config.data.test_limit,
        "curve_accuracy": {r["round"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r},
        "seconds": round(seconds, 1),
    }


def markdown_table(result: dict[str, Any]) -> str:
    cfg, fed, cen = result["config"], result["federated"], result["centralized"]
    per_round = sorted(set(fed["clients_per_round"]))
    clients = str(per_round[0]) if len(per_round) == 1 else f"{per_round[0]}-{per_round[-1]}"
    fed_name = (
        f"FedAvg, {cfg['data']['num_clients']} clients, Dirichlet α={cfg['data']['dirichlet_alpha']:g} "
        f"({cfg['run']['rounds']} rounds × {clients} clients × {cfg['train']['local_steps']} steps)"
    )
    rows = [
        ("untrained (round 0)", result["untrained"]["eval_accuracy"], 0, "–"),
        (fed_name, fed["test_accuracy"], fed["optimizer_steps"], f"{fed['seconds']:.0f} s"),
        (
            "centralized LoRA, all training rows",
            cen["test_accuracy"],
            cen["optimizer_steps"],
            f"{cen['seconds']:.0f} s",
        ),
    ]
    lines = [
        f"| run | test accuracy ({result['test_rows']:,} rows) | optimizer steps | wall time |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {acc:.4f} | {steps:,} | {secs} |" for name, acc, steps, secs in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir.resolve()
    if (absent := missing_agnews(data_dir)) is not None:
        print(
            f"agnews_fedavg: {absent} not found; pass --data-dir <folder with agnews/alps/>", file=sys.stderr
        )
        return 2
    load_before, header = os.getloadavg(), results_header("agnews_fedavg", argv)
    config = build_config(args, data_dir)
    splits = load_splits(config.data, config.run.seed)
    run_dir = args.run_dir or new_run_dir(config)

    # One scorer on the full test file for both the start and the federated result.
    scorer = CentralEvaluator(full_test(config), splits)
    print("[untrained] scoring the starting model on the full test set", flush=True)
    untrained = scorer(GlobalState(), init_seed=config.run.seed)  # a fresh LoRA has B = 0: no delta yet
    federated = run_federated(config, run_dir, scorer)
    steps = federated["optimizer_steps"]
    print(f"[centralized] {steps} steps on all {len(splits.train)} training rows", flush=True)
    centralized = train_and_score(config, splits, splits.train, steps)

    result = {
        **header,
        "machine": machine(load_before[0]),
        "config": config_to_dict(config),
        "train_rows": len(splits.train),
        "test_rows": len(splits.test),
        "label_names": splits.label_names,
        "untrained": untrained,
        "federated": federated,
        "centralized": centralized,
    }
    write_results(result, args.out)
    print(f"\nresults written to {args.out}\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
