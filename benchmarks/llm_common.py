"""Shared pieces of the causal LM benchmarks: configuration from a simulation file, a federated
run through Flower's simulation engine, and a centralized run with the same number of steps."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from common import REPO

from fedpeft.config import RunConfig, load_config
from fedpeft.data import Splits
from fedpeft.instructions import encode_chats
from fedpeft.lora import extract_adapter
from fedpeft.models import CausalLMSpec, load_causal_lm, load_tokenizer
from fedpeft.state import GlobalState
from fedpeft.training import train
from server.checkpoint import load_checkpoint
from server.evaluation import LMEvaluator
from server.simulation import simulate


def simulation_config(name: str, data_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """``simulations/<name>.toml`` with its ``../shared/data`` paths under ``data_dir`` and
    ``overrides`` (section.key -> value) applied."""
    path = REPO / "simulations" / f"{name}.toml"
    shared = (REPO.parent / "shared" / "data").resolve()
    file = load_config(path)  # its data paths are relative to the repository root
    moved = {
        key: str(data_dir / (REPO / value).resolve().relative_to(shared))
        for key, value in (("data.source", file.data.source), ("data.test_source", file.data.test_source))
    }
    items = {"run.output_dir": str(REPO / "runs"), **moved, **overrides}
    return load_config(path, [f"{k}={json.dumps(v)}" for k, v in items.items()])


def shape_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--rounds`` / ``--local-steps`` / ``--fraction`` given on the command line."""
    given = {
        "run.rounds": args.rounds,
        "train.local_steps": args.local_steps,
        "server.fraction": args.fraction,
    }
    return {key: value for key, value in given.items() if value is not None}


def run_federated(config: RunConfig, run_dir: Path) -> tuple[GlobalState, dict[str, Any]]:
    """Simulate ``config`` into a fresh ``run_dir``; the final global state and run facts."""
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[federated {config.strategy.name}] -> {run_dir}", flush=True)
    started = time.perf_counter()
    simulate(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rounds = [r for r in rows if r["round"] > 0]
    facts = {
        "run_dir": str(run_dir),
        "optimizer_steps": sum(r["clients_aggregated"] for r in rounds) * config.train.local_steps,
        "train_loss_per_round": [round(r["train_loss"], 4) for r in rounds],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return load_checkpoint(run_dir).state, facts


def run_centralized(config: RunConfig, splits: Splits, steps: int, scorer: LMEvaluator) -> dict[str, Any]:
    """The same model and seeded start trained on all training rows for ``steps``, then scored."""
    print(f"[centralized] {steps} steps on all {len(splits.train)} training rows", flush=True)
    started = time.perf_counter()
    model = load_causal_lm(CausalLMSpec.from_config(config.model, config.lora, config.run.seed))
    tokenizer = load_tokenizer(config.model.name)
    data = encode_chats(list(splits.train["messages"]), tokenizer, config.model.max_length)
    metrics = train(
        model,
        tokenizer,
        data,
        steps=steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        seed=config.run.seed,
        gradient_checkpointing=config.train.gradient_checkpointing,
        max_batch_tokens=config.train.max_batch_tokens,
        bf16_autocast=config.train.bf16_autocast,
    )
    factors, extras = extract_adapter(model)
    seconds = round(time.perf_counter() - started, 1)
    scores = scorer(GlobalState(adapter=factors, extras=extras), init_seed=0)
    return {
        "optimizer_steps": steps,
        "train_loss": round(metrics.train_loss, 4),
        "seconds": seconds,
        **scores,
    }
