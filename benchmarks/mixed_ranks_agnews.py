"""Clients at different LoRA ranks on AG News: stacking against hetlora and flexlora.

MiniLM-L6, LoRA on query/value plus the head, inputs of 32 tokens; 10 clients with a Dirichlet(0.5)
label split of the training rows (at least 50 rows each) at ranks 4, 8 and 16 (cycled over the
clients; the global adapter of hetlora and flexlora is rank 16, alpha 16 for every client). All 10
clients train every round, 5 rounds x 10 AdamW steps of batch 32, lr 3e-3 (the same for every run:
the lr every rule picked on the validation split in noniid_agnews.py, ``SEARCHED_LR``). Recorded per
run: the final accuracy, bytes up and down per round, and the server's aggregation time per round.
``hetlora(examples)`` is hetlora with fedavg's example weights instead of the paper's
norm-proportional ("sparsity") weights: the ablation that tells the two apart.

Rows as in noniid_agnews.py: dev.tsv less a seeded 1,000-row validation split (its first 500 rows
evaluated each round) is the training data; the final score is on the seeded 2,000-row sample of
test.tsv.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mixed_ranks_agnews.py [--only 'hetlora/*'] [--list]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from common import REPO, HeldOut, RunsFile, agnews_config, agnews_pieces_main, mean_std, run_scored, runs_by
from noniid_protocol import SEARCHED_LR, TOKENS, agnews_held_out

OUT = REPO / "benchmarks" / "results" / "mixed_ranks_agnews.json"
WORK = REPO / "runs" / "mixed-ranks-agnews"
SEEDS = (0, 1, 2)
METHODS = ("stacking", "hetlora", "flexlora", "hetlora(examples)")
STRATEGIES = {  # a method's strategy settings, where its name is not the strategy's
    "hetlora(examples)": {"strategy.name": "hetlora", "strategy.weighting": "examples"},
}
RANKS = [4, 8, 16]
SETTING = {
    "run.rounds": 5,
    "data.num_clients": 10,
    "data.dirichlet_alpha": 0.5,
    "data.min_partition_size": 50,
    "data.test_limit": 500,  # validation rows evaluated each round
    "server.fraction": 1.0,
    "server.min_clients": 10,
    "train.local_steps": 10,
    "train.batch_size": 32,
    "train.eval_batch_size": 128,
    "train.lr": SEARCHED_LR,
    "model.max_length": TOKENS,
    "lora.rank": max(RANKS),
    "lora.client_ranks": RANKS,
    "lora.alpha": 16.0,
}


def run(held_out: HeldOut, data_dir: Path, name: str) -> dict[str, Any]:
    method, seed = name.split("/")[0], int(name.split("=")[-1])
    overrides = {
        **SETTING,
        "strategy.name": method,
        **STRATEGIES.get(method, {}),
        "run.seed": seed,
        "data.source": str(held_out.files["train"]),
        "data.test_source": str(held_out.files["val"]),
    }
    run_dir = WORK / name.replace("/", "-").replace("=", "")
    config = agnews_config(data_dir, overrides)
    result = run_scored(name, config, held_out.evaluator("test", config.lora), run_dir)
    return {
        "method": method,
        "seed": seed,
        "client_ranks": RANKS,
        "final_accuracy": result["test_accuracy"],
        "test_rows": len(held_out.sets["test"]),
        "curve": [result["curve"][k] for k in sorted(result["curve"], key=int)],
        "bytes_up_per_round": result["bytes_up_per_round"],
        "bytes_down_per_round": result["bytes_down_per_round"],
        "aggregation_seconds_per_round": result["aggregation_seconds_per_round"],
        "seconds": result["seconds"],
    }


def report(results: RunsFile) -> str:
    lines = [
        "| method | test accuracy, mean ± std | MB up / round | MB down / round "
        "| aggregation s / round (median of the runs) | seeds |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for method, runs in runs_by(results, "method", METHODS):
        accs = [r["final_accuracy"] for r in runs]
        up = statistics.fmean(r["bytes_up_per_round"] for r in runs)
        down = statistics.fmean(r["bytes_down_per_round"] for r in runs)
        seconds = statistics.median(r["aggregation_seconds_per_round"] for r in runs)
        lines.append(
            f"| {method} | {mean_std(accs)} | {up / 1e6:.2f} | {down / 1e6:.2f} | "
            f"{seconds:.3f} | " + ", ".join(f"{a:.4f}" for a in accs) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = [f"{method}/seed={seed}" for seed in SEEDS for method in METHODS]
    return agnews_pieces_main("mixed_ranks_agnews", __doc__, names, run, report, agnews_held_out, argv)


if __name__ == "__main__":
    sys.exit(main())
