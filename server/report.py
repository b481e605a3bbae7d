"""The run directory's records (metrics.jsonl, one line per round; summary.json; a PNG plot) and
what the console shows of them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORES = {"eval_accuracy": "accuracy", "eval_exact_match": "exact match", "eval_perplexity": "perplexity"}


@dataclass
class Participation:
    """Who took part in a round and how each fared; never recorded under ``dp``."""

    sampled: int
    aggregated: int
    dropped: list[dict[str, str]]
    replies: list[dict[str, Any]]
    rejected: int
    update_norms: list[float]
    train_loss: float
    bytes_down: int
    bytes_up: int


@dataclass
class RoundRecord:
    """One completed round, as ``metrics.jsonl`` records it (``row``)."""

    round: int
    attempts: int
    aggregation_seconds: float
    participation: Participation | None
    diagnostics: dict[str, float] = field(default_factory=dict)  # variance_ratio, example_epsilon
    strategy: dict[str, float] = field(default_factory=dict)  # the strategy's last_metrics
    evaluation: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "round": self.round,
            "attempts": self.attempts,
            "aggregation_seconds": round(self.aggregation_seconds, 4),
        }
        if self.participation is not None:
            p = self.participation
            row |= {
                "clients_sampled": p.sampled,
                "clients_aggregated": p.aggregated,
                "dropped": p.dropped,
                "replies": p.replies,
                "rejected": p.rejected,
                "update_norms": p.update_norms,
                "train_loss": p.train_loss,
                "bytes_down": p.bytes_down,
                "bytes_up": p.bytes_up,
            }
        return row | self.diagnostics | self.strategy | self.evaluation | {"seconds": round(self.seconds, 3)}


class RunRecorder:
    """Appends round records as they happen, and writes the summary and plot at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.rounds: list[dict[str, Any]] = []

    def record(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, last_round: int) -> None:
        """On resume: keep only rows up to the checkpointed round (later ones are redone).

        A last line that does not parse is a row a kill cut short; it was being recorded before
        its round's checkpoint, so it is one of the rows redone."""
        if self.metrics_path.is_file():
            lines = [line for line in self.metrics_path.read_text().splitlines() if line]
            if lines and not _parses(lines[-1]):
                lines.pop()
            rows = [json.loads(line) for line in lines]
            self.rounds = [r for r in rows if r["round"] <= last_round]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rounds))

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return path

    def plot(self) -> Path | None:
        """The held-out score (accuracy, else exact match, else perplexity) and train/eval loss
        per round, if any were recorded."""
        score = next((k for k in SCORES if any(k in r for r in self.rounds)), None)
        evals = [r for r in self.rounds if "eval_loss" in r]
        trains = [r for r in self.rounds if "train_loss" in r]
        if not evals and not trains:
            return None
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
        if score is not None:
            acc_ax.plot([r["round"] for r in evals], [r[score] for r in evals], marker="o")
        if evals:
            loss_ax.plot(
                [r["round"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="eval"
            )
        if trains:
            loss_ax.plot(
                [r["round"] for r in trains], [r["train_loss"] for r in trains], marker="s", label="train"
            )
        acc_ax.set(
            title=f"held-out {SCORES.get(score, 'accuracy')}",
            xlabel="round",
            ylabel=SCORES.get(score, "accuracy"),
        )
        loss_ax.set(title="loss", xlabel="round", ylabel="cross-entropy")
        loss_ax.legend()
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "metrics.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class RoundProgress:
    """Replies in so far while a round runs: a live progress bar on a terminal, and otherwise a
    plain line at most every ``PLAIN_EVERY`` seconds (logs stay readable). With ``sampled`` None (a
    private run, whose sample size and replies are not released) only the time elapsed."""

    PLAIN_EVERY = 30.0

    def __init__(self, console: Console, rnd: int, sampled: int | None) -> None:
        self.console, self.rnd, self.sampled = console, rnd, sampled
        self.started = self.last_line = time.monotonic()
        self.done = 0
        self.bar: Progress | None = None

    def __enter__(self) -> RoundProgress:
        if self.console.is_terminal:
            counts = (BarColumn(), MofNCompleteColumn()) if self.sampled is not None else ()
            columns = (TextColumn("round {task.fields[rnd]}"), *counts, TimeElapsedColumn())
            self.bar = Progress(*columns, console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=self.sampled, rnd=self.rnd)
        return self

    def reply(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.bar is not None:
            self.bar.advance(self.task)
        elif now - self.last_line >= self.PLAIN_EVERY:
            self.last_line = now
            so_far = "running" if self.sampled is None else f"{self.done}/{self.sampled} clients replied"
            self.console.print(f"round {self.rnd}: {so_far}, {now - self.started:.0f}s")

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_round(console: Console, row: dict[str, Any], rounds: int) -> None:
    """One line per round: participation, losses and scores, privacy, capping, bytes, time."""
    parts = [f"round {row['round']}/{rounds}"]
    if "clients_aggregated" in row:
        parts.append(f"clients {row['clients_aggregated']}/{row['clients_sampled']}")
        parts.append(f"train_loss {row['train_loss']:.4f}")
    if "eval_accuracy" in row:
        parts.append(f"eval_loss {row['eval_loss']:.4f}  eval_acc {row['eval_accuracy']:.4f}")
    elif "eval_perplexity" in row:
        parts.append(f"eval_loss {row['eval_loss']:.4f}  eval_ppl {row['eval_perplexity']:.2f}")
        if "eval_exact_match" in row:
            parts.append(f"eval_em {row['eval_exact_match']:.4f}")
    if "client_eval_accuracy" in row:
        parts.append(f"client_acc {row['client_eval_accuracy']:.4f}")
    if "epsilon" in row:
        parts.append(f"epsilon {row['epsilon']:.3f}")
    if row.get("discarded_energy", 0.0) > 1e-6:
        capped = (
            f"merged delta capped at rank {row['merged_rank']:.0f}"
            if "merged_rank" in row
            else "aggregate cut to the global adapter's rank"
        )
        parts.append(f"[yellow]{capped}: {row['discarded_energy']:.2%} of its energy discarded[/yellow]")
    if "bytes_up" in row:
        parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB  down {row['bytes_down'] / 1e6:.2f} MB")
    if row["round"] > 0:
        parts.append(f"{row['seconds']:.1f}s")
    console.print("  ".join(parts), soft_wrap=True)


def print_summary(console: Console, run_dir: Path, summary: dict[str, Any]) -> None:
    table = Table(title=f"fedpeft run: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key != "label_names":
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
