"""Shared pieces of the AG News benchmarks: data location, configuration, options, federated runs
scored on a test sample, baselines, machine facts and the results file."""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from records import REPO, RunsFile, code_version, cpu_model, machine, results_header, write_results  # noqa: F401

from fedpeft.config import LoraSection, RunConfig, load_config
from fedpeft.data import Splits, load_splits, partition
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.training import collate, encode, evaluate, in_order, train
from server.checkpoint import load_checkpoint
from server.evaluation import CentralEvaluator
from server.simulation import simulate

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
    return load_config(None, [f"{k}={toml_value(v)}" for k, v in items.items()])


def toml_value(value: Any) -> str:
    """``value`` as the TOML right-hand side of an override: JSON for scalars (valid TOML too),
    inline tables and arrays built here (tomli-w writes tables on their own lines)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def comparison_parser(description: str, out: Path, **defaults: Any) -> argparse.ArgumentParser:
    """The options of a comparison of federated runs on AG News (``defaults`` by option name, e.g.
    ``alpha=0.5``); the runs differ only in what the script varies."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding agnews/alps/")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label split")
    p.add_argument("--fraction", type=float, default=0.5, help="share of clients sampled per round")
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--test-limit", type=int, default=500, help="test rows for the per-round curve")
    p.add_argument("--final-test-rows", type=int, default=2000, help="sampled test rows for final scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated run labels (default: all)")
    p.add_argument("--out", type=Path, default=out)
    p.set_defaults(**defaults)
    return p


def comparison_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration every run of a comparison shares, from ``comparison_parser``'s options."""
    return {
        "run.seed": args.seed,
        "run.rounds": args.rounds,
        "data.num_clients": args.clients,
        "data.dirichlet_alpha": args.alpha,
        "data.test_limit": args.test_limit,
        "train.local_steps": args.local_steps,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "lora.rank": args.rank,
        "lora.alpha": 2.0 * args.rank,
        "server.fraction": args.fraction,
    }


def run_lora(run_dir: Path) -> LoraSection:
    """The LoRA settings the run in ``run_dir`` used (its ``config.json``)."""
    return LoraSection.model_validate(json.loads((run_dir / "config.json").read_text())["lora"])


def sample_test(splits: Splits, rows: int, seed: int) -> Splits:
    """``splits`` with its test split cut to a seeded random sample of ``rows`` rows: scoring one
    model on all 7,600 takes minutes on 2 cores."""
    if rows < len(splits.test):
        splits.test = splits.test.shuffle(seed=seed).select(range(rows))
    return splits


