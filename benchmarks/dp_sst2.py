"""SST-2 under differential privacy: client-level DP (100 clients) and example-level DP (10 clients)
at epsilon 1, 4 and 8 (delta 1e-5), next to the same federations without DP.

MiniLM-L6, LoRA r = 4 (alpha 8) on query/value plus the head, FFA (A frozen, only B and the head
trained: what ``dp`` is recommended around); IID split of SST-2's training rows less a seeded
1,000-row validation split; 10 rounds x 5 local AdamW steps of batch 16 at lr 1e-3 (no search: one
setting for every run). Final accuracy on all 1,821 rows of ``test-labeled.tsv``.

- client level: 100 clients, each sampled with probability 0.2 per round (Poisson, m = 20
  expected), ``dp(inner = "ffa")`` with adaptive clipping at the median norm (Andrew et al.), the
  noise multiplier set so that epsilon after the 10 rounds is the target (opacus' RDP accountant);
  the baseline is ffa with 20 clients sampled per round and no DP;
- example level: 10 clients, all every round, DP-SGD on each (per-example clipping at 1.0), the
  noise multiplier set so that every client's epsilon after its 50 steps is at most the target
  (sampling rate batch / rows of the smallest client); the baseline is the same without DP.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_sst2.py [--only 'client/*'] [--list]
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from common import REPO, HeldOut, RunsFile, pieces_parser, run_pieces, run_scored, write_splits
from opacus.accountants.utils import get_noise_multiplier

from fedpeft.config import RunConfig, load_config
from fedpeft.data import partition

OUT = REPO / "benchmarks" / "results" / "dp_sst2.json"
WORK = REPO / "runs" / "dp-sst2"
TRAIN, TEST = "sst2_glue/train_full.tsv", "sst2_glue/test-labeled.tsv"
EPSILONS, DELTA, SEEDS = (1.0, 4.0, 8.0), 1e-5, (0, 1, 2)
ROUNDS, LOCAL_STEPS, BATCH = 10, 5, 16
MODES = {"client": {"clients": 100, "rate": 0.2}, "example": {"clients": 10, "rate": 1.0}}
LABELS = ["0", "1"]


def base_config(files: dict[str, Path], mode: str, seed: int) -> dict[str, Any]:
    spec = MODES[mode]
    clients = spec["clients"]
    return {
        "run.seed": seed,
        "run.rounds": ROUNDS,
        "data.source": str(files["train"]),
        "data.test_source": str(files["test"]),
        "data.test_limit": 500,
        "data.columns": ["text", "label"],
        "data.labels": LABELS,
        "data.num_clients": clients,
        "data.partition": "iid",
        "server.fraction": spec["rate"],
        "server.min_clients": round(spec["rate"] * clients),
        "train.local_steps": LOCAL_STEPS,
        "train.batch_size": BATCH,
        "train.eval_batch_size": 128,
        "train.lr": 1e-3,
        "lora.rank": 4,
        "lora.alpha": 8.0,
        "strategy.name": "ffa",
    }


def private_config(
    overrides: dict[str, Any], mode: str, epsilon: float, smallest_client: int
) -> dict[str, Any]:
    """``overrides`` with client-level or example-level DP calibrated to ``epsilon`` at DELTA."""
    if mode == "client":
        rate = MODES["client"]["rate"]
        z = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=rate, steps=ROUNDS)
        return {
            **overrides,
            "strategy.name": "dp",
            "strategy.inner": "ffa",
            "strategy.noise_multiplier": z,
            "strategy.delta": DELTA,
            "strategy.clip_norm": 0.1,  # the starting norm: adaptive clipping takes it to the median
            "strategy.target_quantile": 0.5,
            "strategy.count_noise_std": max(overrides["server.min_clients"] / 20, 2 * z),
            "strategy.epsilon_budget": epsilon * 1.001,
        }
    rate = BATCH / smallest_client
    z = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=DELTA, sample_rate=rate, steps=ROUNDS * LOCAL_STEPS
    )
    return {
        **overrides,
        "example_dp.enabled": True,
        "example_dp.noise_multiplier": z,
        "example_dp.max_grad_norm": 1.0,
        "example_dp.delta": DELTA,
        "example_dp.epsilon_budget": epsilon * 1.001,
    }


def config_of(overrides: dict[str, Any]) -> RunConfig:
    import json

    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def pieces() -> list[tuple[str, str, float | None, int]]:
    return [
        (f"{mode}/{'none' if eps is None else f'eps={eps:g}'}/seed={seed}", mode, eps, seed)
        for mode in MODES
        for eps in (None, *EPSILONS)
        for seed in SEEDS
    ]


def run(held_out: HeldOut, files: dict[str, Path], name: str, mode: str, epsilon: float | None, seed: int):
    overrides = base_config(files, mode, seed)
    config = config_of(overrides)
    z = None
    if epsilon is not None:
        smallest = min(
            len(partition(held_out.train, config.data, k, seed)) for k in range(config.data.num_clients)
        )
        overrides = private_config(overrides, mode, epsilon, smallest)
        config = config_of(overrides)
        z = overrides.get("strategy.noise_multiplier", overrides.get("example_dp.noise_multiplier"))
    run_dir = WORK / name.replace("/", "-").replace("=", "")
    result = run_scored(name, config, held_out.evaluator("test"), run_dir, ("epsilon", "example_epsilon"))
    reached = result.get("epsilon", result.get("example_epsilon"))
    return {
        "mode": "none" if epsilon is None else mode,
        "setting": mode,
        "epsilon": epsilon,
        "epsilon_reached": reached,
        "delta": None if epsilon is None else DELTA,
        "noise_multiplier": z,
        "clients": config.data.num_clients,
        "seed": seed,
        "accuracy": result["test_accuracy"],
        "test_rows": len(held_out.sets["test"]),
        "curve": [result["curve"][k] for k in sorted(result["curve"], key=int)],
        "seconds": result["seconds"],
    }


def report(results: RunsFile) -> str:
    lines = ["| setting | epsilon | noise multiplier | accuracy, mean ± std | share of non-private | seeds |"]
    lines.append("|---|---:|---:|---:|---:|---|")
    for mode in MODES:
        plain = [r["accuracy"] for r in results.data["runs"] if r["setting"] == mode and r["epsilon"] is None]
        for eps in (None, *EPSILONS):
            runs = [r for r in results.data["runs"] if r["setting"] == mode and r["epsilon"] == eps]
            if not runs:
                continue
            accs = [r["accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            share = f"{statistics.fmean(accs) / statistics.fmean(plain):.1%}" if plain else "–"
            z = runs[0]["noise_multiplier"]
            z_cell, eps_cell = ("–" if z is None else f"{z:.3f}"), ("–" if eps is None else f"{eps:g}")
            lines.append(
                f"| {mode} level, {runs[0]['clients']} clients | {eps_cell} | {z_cell} | "
                f"{statistics.fmean(accs):.4f} ± {spread:.4f} | {share} | "
                + ", ".join(f"{a:.4f}" for a in accs)
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = pieces_parser(__doc__.splitlines()[0], OUT, "sst2_glue/").parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = RunsFile(args.out, "dp_sst2")
    data_dir = args.data_dir.resolve()
    missing = [f for f in (TRAIN, TEST) if not (data_dir / f).is_file()]
    if not (args.list or args.report) and missing:
        print(
            f"dp_sst2: {data_dir / missing[0]} not found; pass --data-dir <folder with sst2_glue/>",
            file=sys.stderr,
        )
        return 2
    runs = {name: (mode, eps, seed) for name, mode, eps, seed in pieces()}

    @functools.cache
    def held_out() -> tuple[HeldOut, dict[str, Path]]:
        read = lambda f: pd.read_csv(data_dir / f, sep="\t").rename(columns={"sentence": "text"})  # noqa: E731
        files = write_splits(read(TRAIN), read(TEST), WORK / "data", 1000, 10**9, 12345)
        return HeldOut(config_of(base_config(files, "client", 0)), files, LABELS), files

    run_pieces(results, list(runs), lambda name: run(*held_out(), name, *runs[name]), args)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
