"""The tables, goal lines and plot of ``noniid_agnews.py`` (``--report``), from its results file."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
    mean_std,
)
from noniid_protocol import (  # noqa: E402
    BASE_METHODS,
    CCVR_DEFAULT_LR,
    CCVR_LRS,
    CLIENTS,
    DEFAULT_LR,
    FIXED_RECIPE,
    LR_CHECKS,
    LRS,
    RECIPE_CHECKS,
    RECIPES,
    SCHEDULES,
    SEEDS,
    SERVER_CHECKS,
    SERVER_KNOBS,
    SERVER_OPTIMIZERS,
    SETTINGS,
    TOKENS,
    VAL_ROWS,
    Results,
    ServerKnob,
    lr_piece,
    method_label,
    selection_score,
    server_piece,
    server_text,
)

GOALS = {"S1": 0.97, "S2": 0.93, "S3": 0.99}  # the best method's share of centralized accuracy


def runs_of(results: Results, setting: str) -> dict[str, list[dict[str, Any]]]:
    """The final runs of ``setting`` by method (the search runs at the chosen lr count as S1 seed 0),
    with the best server optimizer under its own name."""
    chosen = {m: results.chosen_lr(m) for m in (*BASE_METHODS, *SERVER_OPTIMIZERS)}
    best = results.best_server_optimizer()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in results.data["runs"]:
        piece = run["piece"]
        final = piece.startswith(f"{setting}/")
        searched = setting == "S1" and piece == lr_piece(
            run["method"], chosen.get(run["method"]) or 0, search=True
        )
        if run["kind"] == "federated" and (final or searched):
            if run["method"] in SERVER_OPTIMIZERS and best not in (None, run["method"]):
                continue
            by_method.setdefault(run["method"], []).append(run)
    return by_method


def baseline(results: Results, kind: str, alpha: float | None = None) -> list[float]:
    """Final accuracies of the centralized runs (seed 0: the search run at the chosen lr) or of the
    local-only runs at ``alpha``, one per seed."""
    if kind == "centralized":
        lr = results.chosen_lr("central")
        return central_at(results, lr) if lr else []
    return [r["final_accuracy"] for r in results.data["runs"] if r["kind"] == kind and r["alpha"] == alpha]


def central_at(results: Results, lr: float) -> list[float]:
    """Final accuracies of the centralized runs at ``lr``, superseded or not (seed 0: its lr piece)."""
    runs = [results.get(lr_piece("central", lr, results.search))]
    for seed in SEEDS[1:]:
        run = results.get(piece := f"central/seed={seed}")
        runs.append(run if run and run["lr"] == lr else results.superseded(piece, lr=lr))
    return [r["final_accuracy"] for r in runs if r]


def strictest_central(results: Results) -> tuple[float, list[float]] | None:
    """The lr whose centralized runs, on every seed, score best on the test sample, and their
    accuracies: the strictest baseline, which the validation split need not have picked."""
    complete = {lr: accs for lr in LRS if len(accs := central_at(results, lr)) == len(SEEDS)}
    if not complete:
        return None
    lr = max(complete, key=lambda lr: statistics.fmean(complete[lr]))
    return lr, complete[lr]


def lr_table(
    title: str,
    cells: dict[str, list[dict[str, Any] | None]],
    picks: dict[str, float | None],
    grid: tuple[float, ...] = LRS,
    knob: str = "lr",
) -> list[str]:
    """A titled table of each method's runs at the values of ``grid`` of ``knob`` (None: not run):
    validation score (test accuracy), and the value its search settled on (``picks``; None: under
    way)."""
    lines = [f"## {title}: validation score per {knob} (test accuracy)", ""]
    lines += [
        "| method | " + " | ".join(f"{knob} {value:g}" for value in grid) + " | picked on validation |",
        "|---|" + "---:|" * (len(grid) + 1),
    ]
    for method, runs in cells.items():
        if not any(runs):
            continue
        values = [f"{selection_score(r):.4f} ({r['final_accuracy']:.4f})" if r else "–" for r in runs]
        picked = "–" if picks[method] is None else f"{picks[method]:g}"
        lines.append(f"| {method} | " + " | ".join(values) + f" | {picked} |")
    return lines


def lr_search_report(results: Results) -> list[str]:
    """The lr search of S1 seed 0: each method's validation score at each lr of ``LRS``."""
    methods = (*BASE_METHODS, *SERVER_OPTIMIZERS) if results.search else LR_CHECKS
    methods = (*methods, "central")
    cells = {m: [results.get(lr_piece(m, lr, results.search)) for lr in LRS] for m in methods}
    lines = lr_table("lr search (S1, seed 0)", cells, {m: results.searched_lr(m) for m in methods})
    return lines + [line for knob in SERVER_KNOBS for line in server_search_report(results, knob)]


