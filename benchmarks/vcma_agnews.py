"""VCMA against FedAvg on AG News, with clients that initialise their adapters independently
(``lora.init = "per_client"``, what VCMA exists for) and with the shared seeded init (the control).

MiniLM-L6, LoRA r = 8 on query/value plus the head; 10 clients with a Dirichlet(1.0) label split of
the training rows; all 10 train each round, 5 rounds x 10 AdamW steps of batch 32, lr 1e-3 (the
same for every run: no search, the comparison is of one knob). Rows as in noniid_agnews.py: dev.tsv
less a seeded 1,000-row validation split is the training data; the final score is on the same
seeded 2,000-row sample of test.tsv. Recorded per run and round: ``variance_ratio``, the variance of
the global A the server keeps over the clients' mean variance of A (about 1/K = 0.1 after a plain
average of independent A's); for vcma also the ratio of the plain average before its correction.

vcma runs at the authors' fixed epsilon (1e-4) and at 1e-8: the first is large next to the variance
of a LoRA A (about 9e-4 for MiniLM's 384-wide layers), so it leaves part of the shrinkage.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vcma_agnews.py [--only 'per_client/*'] [--list]
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import REPO, HeldOut, RunsFile, agnews_config, agnews_pieces_main, mean_std, run_scored
from noniid_protocol import agnews_held_out

OUT = REPO / "benchmarks" / "results" / "vcma_agnews.json"
WORK = REPO / "runs" / "vcma-agnews"
SEEDS = (0, 1, 2)
METHODS = {  # label -> [strategy] overrides
    "fedavg": {"strategy.name": "fedavg"},
    "vcma": {"strategy.name": "vcma"},
    "vcma(eps=1e-8)": {"strategy.name": "vcma", "strategy.epsilon": 1e-8},
}
SETTING = {
    "run.rounds": 5,
    "data.num_clients": 10,
    "data.dirichlet_alpha": 1.0,
    "data.min_partition_size": 50,
    "server.fraction": 1.0,
    "server.min_clients": 10,
    "train.local_steps": 10,
    "train.batch_size": 32,
    "train.eval_batch_size": 128,
    "train.lr": 1e-3,
    "data.test_limit": 500,
    "lora.rank": 8,
    "lora.alpha": 16.0,
}


def pieces() -> list[tuple[str, str, str, int]]:
    """(name, init, method, seed) of every run; the epsilon variant only where the premise holds."""
    return [
        (f"{init}/{method}/seed={seed}", init, method, seed)
        for init in ("per_client", "shared")
        for method in METHODS
        for seed in SEEDS
        if init == "per_client" or method != "vcma(eps=1e-8)"
    ]


def run(held_out: HeldOut, data_dir: Path, name: str) -> dict[str, Any]:
    init, method, seed = next((i, m, s) for n, i, m, s in pieces() if n == name)
    overrides = {
        **SETTING,
        **METHODS[method],
        "run.seed": seed,
        "lora.init": init,
        "data.source": str(held_out.files["train"]),
        "data.test_source": str(held_out.files["test"]),
    }
    config = agnews_config(data_dir, overrides)
    run_dir = WORK / name.replace("/", "-").replace("=", "")
    result = run_scored(name, config, held_out.evaluator("test", config.lora), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]
    return {
        "init": init,
        "method": METHODS[method]["strategy.name"],
        "label": method,
        "vcma_epsilon": METHODS[method].get("strategy.epsilon", 1e-4) if method != "fedavg" else None,
        "seed": seed,
        "final_accuracy": result["test_accuracy"],
        "test_rows": len(held_out.sets["test"]),
        "variance_ratio": [r["variance_ratio"] for r in rounds],
        "variance_ratio_averaged": [
            r["variance_ratio_averaged"] for r in rounds if "variance_ratio_averaged" in r
        ],
        "curve": [result["curve"][k] for k in sorted(result["curve"], key=int)],
        "seconds": result["seconds"],
    }


def report(results: RunsFile) -> str:
    lines = [
        "| init | method | test accuracy, mean ± std | variance ratio per round (mean over seeds) | seeds |",
        "|---|---|---:|---|---|",
    ]
    for init in ("per_client", "shared"):
        for method in METHODS:
            runs = [r for r in results.data["runs"] if r["init"] == init and r["label"] == method]
            if not runs:
                continue
            accs = [r["final_accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
            ratios = [statistics.fmean(v) for v in zip(*(r["variance_ratio"] for r in runs), strict=True)]
            lines.append(
                f"| {init} | {method} | {mean_std(accs)} | "
                + ", ".join(f"{v:.3f}" for v in ratios)
                + " | "
                + ", ".join(f"{a:.4f}" for a in accs)
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = [name for name, *_ in pieces()]
    held_out = functools.partial(agnews_held_out, tokens=None)  # this benchmark keeps 64-token inputs
    return agnews_pieces_main("vcma_agnews", __doc__, names, run, report, held_out, argv)


if __name__ == "__main__":
    sys.exit(main())
