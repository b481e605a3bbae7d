"""``fedpeft compare RUN_DIR...``: several runs side by side, one PNG with the held-out score and the
losses per round of each, and a markdown table of their final figures, bytes and time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpeft.errors import UserError  # noqa: E402
from server.report import SCORES  # noqa: E402


class CompareError(UserError):
    """A directory that is not a finished run."""


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the rows of ``metrics.jsonl``, ``summary.json``) of a finished run."""
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics.is_file() or not summary.is_file():
        raise CompareError(
            f"{run_dir} is not a finished run (no metrics.jsonl and summary.json); pass run directories"
        )
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return rows, json.loads(summary.read_text())


def compare(run_dirs: list[Path], out: Path) -> str:
    """Plot the runs into ``out`` and return the markdown table."""
    runs = {str(d): load_run(d) for d in run_dirs}
    score = next(
        (k for k in SCORES if any(k in r for rows, _ in runs.values() for r in rows)), "eval_accuracy"
    )
    fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, (rows, _) in runs.items():
        scored = [r for r in rows if score in r]
        score_ax.plot([r["round"] for r in scored], [r[score] for r in scored], marker="o", ms=3, label=name)
        losses = [r for r in rows if "eval_loss" in r]
        loss_ax.plot(
            [r["round"] for r in losses], [r["eval_loss"] for r in losses], marker="o", ms=3, label=name
        )
    score_ax.set(title=f"held-out {SCORES[score]}", xlabel="round", ylabel=SCORES[score])
    loss_ax.set(title="held-out loss", xlabel="round", ylabel="cross-entropy")
    for ax in (score_ax, loss_ax):
        ax.grid(alpha=0.3)
    score_ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    lines = [
        f"| run | strategy | rounds | final {SCORES[score]} | final loss | MB up | MB down | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (_, summary) in runs.items():
        figures = [summary.get(f"final_{score}"), summary.get("final_eval_loss")]
        final, loss = ("–" if v is None else f"{v:.4f}" for v in figures)
        up, down = (summary.get(key, 0) / 1e6 for key in ("bytes_up", "bytes_down"))
        lines.append(
            f"| {name} | {summary.get('strategy', '?')} | {summary.get('rounds', '?')} | {final} | {loss} | "
            f"{up:.2f} | {down:.2f} | {summary.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines)