def server_search_report(results: Results, knob: ServerKnob) -> list[str]:
    """The walk of ``knob`` for each method of ``SERVER_CHECKS`` (S1, seed 0, at its picked client lr
    and the knobs before ``knob`` at their picks), once it has run beyond the default."""
    cells, picks = {}, {}
    for method in SERVER_CHECKS:
        before = results.knob_walk(method, knob)
        if before is None:
            continue
        lr = results.searched_lr(method)
        name = f"{method} (lr {lr:g}" + (f", {server_text(before)}" if before else "") + ")"
        cells[name] = [results.get(server_piece(method, lr, before, knob, value)) for value in knob.grid]
        picks[name] = results.searched_server(method).get(knob.key)
    if not any(any(runs[1:]) for runs in cells.values()):
        return []
    title = f"{knob.label} search (S1, seed 0, at the picked client lr and the picks before it)"
    return ["", *lr_table(title, cells, picks, knob.grid, knob.label)]


def search_report(results: Results) -> list[str]:
    """The lr search and the recipe ablation of the protocol that searches."""
    lines = lr_search_report(results)
    lines += [
        "",
        "## ablation (S2, seed 0, fedavg, lr 1e-3)",
        "",
        "| client recipe | validation score | test |",
        "|---|---:|---:|",
    ]
    for recipe in RECIPES:
        run = results.get(f"ablation/S2/{recipe}")
        if run:
            chosen = " (chosen)" if recipe == results.chosen_recipe() else ""
            lines.append(f"| {recipe}{chosen} | {selection_score(run):.4f} | {run['final_accuracy']:.4f} |")
    return lines


