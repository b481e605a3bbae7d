"""AG News with one poisoned client of 10: plain FedAvg against median, trimmed mean and clipping.

Every round all ``--clients`` (10) clients train; client ``--poisoned`` sends its update scaled by
``--scale`` (100): the delta from the adapter it received, times 100 (``[faults] poisoned`` and
``poison_scale``, applied in the ClientApp). Every run uses the same seed, label split, rounds,
local steps and learning rate, so the runs differ only in the poisoning and the aggregation rule.
Reported per run: accuracy of the final global adapter on a seeded random sample of
``--final-test-rows`` test rows (the same rows for every run), the per-round curve on the first
``--test-limit`` test rows, and the difference to clean FedAvg in points. Done when: each robust
rule keeps accuracy within 1 point of clean FedAvg while poisoned FedAvg does not.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/poisoning.py [--only "clean median"]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from common import (
    REPO,
    agnews_config,
    comparison_overrides,
    comparison_parser,
    full_test,
    machine,
    missing_agnews,
    results_header,
    run_scored,
    sample_test,
    write_results,
)

from fedpeft.config import config_to_dict
from fedpeft.data import load_splits, partition
from fedpeft.state import GlobalState
from server.evaluation import CentralEvaluator

CLEAN = "clean fedavg"
ROBUST = {
    "median": {"strategy.name": "median"},
    "trimmed_mean": {"strategy.name": "trimmed_mean", "strategy.beta": 0.1},
    "clip(fedavg)": {"strategy.name": "clip", "strategy.inner": "fedavg", "strategy.median_multiple": 2.0},
}
NORM_CHECK = 10.0  # the server's default: refuse an update 10 x longer than the round's median
TOLERANCE = 0.01  # the done-when: within 1 point of clean FedAvg
METRICS = ("median_update_norm", "clipped_fraction", "clip_bound")


def runs(poisoned: int, scale: float) -> dict[str, dict[str, Any]]:
    """Label -> config overrides: the runs the done-when needs first, then the robust rules clean,
    then FedAvg behind the server's own norm check (off in every other run, so that the
    aggregation rules are measured on their own)."""
    poison = {"faults.poisoned": [poisoned], "faults.poison_scale": scale}
    out: dict[str, dict[str, Any]] = {CLEAN: {"strategy.name": "fedavg"}}
    out["poisoned fedavg"] = {"strategy.name": "fedavg", **poison}
    out |= {f"poisoned {name}": {**overrides, **poison} for name, overrides in ROBUST.items()}
    out |= {f"clean {name}": overrides for name, overrides in ROBUST.items()}
    out = {label: {**overrides, "server.max_norm_ratio": 0.0} for label, overrides in out.items()}
    out[f"poisoned fedavg + server.max_norm_ratio {NORM_CHECK:g}"] = {
        "strategy.name": "fedavg",
        **poison,
        "server.max_norm_ratio": NORM_CHECK,
    }
    return out


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table, and the done-when per poisoned run."""
    clean = result["federated"][CLEAN]["test_accuracy"]
    lines = [
        f"| run | test accuracy ({result['final_test_rows']:,} rows) | vs clean FedAvg "
        "| curve (first rows, per round) | clipped fraction (last round) | wall time |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for label, r in result["federated"].items():
        curve = ", ".join(f"{r['curve'][k]:.2f}" for k in sorted(r["curve"], key=int))
        clipped = f"{r['clipped_fraction']:.1f}" if "clipped_fraction" in r else "–"
        delta = f"{100 * (r['test_accuracy'] - clean):+.1f} pt" if label != CLEAN else "–"
        lines.append(
            f"| {label} | {r['test_accuracy']:.4f} | {delta} | {curve} | {clipped} | {r['seconds']:.0f} s |"
        )
    lines.append(f"| untrained | {result['untrained']['eval_accuracy']:.4f} | – | – | – | – |")
    lines.append("")
    lines += [
        f"{label}: {'within' if ok else 'NOT within'} 1 point of clean FedAvg"
        for label, ok in verdict(result).items()
    ]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    """Per poisoned run: is its accuracy within ``TOLERANCE`` of clean FedAvg?"""
    clean = result["federated"][CLEAN]["test_accuracy"]
    return {
        label: abs(r["test_accuracy"] - clean) <= TOLERANCE
        for label, r in result["federated"].items()
        if label.startswith("poisoned")
    }


def main(argv: list[str] | None = None) -> int:
    p = comparison_parser(
        __doc__.splitlines()[0],
        REPO / "benchmarks" / "results" / "poisoning.json",
        rounds=5,
        alpha=1.0,
        fraction=1.0,
        lr=2e-3,
    )
    p.add_argument("--poisoned", type=int, default=0, help="partition id of the poisoned client")
    p.add_argument("--scale", type=float, default=100.0, help="factor on the poisoned client's delta")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where the run directories go")
    p.add_argument("--report", action="store_true", help="only print the table of the results file")
    args = p.parse_args(argv)
    if args.report:
        print(table(json.loads(args.out.read_text())))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_dir = args.data_dir.resolve()
    if (absent := missing_agnews(data_dir)) is not None:
        print(f"poisoning: {absent} not found; pass --data-dir <folder with agnews/alps/>", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    common = comparison_overrides(args)
    all_runs = runs(args.poisoned, args.scale)
    selected = [label.strip() for label in args.only.split(",")] if args.only else list(all_runs)
    if CLEAN not in selected:
        selected.insert(0, CLEAN)  # every other run is compared with it
    base = agnews_config(data_dir, common)
    splits = sample_test(load_splits(base.data, base.run.seed), args.final_test_rows, args.seed)
    scorer = CentralEvaluator(full_test(base), splits)
    result: dict[str, Any] = {
        **results_header("poisoning", argv),
        "config": config_to_dict(base),
        "poisoned_client": args.poisoned,
        "poisoned_client_rows": len(partition(splits.train, base.data, args.poisoned, base.run.seed)),
        "poison_scale": args.scale,
        "final_test_rows": len(splits.test),
        "test_limit": args.test_limit,
        "untrained": scorer(GlobalState(), init_seed=args.seed),
        "federated": {},
    }
    for label in selected:
        config = agnews_config(data_dir, {**common, **all_runs[label]})
        name = label.replace(" ", "-").replace("(", "-").replace(")", "")
        run_dir = args.runs_dir / f"poisoning-{name}"
        scored = run_scored(label, config, scorer, run_dir, METRICS)
        result["federated"][label] = {"overrides": all_runs[label], **scored}
        result["within_1_point_of_clean_fedavg"] = verdict(result)
        result["machine"] = machine(load_before)
        write_results(result, args.out)  # after every run: a long benchmark keeps what it measured
    print(f"\nresults: {args.out}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
