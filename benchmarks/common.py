"""Shared pieces of the AG News benchmarks: data location, configuration, baselines, machine facts."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fedpeft.config import RunConfig, load_config
from fedpeft.data import Splits, partition
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.training import encode, evaluate, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
TRAIN_FILE, TEST_FILE = "agnews/alps/dev.tsv", "agnews/alps/test.tsv"


def missing_agnews(data_dir: Path) -> Path | None:
    """The first AG News file absent under ``data_dir``, if any."""
    return next((data_dir / f for f in (TRAIN_FILE, TEST_FILE) if not (data_dir / f).is_file()), None)


def agnews_config(data_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """A run on AG News (train: dev.tsv, test: test.tsv); ``overrides`` are section.key -> value."""
    base = {
        "run.output_dir": str(REPO / "runs"),
        "data.source": str(data_dir / TRAIN_FILE),
        "data.test_source": str(data_dir / TEST_FILE),
        "data.columns": ["text", "label"],
        "data.partition": "dirichlet",
    }
    items = {**base, **overrides}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


def full_test(config: RunConfig) -> RunConfig:
    """The same configuration, evaluating on the whole test file."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, test_limit=None))


def train_and_score(config: RunConfig, splits: Splits, rows: Any, steps: int) -> dict[str, Any]:
    """Train the run's model (same init) on ``rows`` for ``steps`` and score it on the test split."""
    spec = ClassifierSpec.from_config(
        config.model.name, len(splits.label_names), config.lora, config.run.seed
    )
    model = load_classifier(spec)
    tokenizer = load_tokenizer(config.model.name)
    started = time.perf_counter()
    metrics = train(
        model,
        tokenizer,
        encode(rows, tokenizer, config.model.max_length),
        steps=steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        seed=config.run.seed,
    )
    scores = evaluate(
        model,
        tokenizer,
        encode(splits.test, tokenizer, config.model.max_length),
        config.train.eval_batch_size,
    )
    return {
        "optimizer_steps": steps,
        "train_loss": metrics["train_loss"],
        "test_accuracy": scores["accuracy"],
        "test_loss": scores["loss"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def local_only(config: RunConfig, splits: Splits, steps: int) -> dict[str, Any]:
    """Every client trains alone on its own partition for ``steps``; accuracy over clients."""
    scores = []
    for k in range(config.data.num_clients):
        rows = partition(splits.train, config.data, k, config.run.seed)
        result = train_and_score(config, splits, rows, steps)
        print(
            f"[local-only] client {k}: {len(rows)} rows, accuracy {result['test_accuracy']:.4f}", flush=True
        )
        scores.append(result["test_accuracy"])
    return {
        "optimizer_steps_per_client": steps,
        "test_accuracy_mean": sum(scores) / len(scores),
        "test_accuracy_min": min(scores),
        "test_accuracy_max": max(scores),
        "per_client": scores,
    }


def code_version() -> dict[str, Any]:
    """The git commit measured, and the tracked files that differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "modified": git("diff", "--name-only", "HEAD").split()}


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine(load_before: float) -> dict[str, Any]:
    """What a figure was measured on; the 1-minute load average at start and end shows whether
    another process shared the CPU (then wall times are inflated)."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