def report(results: Results) -> str:
    if results.search:
        lines = search_report(results)
    else:
        lines = [
            f"Client recipe {FIXED_RECIPE}, inputs cut at {TOKENS} tokens; each method at the lr its "
            f"search picked (lr {DEFAULT_LR:g} until its search is in: the lr column).",
            "",
            *lr_search_report(results),
        ]
    central, strict = baseline(results, "centralized"), strictest_central(results)
    by_lr = [f"lr {lr:g}: {mean_std(accs)}" for lr in LRS if (accs := central_at(results, lr))]
    lines += ["", "Centralized LoRA, test accuracy at each lr run: " + "; ".join(by_lr) + "."]
    for setting, spec in SETTINGS.items():
        local = baseline(results, "local", spec.alpha)
        lines += [
            "",
            f"## {setting} (alpha {spec.alpha:g}, {spec.fraction:.0%} of clients, {spec.rounds} rounds)",
            "",
        ]
        lines += [
            "| method | lr | test accuracy, mean ± std | share of centralized | minus local-only | "
            "KB up per client and training round | seeds | worst class recall per seed |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for runs in runs_of(results, setting).values():
            accs = [r["final_accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
            share = f"{statistics.fmean(accs) / statistics.fmean(central):.1%}" if central else "–"
            gap = f"{(statistics.fmean(accs) - statistics.fmean(local)) * 100:+.1f} pt" if local else "–"
            up = runs[0].get("bytes_up_final_round", runs[0]["bytes_up_per_round"])
            kb = f"{up / (spec.fraction * CLIENTS) / 1e3:.1f}"
            label, lr = method_label(runs[0]), runs[0]["lr"]
            lines.append(
                f"| {label} | {lr:g} | {mean_std(accs)} | {share} | {gap} | {kb} | "
                + ", ".join(f"{a:.4f}" for a in accs)
                + f" | {worst_classes(runs)} |"
            )
        central_lr = results.chosen_lr("central") or "–"
        lines.append(
            f"| centralized (1,000 steps, all rows) | {central_lr} | {mean_std(central)} | 100% | | | | |"
        )
        lines.append(
            f"| local-only (100 steps per client, mean of clients) | | {mean_std(local)} | | | | | |"
        )
        lines += goal_lines(setting, runs_of(results, setting), central, local, strict)
    if not results.search:
        lines += pending_report(results)
        lines += recipe_report(results) + schedule_report(results) + ccvr_lr_report(results)
    return "\n".join(lines)


def pending_report(results: Results) -> list[str]:
    """The settings' runs that their method's lr search superseded and whose reruns at the picked lr
    are not in yet: kept in view, at the lr they ran at, until the reruns replace them."""
    pending: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for run in results.data.get("superseded", []):
        piece = run["piece"]
        group = piece.split("/")[0]
        if group in (*SETTINGS, "local") and results.get(piece) is None:
            name = method_label(run) if group in SETTINGS else f"local-only, alpha {run['alpha']:g}"
            pending.setdefault((group, name, run["lr"]), []).append(run)
    if not pending:
        return []
    lines = [
        "",
        "## Runs awaiting their rerun at the lr (and server hyperparameters) their method's search picked",
        "",
        "| setting | method | lr run | lr picked | test accuracy, mean ± std | seeds |",
        "|---|---|---:|---:|---:|---|",
    ]
    for (group, name, lr), runs in sorted(pending.items()):
        picked = results.chosen_lr("central" if group == "local" else runs[0]["method"].removesuffix("+ccvr"))
        runs = sorted(runs, key=lambda r: r["seed"])
        seeds = ", ".join(f"{r['seed']}: {r['final_accuracy']:.4f}" for r in runs)
        accs = [r["final_accuracy"] for r in runs]
        server = results.chosen_server(runs[0]["method"].removesuffix("+ccvr"))
        cell = f"{picked:g}" if server is None else f"{picked:g} ({server_text(server)})"
        lines.append(f"| {group} | {name} | {lr:g} | {cell} | {mean_std(accs)} | {seeds} |")
    return lines


def ccvr_lr_report(results: Results) -> list[str]:
    """CCVR's retraining lr on S1 fedavg seed 2: the validation accuracy each gives (the choice)."""
    runs = {
        lr: at_default_lr(results, "S1/fedavg+ccvr/seed=2")
        if lr == CCVR_DEFAULT_LR
        else results.get(f"ccvr-lr/S1/fedavg/lr={lr:g}/seed=2")
        for lr in CCVR_LRS
    }
    if not any(runs.values()):
        return []
    lines = ["", "## CCVR's learning rate (S1 fedavg at lr 1e-3, seed 2), chosen on the validation split", ""]
    lines += ["| lr | validation | test |", "|---:|---:|---:|"]
    for lr, run in runs.items():
        if run:
            lines.append(f"| {lr:g} | {run['val_accuracy']:.4f} | {run['final_accuracy']:.4f} |")
    return lines


def schedule_report(results: Results) -> list[str]:
    """S1 fedavg against the same client steps spent on more rounds (``SCHEDULES``), seed by seed."""
    rows = {"S1 (5 x 20)": [at_default_lr(results, f"S1/fedavg/seed={seed}") for seed in SEEDS]}
    rows |= {name: [results.get(f"schedule/{name}/seed={seed}") for seed in SEEDS] for name in SCHEDULES}
    return variant_table(
        "S1 fedavg at lr 1e-3: 5 rounds of 20 local steps against 10 of 10", "schedule", rows
    )


def recipe_report(results: Results) -> list[str]:
    """S1 fedavg under the fixed recipe and under each of ``RECIPE_CHECKS``, seed by seed."""
    rows = {FIXED_RECIPE: [at_default_lr(results, f"S1/fedavg/seed={seed}") for seed in SEEDS]}
    rows |= {r: [results.get(f"recipe/S1/{r}/seed={seed}") for seed in SEEDS] for r in RECIPE_CHECKS}
    return variant_table("S1 fedavg at lr 1e-3 by client recipe", "client recipe", rows)


def at_default_lr(results: Results, piece: str) -> dict[str, Any] | None:
    """``piece``'s run at ``DEFAULT_LR``, superseded or not: the baseline of the variant tables,
    whose variants ran at that lr."""
    run = results.get(piece)
    return run if run and run["lr"] == DEFAULT_LR else results.superseded(piece, lr=DEFAULT_LR)


def variant_table(title: str, column: str, rows: dict[str, list[dict[str, Any] | None]]) -> list[str]:
    """A titled table of variants of one run, each with its runs per seed (None: not run yet)."""
    lines = [
        "",
        f"## {title}",
        "",
        f"| {column} | test accuracy, mean ± std | seeds | worst class recall per seed |",
        "|---|---:|---|---|",
    ]
    for name, found in rows.items():
        runs = [r for r in found if r]
        if runs:
            accs = [r["final_accuracy"] for r in runs]
            seeds = ", ".join(f"{r['seed']}: {r['final_accuracy']:.4f}" for r in runs)
            lines.append(f"| {name} | {mean_std(accs)} | {seeds} | {worst_classes(runs)} |")
    return lines


def worst_classes(runs: list[dict[str, Any]]) -> str:
    """Each seed's least-recalled test class and its recall (a class no client taught shows 0)."""
    cells = []
    for run in sorted(runs, key=lambda r: r["seed"]):
        recall = run.get("test_recall")
        if recall:
            label = min(recall, key=recall.__getitem__)
            cells.append(f"{label} {recall[label]:.2f}")
        else:
            cells.append("–")
    return ", ".join(cells)


def goal_lines(
    setting: str,
    by_method: dict[str, list[dict[str, Any]]],
    central: list[float],
    local: list[float],
    strict: tuple[float, list[float]] | None = None,
) -> list[str]:
    """Each goal of the issue for ``setting``: met or missed, and by how much; the share goal also
    against ``strict`` (an lr and its centralized accuracies) where those score higher on test."""
    if not by_method or not central:
        return []
    most = max(len(runs) for runs in by_method.values())  # a method on fewer seeds is not compared
    partial = sorted(m for m, runs in by_method.items() if len(runs) < most)
    every_run = [(m, r) for m, runs in by_method.items() for r in runs]  # the collapse goal: every seed run
    by_method = {m: runs for m, runs in by_method.items() if len(runs) == most}
    means = {m: statistics.fmean(r["final_accuracy"] for r in runs) for m, runs in by_method.items()}
    best = max(means, key=means.__getitem__)
    share, goal = means[best] / statistics.fmean(central), GOALS[setting]
    verdict = "met" if share >= goal else f"missed by {(goal - share) * 100:.1f} points of share"
    out = [
        "",
        f"Goal: the best method ({best}) reaches {share:.1%} of centralized, goal {goal:.0%}: {verdict}.",
    ]
    if strict is not None and statistics.fmean(strict[1]) > statistics.fmean(central):
        lr, accs = strict
        strict_share = means[best] / statistics.fmean(accs)
        verdict = "met" if strict_share >= goal else f"missed by {(goal - strict_share) * 100:.1f} points"
        out.append(
            f"Against the centralized runs at lr {lr:g}, the best on test ({statistics.fmean(accs):.4f}): "
            f"{strict_share:.1%}, {verdict}."
        )
    if partial:
        out.append(
            f"(Methods compared on their {most} seeds; on fewer seeds, not compared: {', '.join(partial)}.)"
        )
    if setting == "S1" and local:
        worst = min(means, key=means.__getitem__)
        gap = (means[worst] - statistics.fmean(local)) * 100
        out.append(
            f"Goal: every method at least 10 points above local-only: the lowest ({worst}) is {gap:+.1f}."
        )
    if setting == "S2":
        method, lowest = min(every_run, key=lambda run: run[1]["final_accuracy"])
        accuracy = lowest["final_accuracy"]
        verdict = "met" if accuracy >= 0.60 else f"missed by {(0.60 - accuracy) * 100:.2f} points"
        out.append(
            f"Goal: no seed of any method below 0.60 (every seed run): the lowest is {method}'s seed "
            f"{lowest['seed']}, {accuracy:.4f}: {verdict}."
        )
    return out


def plot(results: Results, path: Path) -> None:
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(15, 4.5), sharey=True)
    central = baseline(results, "centralized")
    for ax, (setting, spec) in zip(axes, SETTINGS.items(), strict=True):
        for method, runs in runs_of(results, setting).items():
            curves = [r["curve"] for r in runs]
            if "calibrated_from" in runs[0]:  # its curve is its source's plus the calibrated head
                calibrated = [c[-1] for c in curves]
                mean, last = statistics.fmean(calibrated), len(curves[0]) - 2  # after the last round
                # clamped: the mean of equal scores can land an ulp outside them
                spread = [[max(0.0, mean - min(calibrated))], [max(0.0, max(calibrated) - mean)]]
                ax.errorbar(
                    [last], [mean], yerr=spread, marker="*", ms=10, capsize=3, linestyle="none",
                    label=f"{method} (after the last round)",
                )  # fmt: skip
                continue
            rounds = range(len(curves[0]))
            per_round = list(zip(*curves, strict=True))
            ax.plot(rounds, [statistics.fmean(v) for v in per_round], marker="o", ms=3, label=method)
            ax.fill_between(rounds, [min(v) for v in per_round], [max(v) for v in per_round], alpha=0.15)
        if central:
            ax.axhline(statistics.fmean(central), color="gray", linestyle="--", label="centralized (test)")
        local = baseline(results, "local", spec.alpha)
        if local:
            ax.axhline(statistics.fmean(local), color="gray", linestyle=":", label="local-only (test)")
        ax.set(title=f"{setting}: α={spec.alpha:g}, {spec.fraction:.0%} of clients", xlabel="round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel(f"validation accuracy ({VAL_ROWS} rows); band: min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
