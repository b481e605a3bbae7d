"""GSM8K on SmolLM2-135M-Instruct: exact match on a fixed 200-question test subset before and
after federated training.

What it measures. ``simulations/gsm8k_smollm2.toml`` (10 IID clients over GSM8K's 7,473 training
problems, FedAvg) runs ``--rounds`` rounds of ``--local-steps`` steps on ``--fraction`` of the
clients through Flower's simulation engine, without per-round evaluation. The starting model and
the final global adapter are then scored on ``--questions`` test questions drawn once with
``random.Random(--subset-seed)``: greedy decoding of up to 256 new tokens, exact match of the
number after "####" (else the last number in the answer) against the reference's "#### <n>",
and the held-out loss on the reference solutions of the same questions.

Run from the repository root after ``fedpeft models fetch smollm2-135m-instruct``:

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/llm_gsm8k.py
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

from common import DEFAULT_DATA_DIR, REPO, machine, results_header, write_results
from llm_common import run_federated, shape_overrides, simulation_config

from fedpeft.config import config_to_dict
from fedpeft.data import Splits, load_instruction_splits
from fedpeft.state import GlobalState
from server.evaluation import LMEvaluator

SIMULATION = "gsm8k_smollm2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding gsm8k/")
    p.add_argument("--rounds", type=int, help=f"default: as in simulations/{SIMULATION}.toml")
    p.add_argument("--local-steps", type=int, help="default: as in the simulation file")
    p.add_argument(
        "--fraction", type=float, help="share of clients sampled per round (default: as in the file)"
    )
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "llm_gsm8k.json")
    return p.parse_args(argv)


def markdown_table(result: dict[str, Any]) -> str:
    cfg, fed = result["config"], result["federated"]
    rounds, steps = cfg["run"]["rounds"], cfg["train"]["local_steps"]
    shape = f"{rounds} rounds × {result['clients_per_round']} clients × {steps}"
    lines = [
        f"| model | exact match ({result['questions']} questions) | held-out loss | optimizer steps "
        "| wall time |",
        "|---|---:|---:|---:|---:|",
        f"| SmolLM2-135M-Instruct, no training | {result['untrained']['eval_exact_match']:.3f} "
        f"| {result['untrained']['eval_loss']:.4f} | 0 | – |",
        f"| federated FedAvg, 10 IID clients ({shape} steps) | {fed['eval_exact_match']:.3f} "
        f"| {fed['eval_loss']:.4f} | {fed['optimizer_steps']} | {fed['seconds']:.0f} s |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir.resolve()
    if not (data_dir / "gsm8k" / "test.jsonl").is_file():
        print(f"llm_gsm8k: no gsm8k/test.jsonl in {data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    load_before, header = os.getloadavg(), results_header("llm_gsm8k", argv)
    overrides = {
        "run.name": "llm-gsm8k",
        "server.evaluate": False,  # scored below, before and after, on the seeded subset
        **shape_overrides(args),
    }
    config = simulation_config(SIMULATION, data_dir, overrides)
    config = config.replace(
        data=config.data.replace(test_limit=None)
    )  # the seeded subset below replaces the first 16
    splits = load_instruction_splits(config.data)
    chosen = sorted(random.Random(args.subset_seed).sample(range(len(splits.test)), args.questions))
    scorer = LMEvaluator(config, Splits(splits.train, splits.test.select(chosen), []))
    print(f"[untrained] generating answers to {args.questions} test questions", flush=True)
    untrained = scorer(GlobalState(), init_seed=config.run.seed)
    print(f"[untrained] exact match {untrained['eval_exact_match']:.3f}", flush=True)
    state, facts = run_federated(config, REPO / "runs" / "llm-gsm8k")
    print("[federated] generating answers with the final global adapter", flush=True)
    federated = {**facts, **scorer(state, init_seed=0)}

    result = {
        **header,
        "machine": machine(load_before[0]),
        "config": config_to_dict(config),
        "clients_per_round": config.clients_per_round,
        "questions": args.questions,
        "question_indices": chosen,
        "untrained": untrained,
        "federated": federated,
    }
    write_results(result, args.out)
    print(f"\nresults written to {args.out}\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
