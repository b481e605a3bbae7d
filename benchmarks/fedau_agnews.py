"""FedAU against FedAvg on AG News when clients take part with unknown, unequal probabilities.

MiniLM-L6, LoRA r = 8 on query/value plus the head, inputs of 32 tokens; 10 clients with a
Dirichlet(0.3) label split of the training rows (at least 50 rows each). Every client is sampled
every round, and each is available with its own probability p_k ~ Beta(1, 2) (``[faults]
availability_beta``, mean 1/3): a client sits out a round with probability 1 - p_k, so the rare
clients' labels are under-represented in a plain average of whoever replies; a round that no client
is available in passes without an update (``server.min_replies = 0``), as in the paper. 40 rounds x
5 AdamW steps of batch 32, lr 3e-3 (the same for every run: the lr every rule picked on the
validation split in noniid_agnews.py, ``SEARCHED_LR``).

- ``fedavg``: the uniform average of the round's replies (the paper's "average participating");
- ``fedau``: FedAU's online estimate of 1/p_k (cutoff 50);
- ``fedau(known p)``: weights 1/p_k from the true probabilities (the paper's oracle).

Rows as in noniid_agnews.py: dev.tsv less a seeded 1,000-row validation split (its first 500 rows
evaluated each round) is the training data; the final score is on the seeded 2,000-row sample of
test.tsv.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fedau_agnews.py [--only 'fedau/*'] [--list]
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path
from typing import Any

from common import REPO, HeldOut, RunsFile, agnews_config, agnews_pieces_main, mean_std, run_scored, runs_by
from noniid_protocol import SEARCHED_LR, TOKENS, agnews_held_out

from client.faults import availability
from fedpeft.config import RunConfig

OUT = REPO / "benchmarks" / "results" / "fedau_agnews.json"
WORK = REPO / "runs" / "fedau-agnews"
SEEDS = (0, 1, 2)
CLIENTS = 10
METHODS = ("fedavg", "fedau", "fedau(known p)")
SETTING = {
    "run.rounds": 40,
    "data.num_clients": CLIENTS,
    "data.dirichlet_alpha": 0.3,
    "data.min_partition_size": 50,
    "server.fraction": 1.0,
    "server.min_clients": CLIENTS,
    "server.min_replies": 0,  # a round every client sits out (all absent) passes without an update
    "faults.availability_beta": [1.0, 2.0],
    "data.test_limit": 500,  # validation rows evaluated each round
    "train.local_steps": 5,
    "train.batch_size": 32,
    "train.eval_batch_size": 128,
    "train.lr": SEARCHED_LR,
    "model.max_length": TOKENS,
    "lora.rank": 8,
    "lora.alpha": 16.0,
}


def strategy_overrides(method: str, config: RunConfig) -> dict[str, Any]:
    if method == "fedavg":
        return {"strategy.name": "fedavg", "strategy.weighting": "uniform"}
    if method == "fedau":
        return {"strategy.name": "fedau"}
    known = {f"partition-{k}": availability(config.faults, config.run.seed, k) for k in range(CLIENTS)}
    return {"strategy.name": "fedau", "strategy.probabilities": known}


def run(held_out: HeldOut, data_dir: Path, name: str) -> dict[str, Any]:
    method, seed = name.split("/")[0], int(name.split("=")[-1])
    base = {
        **SETTING,
        "run.seed": seed,
        "data.source": str(held_out.files["train"]),
        "data.test_source": str(held_out.files["val"]),
    }
    config = agnews_config(data_dir, {**base, **strategy_overrides(method, agnews_config(data_dir, base))})
    run_dir = WORK / re.sub(r"[^\w.-]+", "-", name)
    result = run_scored(name, config, held_out.evaluator("test", config.lora), run_dir)
    return {
        "method": method,
        "seed": seed,
        "final_accuracy": result["test_accuracy"],
        "test_rows": len(held_out.sets["test"]),
        "availability": [availability(config.faults, seed, k) for k in range(CLIENTS)],
        "curve": [result["curve"][k] for k in sorted(result["curve"], key=int)],
        "optimizer_steps": result["optimizer_steps"],
        "seconds": result["seconds"],
    }


def report(results: RunsFile) -> str:
    lines = [
        "| method | test accuracy, mean ± std | validation, mean of last 5 rounds | client steps | seeds |",
        "|---|---:|---:|---:|---|",
    ]
    for method, runs in runs_by(results, "method", METHODS):
        accs = [r["final_accuracy"] for r in runs]
        recent = statistics.fmean(statistics.fmean(r["curve"][-5:]) for r in runs)
        steps = statistics.fmean(r["optimizer_steps"] for r in runs)
        lines.append(
            f"| {method} | {mean_std(accs)} | {recent:.4f} | {steps:.0f} | "
            + ", ".join(f"{a:.4f}" for a in accs)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = [f"{method}/seed={seed}" for seed in SEEDS for method in METHODS]
    return agnews_pieces_main("fedau_agnews", __doc__, names, run, report, agnews_held_out, argv)


if __name__ == "__main__":
    sys.exit(main())
