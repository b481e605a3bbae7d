"""The run directory's records: metrics.jsonl (one line per round), summary.json, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORES = {"eval_accuracy": "accuracy", "eval_exact_match": "exact match", "eval_perplexity": "perplexity"}


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


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
