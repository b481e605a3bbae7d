"""AG News: every aggregation strategy under one budget, next to centralized and local-only LoRA.

10 clients hold a Dirichlet(alpha = 0.1) label split of AG News (strongly non-IID); every
federated run uses the same rounds, clients per round, local steps, batch size and learning rate.
Reported per run: final accuracy of the global adapter on a seeded random sample of
``--final-test-rows`` test rows (default 2,000 of 7,600: scoring one model on all of them takes
minutes on 2 cores, and there are 19 models to score), bytes up
and down per round, server aggregation time per round, epsilon for the DP runs, wall time. The
baselines train the same model for the same number of optimizer steps on all the training rows
(centralized) or on one client's rows only (local-only, mean over the clients). A PNG shows the
accuracy per round on the first ``--test-limit`` test rows.

Stacking runs twice: with client ranks mixed 4/8/16 (the case it exists for) and at rank 8 like
the others; fedavg, fedex, vcma and ffa average factors and need one rank.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/strategies_agnews.py [--only fedavg,ffa]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
    REPO,
    agnews_config,
    comparison_overrides,
    comparison_parser,
    full_test,
    local_only,
    machine,
    missing_agnews,
    results_header,
    run_scored,
    sample_test,
    train_and_score,
    write_results,
)

from fedpeft.config import config_to_dict  # noqa: E402
from fedpeft.data import load_splits  # noqa: E402
from fedpeft.state import GlobalState  # noqa: E402
from server.evaluation import CentralEvaluator  # noqa: E402


def strategy_runs(clip_norm: float, noise_levels: list[float]) -> dict[str, dict[str, Any]]:
    """Label -> config overrides of every federated run."""
    runs: dict[str, dict[str, Any]] = {
        "fedavg": {"strategy.name": "fedavg"},
        "stacking (ranks 4/8/16)": {"strategy.name": "stacking", "lora.client_ranks": [4, 8, 16]},
        "stacking": {"strategy.name": "stacking"},
        "vcma": {"strategy.name": "vcma"},
        "fedex": {"strategy.name": "fedex"},
        "ffa": {"strategy.name": "ffa"},
    }
    for z in noise_levels:
        runs[f"dp(ffa) z={z:g}"] = {
            "strategy.name": "dp",
            "strategy.inner": "ffa",
            "strategy.clip_norm": clip_norm,
            "strategy.noise_multiplier": z,
        }
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = comparison_parser(__doc__.splitlines()[0], REPO / "benchmarks" / "results" / "strategies_agnews.json")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0], help="DP noise multipliers")
    return p.parse_args(argv)


def run_one(
    label: str, overrides: dict[str, Any], scorer: CentralEvaluator, data_dir: Path
) -> dict[str, Any]:
    name = label.replace(" ", "").replace("/", "-").replace("(", "-").replace(")", "")
    metrics = ("epsilon", "median_update_norm", "clipped_fraction", "merged_rank")
    config = agnews_config(data_dir, overrides)
    return run_scored(label, config, scorer, REPO / "runs" / f"strategies-agnews-{name}", metrics)


def last_rounds_mean(curve: dict[Any, float], last: int = 3) -> float:
    """Mean curve accuracy over the last rounds: under strong non-IID the global model swings from
    round to round, and one final round is a noisy summary."""
    rounds = sorted(curve, key=int)[-last:]
    return sum(curve[k] for k in rounds) / len(rounds)


def table(result: dict[str, Any]) -> str:
    dash = "–"
    lines = [
        "| run | final test accuracy | last-3-rounds mean (curve) | up / round | down / round "
        "| aggregation / round | ε (δ=1e-5) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in result["federated"].items():
        cells = [
            label,
            f"{r['test_accuracy']:.4f}",
            f"{last_rounds_mean(r['curve']):.4f}",
            f"{r['bytes_up_per_round'] / 1e6:.2f} MB",
            f"{r['bytes_down_per_round'] / 1e6:.2f} MB",
            f"{r['aggregation_seconds_per_round'] * 1e3:.1f} ms",
            f"{r['epsilon']:.1f}" if "epsilon" in r else dash,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = [("untrained", f"{result['untrained']['eval_accuracy']:.4f}")]
    if "centralized" in result:
        c = result["centralized"]
        baselines.append(
            (f"centralized LoRA ({c['optimizer_steps']} steps, all rows)", f"{c['test_accuracy']:.4f}")
        )
    if "local_only" in result:
        lo = result["local_only"]
        spread = (
            f"{lo['test_accuracy_mean']:.4f} [{lo['test_accuracy_min']:.4f}, {lo['test_accuracy_max']:.4f}]"
        )
        name = (
            f"local-only ({lo['optimizer_steps_per_client']} steps on own rows; mean [min, max] of clients)"
        )
        baselines.append((name, spread))
    lines += [f"| {name} | {acc} | {dash} | {dash} | {dash} | {dash} | {dash} |" for name, acc in baselines]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, r in result["federated"].items():
        rounds = sorted(int(k) for k in r["curve"])
        ax.plot(
            rounds,
            [r["curve"][k] if k in r["curve"] else r["curve"][str(k)] for k in rounds],
            marker="o",
            label=label,
        )
    for key, style in (("centralized", "--"), ("local_only", ":")):
        if key in result:
            value = result[key].get("test_accuracy", result[key].get("test_accuracy_mean"))
            ax.axhline(value, color="gray", linestyle=style, label=key.replace("_", "-"))
    ax.set(
        xlabel="round",
        ylabel=f"accuracy (first {result['test_limit']} test rows)",
        title="AG News, 10 clients, Dirichlet α=0.1",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_dir = args.data_dir.resolve()
    if (absent := missing_agnews(data_dir)) is not None:
        print(
            f"strategies_agnews: {absent} not found; pass --data-dir <folder with agnews/alps/>",
            file=sys.stderr,
        )
        return 2
    load_before = os.getloadavg()[0]
    common = comparison_overrides(args)
    runs = strategy_runs(args.clip_norm, args.noise)
    selected = args.only.split(",") if args.only else list(runs)
    base = agnews_config(data_dir, common)
    splits = sample_test(load_splits(base.data, base.run.seed), args.final_test_rows, args.seed)
    scorer = CentralEvaluator(full_test(base), splits)
    result: dict[str, Any] = {
        **results_header("strategies_agnews", argv),
        "config": config_to_dict(base),
        "final_test_rows": len(splits.test),
        "test_limit": args.test_limit,
        "untrained": scorer(GlobalState(), init_seed=args.seed),
        "federated": {
            label: run_one(label, {**common, **runs[label]}, scorer, data_dir) for label in selected
        },
    }
    if not args.only:
        steps = next(iter(result["federated"].values()))["optimizer_steps"]
        print(f"\n[centralized] {steps} steps on all {len(splits.train)} rows", flush=True)
        result["centralized"] = train_and_score(base, splits, splits.train, steps)
        result["local_only"] = local_only(base, splits, args.rounds * args.local_steps)
    result["machine"] = machine(load_before)
    write_results(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    print(f"\nresults: {args.out} and {args.out.with_suffix('.png')}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
