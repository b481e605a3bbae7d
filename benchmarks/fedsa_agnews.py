"""Personalization on AG News under label skew: FedSA-LoRA's per-client models against fedavg's
global model and against each client training alone, all scored on each client's own rows.

MiniLM-L6, LoRA r = 8 on query/value plus the head, inputs of 32 tokens; 10 clients with a
Dirichlet(0.1) label split of the training rows (at least 50 rows each), each holding out a seeded
20% of its rows (``data.client_eval_fraction``). All 10 clients train every round, 5 rounds x 20
AdamW steps of batch 32, lr 3e-3 (the lr every rule and the centralized baseline picked on the
validation split in noniid_agnews.py, ``SEARCHED_LR``, on this very setting). Each client's score
is the accuracy, on its own held-out rows, of the model it would use after the 5 rounds: for fedsa
the global A with its own B, for fedavg the global model. The clients report that accuracy at the
start of a round, so the runs go one round further and read that sixth round's report (its
training is not counted). Local-only: each client alone, 100 steps on its own rows (what it trains
in the federation), from the same initial adapter. The figure is the mean over the 10 clients.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fedsa_agnews.py [--only 'fedsa/*'] [--list]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import REPO, HeldOut, RunsFile, agnews_config, agnews_pieces_main, mean_std, run_scored, runs_by
from flwr.app import Context, RecordDict
from noniid_protocol import LABELS, SEARCHED_LR, TOKENS, agnews_held_out

from client import runtime
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.training import evaluate, train

OUT = REPO / "benchmarks" / "results" / "fedsa_agnews.json"
WORK = REPO / "runs" / "fedsa-agnews"
SEEDS = (0, 1, 2)
CLIENTS, ROUNDS, STEPS = 10, 5, 20
METHODS = ("fedsa", "fedavg", "local")
SETTING = {
    "run.rounds": ROUNDS + 1,  # the last round's reports score the models after ROUNDS rounds
    "data.num_clients": CLIENTS,
    "data.dirichlet_alpha": 0.1,
    "data.min_partition_size": 50,
    "data.client_eval_fraction": 0.2,
    "data.labels": list(LABELS),
    "data.test_limit": 500,
    "server.fraction": 1.0,
    "server.min_clients": CLIENTS,
    "train.local_steps": STEPS,
    "train.batch_size": 32,
    "train.eval_batch_size": 128,
    "train.lr": SEARCHED_LR,
    "model.max_length": TOKENS,
    "lora.rank": 8,
    "lora.alpha": 16.0,
}


def federated(held_out: HeldOut, data_dir: Path, method: str, seed: int) -> dict[str, Any]:
    overrides = {**SETTING, "strategy.name": method, "run.seed": seed}
    files = {"data.source": str(held_out.files["train"]), "data.test_source": str(held_out.files["val"])}
    config = agnews_config(data_dir, overrides | files)
    run_dir = WORK / f"{method}-seed{seed}"
    result = run_scored(f"{method}/seed={seed}", config, held_out.evaluator("test", config.lora), run_dir)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    per_client = {r["client"]: r["client_eval_accuracy"] for r in last["replies"]}
    return {"per_client": dict(sorted(per_client.items())), "global_test_accuracy": result["test_accuracy"]}


def local_only(held_out: HeldOut, data_dir: Path, seed: int) -> dict[str, Any]:
    """Each client alone: its kept rows for ROUNDS x STEPS steps, scored on its held-out rows."""
    overrides = {**SETTING, "run.seed": seed, "data.source": str(held_out.files["train"])}
    config = agnews_config(data_dir, overrides)
    client = config.client_config()
    tokenizer = load_tokenizer(config.model.name)
    per_client = {}
    for k in range(CLIENTS):
        context = Context(0, k, {"partition-id": k}, RecordDict(), {})
        rows, held = runtime.client_splits(client, context)
        model = load_classifier(ClassifierSpec.from_config(config.model.name, len(LABELS), config.lora, seed))
        common = {"batch_size": config.train.batch_size, "lr": config.train.lr, "weight_decay": 0.0}
        train(model, tokenizer, rows, steps=ROUNDS * STEPS, seed=seed, **common)
        score = evaluate(model, tokenizer, held, config.train.eval_batch_size)["accuracy"]
        per_client[runtime.client_id(context)] = score
        print(f"[local] seed {seed} client {k}: {len(rows)} rows, held-out accuracy {score:.4f}", flush=True)
    return {"per_client": per_client}


def run(held_out: HeldOut, data_dir: Path, name: str) -> dict[str, Any]:
    method, seed = name.split("/")[0], int(name.split("=")[-1])
    if method == "local":
        out = local_only(held_out, data_dir, seed)
    else:
        out = federated(held_out, data_dir, method, seed)
    return {
        "method": method,
        "seed": seed,
        "mean_client_accuracy": statistics.fmean(out["per_client"].values()),
        "optimizer_steps_per_client": ROUNDS * STEPS,
        **out,
    }


def report(results: RunsFile) -> str:
    lines = [
        "| method | mean per-client accuracy, mean ± std | worst client (mean over seeds) | seeds |",
        "|---|---:|---:|---|",
    ]
    for method, runs in runs_by(results, "method", METHODS):
        means = [r["mean_client_accuracy"] for r in runs]
        worst = statistics.fmean(min(r["per_client"].values()) for r in runs)
        seeds = ", ".join(f"{m:.4f}" for m in means)
        lines.append(f"| {method} | {mean_std(means)} | {worst:.4f} | {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = [f"{method}/seed={seed}" for seed in SEEDS for method in METHODS]
    return agnews_pieces_main("fedsa_agnews", __doc__, names, run, report, agnews_held_out, argv)


if __name__ == "__main__":
    sys.exit(main())
