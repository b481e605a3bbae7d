"""Dolly-15k on SmolLM2-135M-Instruct: held-out loss before training, after federated training
(FedAvg and stacking, 10 non-IID clients) and after centralized training with the same steps.

What it measures. ``simulations/dolly_smollm2.toml`` (10 clients, client k = dolly's
``local_training_k.json``, each holding 2-3 of the 8 categories) is run twice through Flower's
simulation engine, once with FedAvg and once with stacking (FLoRA), for ``--rounds`` rounds of
``--local-steps`` steps on ``--fraction`` of the clients. The centralized run trains the same
model from the same seeded LoRA start on all clients' rows pooled, for as many optimizer steps as
one federated run took in total. All are scored by the server's evaluator: token-weighted mean
cross-entropy on the response tokens of ``global_test.json`` (80 rows, 10 per category; rows
whose response does not fit in ``model.max_length`` tokens are skipped, the count is printed).

Run from the repository root after ``fedpeft models fetch smollm2-135m-instruct``:

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/llm_dolly.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common import DEFAULT_DATA_DIR, REPO, machine, results_header, write_results
from llm_common import run_centralized, run_federated, shape_overrides, simulation_config

from fedpeft.config import config_to_dict
from fedpeft.data import load_instruction_splits
from fedpeft.state import GlobalState
from server.evaluation import LMEvaluator

SIMULATION = "dolly_smollm2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding dolly15k_fedit_10clients/"
    )
    p.add_argument("--rounds", type=int, help=f"default: as in simulations/{SIMULATION}.toml")
    p.add_argument("--local-steps", type=int, help="default: as in the simulation file")
    p.add_argument(
        "--fraction", type=float, help="share of clients sampled per round (default: as in the file)"
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "llm_dolly.json")
    return p.parse_args(argv)


def markdown_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rounds, steps = cfg["run"]["rounds"], cfg["train"]["local_steps"]
    shape = f"{rounds} rounds × {result['clients_per_round']} clients × {steps} steps"
    rows = [("SmolLM2-135M-Instruct, no training", result["untrained"], 0, None)]
    for name in ("fedavg", "stacking"):
        fed = result[name]
        rows.append(
            (f"federated {name}, 10 non-IID clients ({shape})", fed, fed["optimizer_steps"], fed["seconds"])
        )
    cen = result["centralized"]
    rows.append(("centralized, all clients' rows pooled", cen, cen["optimizer_steps"], cen["seconds"]))
    lines = [
        f"| run | held-out loss ({result['test_rows_scored']} rows) | perplexity | optimizer steps "
        "| wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, scores, steps, seconds in rows:
        wall = "–" if seconds is None else f"{seconds:.0f} s"
        lines.append(
            f"| {name} | {scores['eval_loss']:.4f} | {scores['eval_perplexity']:.2f} | {steps} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir.resolve()
    if not (data_dir / "dolly15k_fedit_10clients" / "global_test.json").is_file():
        print(f"llm_dolly: no dolly15k_fedit_10clients/ in {data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    load_before, header = os.getloadavg(), results_header("llm_dolly", argv)
    base = simulation_config(SIMULATION, data_dir, shape_overrides(args))
    splits = load_instruction_splits(base.data)
    scorer = LMEvaluator(base, splits)
    print(f"[untrained] scoring on {len(scorer.data)} of {len(splits.test)} test rows", flush=True)
    result: dict[str, Any] = {"untrained": scorer(GlobalState(), init_seed=base.run.seed)}
    for name in ("fedavg", "stacking"):
        config = base.replace(
            strategy=base.strategy.replace(name=name), run=base.run.replace(name=f"llm-dolly-{name}")
        )
        state, facts = run_federated(config, REPO / "runs" / f"llm-dolly-{name}")
        result[name] = {**facts, **scorer(state, init_seed=0)}
    result["centralized"] = run_centralized(base, splits, result["fedavg"]["optimizer_steps"], scorer)

    result = {
        **header,
        "machine": machine(load_before[0]),
        "config": config_to_dict(base),
        "clients_per_round": base.clients_per_round,
        "train_rows": len(splits.train),
        "test_rows": len(splits.test),
        "test_rows_scored": len(scorer.data),
        "test_rows_truncated": scorer.data.truncated,
        **result,
    }
    write_results(result, args.out)
    print(f"\nresults written to {args.out}\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