def run_scored(
    label: str, config: RunConfig, scorer: CentralEvaluator, run_dir: Path, metrics: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Simulate ``config`` into a fresh ``run_dir``, then score its final global state with
    ``scorer``; per-round figures from ``metrics.jsonl``, and the last round's ``metrics`` keys."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun replaces the previous one
    print(f"\n[{label}] -> {run_dir}", flush=True)
    started = time.perf_counter()
    simulate(config, run_dir)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rounds = [r for r in rows if r["round"] > 0]
    final = scorer(load_checkpoint(run_dir).state, init_seed=0)  # the state carries an adapter
    result = {
        "test_accuracy": final["eval_accuracy"],
        "test_loss": final["eval_loss"],
        "aggregation_seconds_per_round": sum(r["aggregation_seconds"] for r in rounds) / len(rounds),
        "curve": {r["round"]: r["eval_accuracy"] for r in rows},
        "seconds": round(seconds, 1),
    }
    if "clients_aggregated" in rounds[-1]:  # a private (dp) run logs no per-round client counts or bytes
        result |= {
            "bytes_up_per_round": sum(r["bytes_up"] for r in rounds) / len(rounds),
            "bytes_up_final_round": rounds[-1]["bytes_up"],
            "bytes_down_per_round": sum(r["bytes_down"] for r in rounds) / len(rounds),
            "optimizer_steps": sum(r["clients_aggregated"] for r in rounds) * config.train.local_steps,
            "replies_rejected": sum(r.get("rejected", 0) for r in rounds),
        }
    result.update({key: rounds[-1][key] for key in metrics if key in rounds[-1]})
    print(f"[{label}] test accuracy {result['test_accuracy']:.4f}", flush=True)
    return result


def full_test(config: RunConfig) -> RunConfig:
    """The same configuration, evaluating on the whole test file."""
    return config.replace(data=config.data.replace(test_limit=None))


def train_and_score(
    config: RunConfig, splits: Splits, rows: Any, steps: int, held_out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train the run's model (same init) on ``rows`` for ``steps`` and score it on the test split
    (``test_accuracy``) and on each of ``held_out``'s datasets (``<name>_accuracy``)."""
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
    result: dict[str, Any] = {"optimizer_steps": steps, "train_loss": metrics.train_loss}
    for name, rows in {"test": splits.test, **(held_out or {})}.items():
        data = encode(rows, tokenizer, config.model.max_length)
        scores = evaluate(model, tokenizer, data, config.train.eval_batch_size)
        result |= {f"{name}_accuracy": scores["accuracy"], f"{name}_loss": scores["loss"]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


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


# ---------------------------------------------------------------------------- benchmarks in pieces


def settled_pick(
    grid: tuple[float, ...], found: dict[float, dict[str, Any]], score: Callable[[dict[str, Any]], float]
) -> float | None:
    """The value of ``grid`` whose run in ``found`` scores best, once the values beside it on the
    grid are in too (None until then): a search walked along the grid stops at a local best, since
    a value beyond it is one no unimodal curve would pick."""
    if not found:
        return None
    best = max(found, key=lambda value: score(found[value]))
    at = grid.index(best)
    return best if all(value in found for value in grid[max(at - 1, 0) : at + 2]) else None


def write_splits(
    train: pd.DataFrame, test: pd.DataFrame, folder: Path, val_rows: int, test_rows: int, seed: int
) -> dict[str, Path]:
    """``train`` less a seeded validation split of ``val_rows``, that split, and a seeded sample of
    ``test_rows`` of ``test`` (all of it if fewer), as header-less text/label TSV files in
    ``folder`` (written once: the same rows every time)."""
    files = {name: folder / f"{name}.tsv" for name in ("train", "val", "test")}
    if all(f.is_file() for f in files.values()):
        return files
    rows = train.sample(frac=1.0, random_state=seed)
    test = test.sample(n=min(test_rows, len(test)), random_state=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("val", rows[:val_rows]), ("train", rows[val_rows:]), ("test", test)):
        frame[["text", "label"]].to_csv(files[name], sep="\t", header=False, index=False)
    return files


class HeldOut:
    """The training rows, the validation split and the test sample of ``write_splits``'s files,
    with one evaluator per held-out set (each loads the model once)."""

    def __init__(self, config: RunConfig, files: dict[str, Path], labels: list[str]) -> None:
        self.config, self.labels, self.files = config, labels, files
        rows = {
            name: load_splits(config.data.replace(source=str(path), labels=labels), 0).train
            for name, path in files.items()
        }
        self.train = rows.pop("train")
        self.sets = rows
        self.evaluators: dict[tuple[str, LoraSection], CentralEvaluator] = {}

    def with_test(self, name: str = "test") -> Splits:
        return Splits(self.train, self.sets[name], list(self.labels))

    def evaluator(self, name: str, lora: LoraSection | None = None) -> CentralEvaluator:
        """The evaluator of held-out set ``name`` for a run at ``lora`` (default: the base
        configuration's). It must be the run's: an evaluator of a smaller rank would score the
        global adapter cut to its own rank, as a client of that rank starts from it."""
        key = (name, lora or self.config.lora)
        if key not in self.evaluators:
            self.evaluators[key] = CentralEvaluator(self.config.replace(lora=key[1]), self.with_test(name))
        return self.evaluators[key]

    def score(self, run_dir: Path, name: str) -> float:
        """The accuracy of the final global state in ``run_dir`` on held-out set ``name``."""
        state = load_checkpoint(run_dir).state
        return self.evaluator(name, run_lora(run_dir))(state, init_seed=0)["eval_accuracy"]

    @torch.no_grad()
    def recall(self, run_dir: Path, name: str) -> dict[str, float]:
        """Per label, the share of its rows in held-out set ``name`` that the final global state in
        ``run_dir`` predicts right (a class no client learned shows as 0)."""
        evaluator = self.evaluator(name, run_lora(run_dir))
        evaluator.host.load_state(load_checkpoint(run_dir).state, init_seed=0)
        model, data = evaluator.host.model.eval(), evaluator.data
        hits, totals = torch.zeros(len(self.labels)), torch.zeros(len(self.labels))
        for indices in in_order(len(data), evaluator.batch_size):
            batch = collate(data, indices, evaluator.tokenizer)
            labels = batch.pop("labels")
            right = model(**batch).logits.argmax(-1) == labels
            totals.index_add_(0, labels, torch.ones(len(labels)))
            hits.index_add_(0, labels, right.float())
        return {label: round(float(h / t), 4) for label, h, t in zip(self.labels, hits, totals, strict=True)}


def pieces_parser(description: str, out: Path, data: str) -> argparse.ArgumentParser:
    """The options of a benchmark that runs in pieces (``run_pieces``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"folder holding {data}")
    p.add_argument("--only", help="comma-separated name patterns of the pieces to run")
    p.add_argument("--list", action="store_true", help="list the pieces and which are done")
    p.add_argument("--report", action="store_true", help="print the tables only")
    p.add_argument("--out", type=Path, default=out)
    return p


def runs_by(results: RunsFile, key: str, values: Sequence[str]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(value, its runs sorted by seed) for each of ``values`` that has runs, in that order."""
    for value in values:
        runs = sorted((r for r in results.data["runs"] if r[key] == value), key=lambda r: r["seed"])
        if runs:
            yield value, runs


def mean_std(values: list[float]) -> str:
    """``mean ± std (n=k)`` of per-seed figures; one seed has no spread: ``value (n=1)``."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f} (n=1)"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def agnews_pieces_main(
    benchmark: str,
    doc: str,
    names: list[str],
    run: Callable[[HeldOut, Path, str], dict[str, Any]],
    report: Callable[[RunsFile], str],
    held_out: Callable[[Path], HeldOut],
    argv: list[str] | None,
) -> int:
    """The ``main`` of an AG News benchmark in pieces: options, the data check, the held-out sets
    (built once, on the first piece that runs), the pieces, the report."""
    out = REPO / "benchmarks" / "results" / f"{benchmark}.json"
    args = pieces_parser(doc.splitlines()[0], out, "agnews/alps/").parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = RunsFile(args.out, benchmark)
    data_dir = args.data_dir.resolve()
    if not (args.list or args.report) and (absent := missing_agnews(data_dir)) is not None:
        print(f"{benchmark}: {absent} not found; pass --data-dir <folder holding agnews/alps/>")
        return 2
    sets = functools.cache(lambda: held_out(data_dir))
    run_pieces(results, names, lambda name: run(sets(), data_dir, name), args)
    print(report(results))
    return 0


def run_pieces(
    results: RunsFile, names: list[str], execute: Callable[[str], dict[str, Any]], args: argparse.Namespace
) -> None:
    """``--list`` the pieces, or run those ``--only`` selects that the results file lacks, each
    appended as it finishes (``execute(name)`` sets up what it needs on first use)."""
    if args.list:
        for name in names:
            print(f"{name:40s} {'done' if results.get(name) else 'to run'}")
        return
    if args.report:
        return
    patterns = args.only.split(",") if args.only else ["*"]
    for name in names:
        if not results.get(name) and any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            results.measure(name, lambda name=name: execute(name))
