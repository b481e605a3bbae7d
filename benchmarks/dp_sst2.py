"""SST-2 under differential privacy: client-level DP (100 clients) and example-level DP (10 clients)
at epsilon 1, 4 and 8 (delta 1e-5), next to the same federations without DP.

MiniLM-L6, LoRA r = 4 (alpha 8) on query/value plus the head, FFA (A frozen, only B and the head
trained: what ``dp`` is recommended around); IID split of SST-2's training rows less a seeded
1,000-row validation split; 10 rounds x 5 local AdamW steps of batch 16. The learning rate is
chosen once, on the validation split, by the non-private client-level federation (seed 0) at each lr
of ``LRS`` (pieces ``search/lr=<lr>``), and used by every run, private or not: a search per private
run would itself spend privacy budget. The server evaluates the validation split every round (the
curves); the final accuracy is on all 1,821 rows of ``test-labeled.tsv``, used for nothing else.

- client level: 100 clients, each sampled with probability 0.2 per round (Poisson, m = 20
  expected), ``dp(inner = "ffa")`` with adaptive clipping at the median norm (Andrew et al.), the
  noise multiplier set so that epsilon after the 10 rounds is the target (opacus' RDP accountant);
  the baseline is ffa with 20 clients sampled per round and no DP;
- client level with Fed-SB inside (pieces ``fedsb/...``, epsilon 8 and none): the same, but each
  client's contribution is the r x r cores R of Fed-SB (and the head) instead of ffa's B, far fewer
  values for the same noise per value; its lr is searched the same way (``search/fedsb/lr=<lr>``);
  and Fed-SB with the head frozen at its shared init (``train.freeze_head``, FedBABU; pieces
  ``fedsb+frozen-head/...``): the clients send, and ``dp`` clips and noises, the cores R only;
  and Fed-SB with every client every round (``fedsb+all-clients/...``: q = 1, so z = 2.02 at
  epsilon 8 but m = 100; five times the client steps), with Fed-SB's lr and clip start;
  and Fed-SB from a random frame (``fedsb+random-frame/...``, ``init = "random"``): no gradient
  sketch rounds, whose noise swamps them under DP, so R trains all 10 rounds; its own lr search;
  and Fed-SB from a public frame (``fedsb+public-frame/...``, ``init = "public"``): LoRA-SB's own
  initialisation computed by the server on public rows, GLUE's SST-2 ``dev.tsv`` (872 sentences
  in none of the clients' rows, the validation split or the test rows), at each seed's initial
  state (``fedpeft frame``, ``server/public_frame.py``): no round and no budget spent on it; its
  own lr search; and the same at ε = 8 at its search's runner-up lr (``fedsb+public-frame@5e-2/...``,
  ``PINNED_LR``), added after its pick's private runs: what the lr does under the noise, not a pick;
  and the same at ε = 8 at the lr a proxy picks (``fedsb+public-frame+proxy-lr/...``, ``PROXY_OF``):
  the private federation simulated over the public rows (pieces ``proxy/<rule>/lr=<lr>``: 672 of
  the 872 sentences spread over the same 100 clients, the same sampling, rounds, noise and clip
  start, scored on the other 200), which reads no client's row and so spends no budget; where the
  pick's final runs are already in under another variant of the same configuration, they are
  copied, not rerun;
- example level: 10 clients, all every round, DP-SGD on each (per-example clipping at 1.0), the
  noise multiplier set so that every client's epsilon after its 50 steps is at most the target
  (sampling rate batch / rows of the smallest client); the baseline is the same without DP.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_sst2.py --only 'search/*'   # first: the lr
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_sst2.py [--only 'client/*'] [--list]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_sst2.py --frames   # Fed-SB's frames vs non-private
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from common import (
    REPO,
    HeldOut,
    RunsFile,
    mean_std,
    pieces_parser,
    run_pieces,
    run_scored,
    settled_pick,
    write_splits,
)
from opacus.accountants.utils import get_noise_multiplier

from fedpeft.config import RunConfig, load_config
from fedpeft.data import partition
from server.checkpoint import load_checkpoint
from server.public_frame import write_public_frame

OUT = REPO / "benchmarks" / "results" / "dp_sst2.json"
WORK = REPO / "runs" / "dp-sst2"
TRAIN, TEST, PUBLIC = "sst2_glue/train_full.tsv", "sst2_glue/test-labeled.tsv", "sst2_glue/dev.tsv"
EPSILONS, DELTA, SEEDS = (1.0, 4.0, 8.0), 1e-5, (0, 1, 2)
# Each rule's lr search runs the first BASE_LRS of LRS, then grows one lr at a time while the best is
# the largest tried (a pick at the edge of a grid says the grid stops short): every rule chose 2e-2,
# the first grid's largest. A rule's final runs at another lr than its pick are superseded and rerun.
LRS, BASE_LRS = (1e-3, 5e-3, 2e-2, 5e-2, 1e-1), 3
# the inner rule of client-level dp (ffa for the main grid) -> its config overrides
RULES: dict[str, dict[str, Any]] = {
    "ffa": {"strategy.name": "ffa"},
    "fedsb": {"strategy.name": "fedsb"},
    "fedsb+frozen-head": {"strategy.name": "fedsb", "train.freeze_head": True},
    "fedsb+all-clients": {"strategy.name": "fedsb", "server.fraction": 1.0},
    "fedsb+random-frame": {"strategy.name": "fedsb", "strategy.init": "random"},
    "fedsb+public-frame": {"strategy.name": "fedsb", "strategy.init": "public"},
    "fedsb+public-frame@5e-2": {"strategy.name": "fedsb", "strategy.init": "public"},
    "fedsb+public-frame+proxy-lr": {"strategy.name": "fedsb", "strategy.init": "public"},
}
# variants that take another rule's lr and clip start instead of a search of their own: sampling
# every client changes no client's training, so its update norms are the searched rule's
SEARCHED_AS = {
    "fedsb+all-clients": "fedsb",
    "fedsb+public-frame@5e-2": "fedsb+public-frame",
    "fedsb+public-frame+proxy-lr": "fedsb+public-frame",
}
# variants that run privately at another lr of their rule's search than its pick, and the lr: the
# public frame's runner-up, one validation row (of 500) below its pick 1e-1, to see what the lr
# does under the noise; not a pick (chosen after seeing the pick's private runs), reported as such
PINNED_LR = {"fedsb+public-frame@5e-2": 5e-2}
# variants whose private lr is chosen on a proxy instead (pieces ``proxy/<rule>/lr=<lr>``): the
# private federation itself, client level at PROXY_EPSILON (the same 100 clients, sampling, rounds,
# noise and clip start), over the public rows, less PROXY_VAL_ROWS of them that score it each round;
# no client's row is read, so the choice spends no budget. The walk starts at the rule's
# non-private pick and settles on the best mean validation accuracy of the last PROXY_RECENT rounds
# once the lrs beside it on LRS are in.
PROXY_OF = {"fedsb+public-frame+proxy-lr": "fedsb+public-frame"}
PROXY_EPSILON, PROXY_VAL_ROWS, PROXY_RECENT = 8.0, 200, 3
ROUNDS, LOCAL_STEPS, BATCH = 10, 5, 16
MODES = {"client": {"clients": 100, "rate": 0.2}, "example": {"clients": 10, "rate": 1.0}}
LABELS = ["0", "1"]
PieceSpec = tuple[str, float | None, int, float | None, str]  # mode, epsilon, seed, lr, rule


def base_config(files: dict[str, Path], mode: str, seed: int, lr: float, rule: str = "ffa") -> dict[str, Any]:
    spec = MODES[mode]
    clients = spec["clients"]
    rate = RULES[rule].get("server.fraction", spec["rate"])
    overrides = {
        "run.seed": seed,
        "run.rounds": ROUNDS,
        "data.source": str(files["train"]),
        "data.test_source": str(files["val"]),
        "data.test_limit": 500,
        "data.columns": ["text", "label"],
        "data.labels": LABELS,
        "data.num_clients": clients,
        "data.partition": "iid",
        "server.fraction": rate,
        "server.min_clients": round(rate * clients),
        "train.local_steps": LOCAL_STEPS,
        "train.batch_size": BATCH,
        "train.eval_batch_size": 128,
        "train.lr": lr,
        "lora.rank": 4,
        "lora.alpha": 8.0,
        **RULES[rule],
    }
    if RULES[rule].get("strategy.init") == "public":
        overrides["strategy.frame"] = str(public_frame(files, seed))
    return overrides


def public_frame(files: dict[str, Path], seed: int) -> Path:
    """Seed ``seed``'s Fed-SB frame from the public rows (written once): every rule's model and
    adapter at that seed's initial state are the same, so ffa's configuration describes them."""
    path = WORK / "frames" / f"seed={seed}.safetensors"
    if not path.is_file():
        print(
            write_public_frame(config_of(base_config(files, "client", seed, LRS[0])), files["public"], path)
        )
    return path


def private_config(
    overrides: dict[str, Any], mode: str, epsilon: float, smallest_client: int, clip_start: float
) -> dict[str, Any]:
    """``overrides`` with client-level or example-level DP calibrated to ``epsilon`` at DELTA;
    client level clips adaptively from ``clip_start``."""
    if mode == "client":
        rate = overrides["server.fraction"]
        z = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=rate, steps=ROUNDS)
        inner = {k: v for k, v in overrides.items() if k.startswith("strategy.") and k != "strategy.name"}
        return {
            **{k: v for k, v in overrides.items() if k not in inner},
            "strategy.name": "dp",
            "strategy.inner": overrides["strategy.name"],
            "strategy.inner_options": {k.removeprefix("strategy."): v for k, v in inner.items()},
            "strategy.noise_multiplier": z,
            "strategy.delta": DELTA,
            "strategy.clip_norm": clip_start,  # adaptive clipping follows the median from there
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
    return load_config(None, [f"{k}={toml_value(v)}" for k, v in overrides.items()])


def toml_value(value: Any) -> str:
    """A value as the right-hand side of a ``section.key=value`` override (a dict as an inline table)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def pieces() -> dict[str, PieceSpec]:
    """name -> (mode, epsilon, seed, lr, rule) of every piece, the lr searches first (lr None: the
    chosen one; epsilon set with an lr: a proxy search piece)."""
    search = {
        f"search/{prefix(rule)}lr={lr:g}": ("client", None, 0, lr, rule)
        for rule in RULES
        if rule not in SEARCHED_AS
        for lr in LRS
    }
    search |= {
        proxy_piece(rule, lr): ("client", PROXY_EPSILON, 0, lr, rule)
        for rule in sorted(set(PROXY_OF.values()))
        for lr in LRS
    }
    final = {
        f"{mode}/{label(eps)}/seed={seed}": (mode, eps, seed, None, "ffa")
        for mode in MODES
        for eps in (None, *EPSILONS)
        for seed in SEEDS
    }
    variants = {
        f"{prefix(rule)}client/{label(eps)}/seed={seed}": ("client", eps, seed, None, rule)
        for rule in RULES
        if rule != "ffa"
        for eps in ((8.0,) if rule in PINNED_LR or rule in PROXY_OF else (None, 8.0))
        for seed in SEEDS
    }
    return search | final | variants


def proxy_piece(rule: str, lr: float) -> str:
    return f"proxy/{rule}/lr={lr:g}"


def prefix(rule: str) -> str:
    """The piece-name prefix of a rule's runs (ffa's, the main grid, have none)."""
    return "" if rule == "ffa" else f"{rule}/"


def label(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"eps={epsilon:g}"


def run_dir(name: str) -> Path:
    return WORK / name.replace("/", "-").replace("=", "")


def chosen(results: RunsFile, rule: str = "ffa") -> dict[str, Any] | None:
    """``rule``'s search piece with the best validation accuracy, once every one has run: its lr,
    and its median update norm, where client-level DP starts its adaptive clipping norm (both
    hyperparameters taken from the non-private run, so choosing them spends no privacy budget); a
    variant of ``SEARCHED_AS`` takes its rule's, at its ``PINNED_LR`` or its proxy's pick if it has
    one."""
    runs = searched(results, SEARCHED_AS.get(rule, rule))
    if runs is None or runs[-1] is None:
        return None
    lr = PINNED_LR.get(rule) or (proxy_pick(results, PROXY_OF[rule]) if rule in PROXY_OF else None)
    if rule in PINNED_LR or rule in PROXY_OF:
        return next((r for r in runs if r["lr"] == lr), None)
    return max(runs, key=lambda r: r["validation_accuracy"])


def proxy_runs(results: RunsFile, rule: str) -> dict[float, dict[str, Any]]:
    return {lr: run for lr in LRS if (run := results.get(proxy_piece(rule, lr)))}


def proxy_pick(results: RunsFile, rule: str) -> float | None:
    """The lr ``rule``'s proxy search settled on (``PROXY_OF``), None while it is under way."""
    return settled_pick(LRS, proxy_runs(results, rule), proxy_score)


def proxy_score(run: dict[str, Any]) -> float:
    return run["proxy_score"]


def proxy_best(found: dict[float, dict[str, Any]]) -> float | None:
    return max(found, key=lambda lr: proxy_score(found[lr])) if found else None


def proxy_needed(results: RunsFile, rule: str, lr: float) -> bool:
    """Whether the proxy search of ``rule`` runs ``lr``: its start (the non-private pick), then the
    lrs beside its best so far, until it settles."""
    found = proxy_runs(results, rule)
    if lr in found:
        return True
    start = chosen_lr(results, rule)
    if start is None or proxy_pick(results, rule) is not None:
        return False
    at = LRS.index(proxy_best(found) or start)
    return lr in LRS[max(at - 1, 0) : at + 2]


def searched(results: RunsFile, rule: str) -> list[dict[str, Any] | None] | None:
    """``rule``'s search runs so far along ``LRS``, ending with None where the next one its growing
    grid needs is missing; None while one of the first ``BASE_LRS`` is."""
    score = lambda r: r["validation_accuracy"]  # noqa: E731
    runs: list[dict[str, Any] | None] = []
    for i, lr in enumerate(LRS):
        if i >= BASE_LRS and max(runs, key=score) is not runs[-1]:
            break  # the best is inside the grid: it stops growing
        run = results.get(f"search/{prefix(rule)}lr={lr:g}")
        if run is None:
            return None if i < BASE_LRS else [*runs, None]
        runs.append(run)
    return runs


def needed(results: RunsFile, name: str, spec: PieceSpec) -> bool:
    """Whether a search piece is in its rule's search as far as it has grown (always, for the others)."""
    _, epsilon, _, lr, rule = spec
    if lr is not None and epsilon is not None:
        return proxy_needed(results, rule, lr)
    if lr is None or LRS.index(lr) < BASE_LRS:
        return True
    runs = searched(results, rule)
    return runs is not None and len(runs) > LRS.index(lr)


def chosen_lr(results: RunsFile, rule: str = "ffa") -> float | None:
    best = chosen(results, rule)
    return None if best is None else best["lr"]


def supersede_stale(results: RunsFile, runs: dict[str, PieceSpec]) -> None:
    """Supersede the final runs trained at another lr than their rule's search now chooses."""
    for name, (*_, lr, rule) in runs.items():
        run, best = results.get(name), chosen_lr(results, rule)
        if lr is None and run is not None and best is not None and run["lr"] != best:
            results.supersede(name, f"the lr search, grown beyond 2e-2, chose {best:g}")


def adopt_twins(results: RunsFile, runs: dict[str, PieceSpec]) -> None:
    """Record as a proxy variant's final run the run of another variant with the same overrides,
    setting, epsilon, seed and lr (so the same clip start), where one is in: the same measurement."""
    for name, (mode, epsilon, seed, lr, rule) in runs.items():
        best = chosen(results, rule) if rule in PROXY_OF and lr is None else None
        if best is None or results.get(name) is not None:
            continue
        twins = [
            other
            for other, (m, e, s, lr_other, r) in runs.items()
            if (m, e, s, lr_other) == (mode, epsilon, seed, None) and r != rule and RULES[r] == RULES[rule]
            and (done := results.get(other)) is not None and done["lr"] == best["lr"]
        ]  # fmt: skip
        if twins:
            results.copy(twins[0], name)
            print(f"[{name}] is {twins[0]}: copied")


def median_update_norm(run: Path) -> float:
    """The median of every reply's update norm over a non-private run's rounds (``metrics.jsonl``)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return statistics.median(n for row in rows for n in row.get("update_norms", []))


def search_run(held_out: HeldOut, files: dict[str, Path], name: str, lr: float, rule: str) -> dict[str, Any]:
    config = config_of(base_config(files, "client", 0, lr, rule))
    result = run_scored(name, config, held_out.evaluator("val", config.lora), run_dir(name))
    return {
        "kind": "search",
        "rule": rule,
        "lr": lr,
        "validation_accuracy": result["test_accuracy"],
        "median_update_norm": median_update_norm(run_dir(name)),
        "curve": [result["curve"][k] for k in sorted(result["curve"], key=int)],
        "seconds": result["seconds"],
    }


def proxy_run(
    held_out: HeldOut, files: dict[str, Path], name: str, lr: float, rule: str, clip_start: float
) -> dict[str, Any]:
    """``rule``'s private client-level federation at ``PROXY_EPSILON`` and ``lr`` over the proxy's
    public rows, scored on the proxy's validation rows (``held_out``, the proxy's)."""
    overrides = base_config(files, "client", 0, lr, rule)
    overrides |= {"data.source": str(files["proxy_train"]), "data.test_source": str(files["proxy_val"])}
    config = config_of(private_config(overrides, "client", PROXY_EPSILON, 0, clip_start))
    result = run_scored(name, config, held_out.evaluator("val", config.lora), run_dir(name), ("epsilon",))
    curve = [result["curve"][k] for k in sorted(result["curve"], key=int)]
    return {
        "kind": "proxy",
        "rule": rule,
        "lr": lr,
        "epsilon": PROXY_EPSILON,
        "epsilon_reached": result.get("epsilon"),
        "clip_start": clip_start,
        "proxy_rows": len(held_out.train),
        "validation_accuracy": result["test_accuracy"],  # on the proxy's public validation rows
        "proxy_score": statistics.fmean(curve[-PROXY_RECENT:]),
        "curve": curve,
        "seconds": result["seconds"],
    }


def run(
    held_out: HeldOut,
    files: dict[str, Path],
    name: str,
    mode: str,
    epsilon: float | None,
    seed: int,
    lr: float,
    rule: str,
    clip_start: float,
) -> dict[str, Any]:
    overrides = base_config(files, mode, seed, lr, rule)
    config = config_of(overrides)
    z = None
    smallest = min(
        len(partition(held_out.train, config.data, k, seed)) for k in range(config.data.num_clients)
    )
    if epsilon is not None:
        overrides = private_config(overrides, mode, epsilon, smallest, clip_start)
        config = config_of(overrides)
        z = overrides.get("strategy.noise_multiplier", overrides.get("example_dp.noise_multiplier"))
    result = run_scored(
        name, config, held_out.evaluator("test", config.lora), run_dir(name), ("epsilon", "example_epsilon")
    )
    reached = result.get("epsilon", result.get("example_epsilon"))
    return {
        "noised_parameters": noised_parameters(run_dir(name), config.train.freeze_head),
        "kind": "final",
        "rule": rule,
        "lr": lr,
        "mode": "none" if epsilon is None else mode,
        "setting": mode,
        "epsilon": epsilon,
        "epsilon_reached": reached,
        "delta": None if epsilon is None else DELTA,
        "noise_multiplier": z,
        "clients": config.data.num_clients,
        "sample_rate": config.server.fraction,
        "smallest_client_rows": smallest,
        "seed": seed,
        "accuracy": result["test_accuracy"],
        "test_rows": len(held_out.sets["test"]),
        "curve": [result["curve"][k] for k in sorted(result["curve"], key=int)],
        "seconds": result["seconds"],
    }


def noised_parameters(run: Path, frozen_head: bool) -> int:
    """How many values a client's (clipped, noised) contribution has in a training round: B (ffa: A
    is frozen) or, under Fed-SB, the cores R; and the dense extras unless the head is frozen."""
    state = load_checkpoint(run).state
    trained = [f.B if f.R is None else f.R for f in state.adapter.values()]
    return sum(t.numel() for t in [*trained, *([] if frozen_head else state.extras.values())])


def noise_to_clip(run: dict[str, Any], parameters: int) -> float:
    """The expected norm of the noise added to one aggregate of ``run``, over the clip norm:
    z sqrt(d) / m for the mean of m clipped client updates (client level; m the expected clients
    per round), or of a batch's clipped per-example gradients (example level). The signal's norm is
    at most 1 on the same scale, so above 1 the noise dominates each step."""
    rate = run.get("sample_rate", MODES["client"]["rate"])  # runs recorded before it was: 0.2
    per = run["clients"] * rate if run["setting"] == "client" else BATCH
    return run["noise_multiplier"] * parameters**0.5 / per


def report(results: RunsFile) -> str:
    lines = [
        "| rule | lr (non-private, client level, seed 0) | validation accuracy | validation per round |",
        "|---|---:|---:|---|",
    ]
    for rule in RULES:
        chosen = chosen_lr(results, rule)
        for lr in LRS:
            if (r := results.get(f"search/{prefix(rule)}lr={lr:g}")) is not None:
                mark = " (chosen)" if lr == chosen else ""
                curve = ", ".join(f"{a:.3f}" for a in r["curve"])
                lines.append(f"| {rule} | {lr:g}{mark} | {r['validation_accuracy']:.4f} | {curve} |")
    lines += proxy_report(results)
    lines += [
        "",
        "| setting | rule | epsilon | noise multiplier | noise / clip norm | accuracy, mean ± std "
        "| share of non-private | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    finals = [r for r in results.data["runs"] if r.get("kind") == "final"]
    of = lambda mode, rule: [r for r in finals if r["setting"] == mode and r.get("rule", "ffa") == rule]  # noqa: E731
    for mode in MODES:
        for rule in RULES:
            # a variant with no run of its own without DP is against its rule's, same configuration
            plain = SEARCHED_AS[rule] if rule in PINNED_LR or rule in PROXY_OF else rule
            group, plain_runs = of(mode, rule), [r for r in of(mode, plain) if r["epsilon"] is None]
            lines += [
                row for eps in (None, *EPSILONS) if (row := report_row(mode, rule, eps, group, plain_runs))
            ]
    return "\n".join(lines + sizing_report(finals) + superseded_report(results))


def proxy_report(results: RunsFile) -> list[str]:
    """Each proxy search: the proxy's score per lr (its public validation rows, private at
    ``PROXY_EPSILON``), and the pick."""
    lines = []
    for rule in sorted(set(PROXY_OF.values())):
        found, pick = proxy_runs(results, rule), proxy_pick(results, rule)
        if not lines and found:
            lines = [
                "",
                f"| rule | lr (proxy: private at epsilon {PROXY_EPSILON:g} on the public rows, seed 0) | "
                f"validation, mean of the last {PROXY_RECENT} rounds | validation per round |",
                "|---|---:|---:|---|",
            ]
        for lr, r in found.items():
            mark = " (chosen)" if lr == pick else ""
            curve = ", ".join(f"{a:.3f}" for a in r["curve"])
            lines.append(f"| {rule} | {lr:g}{mark} | {r['proxy_score']:.4f} | {curve} |")
    return lines


def superseded_report(results: RunsFile) -> list[str]:
    """Runs replaced by a rerun, kept under ``superseded`` with the reason."""
    runs = results.data.get("superseded", [])
    lines = ["", "| superseded run | commit | why | accuracy |", "|---|---|---|---:|"] if runs else []
    for r in runs:
        accuracy = r.get("accuracy", r.get("validation_accuracy"))
        lines.append(
            f"| {r['piece']} | {r['commit']['commit'][:7]} | {r['superseded_because']} | {accuracy:.4f} |"
        )
    return lines


def sizing_report(finals: list[dict[str, Any]]) -> list[str]:
    """The noise over the clip norm at epsilon 8 had the federation more clients (client level, the
    same q and rounds, so the same z), or every client every round (q = 1, its own z), or the
    clients larger batches (example level, each batch size its own z): what each setting needs for
    the noise to fall below the signal."""
    lines = ["", "| setting | rule | at epsilon 8 with | noise / clip norm |", "|---|---|---|---:|"]
    rate = MODES["client"]["rate"]
    populations = [(100, rate), (500, rate), (1000, rate), (5000, rate), (100, 1.0)]
    z = {
        q: get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=q, steps=ROUNDS)
        for q in {q for _, q in populations}
    }
    for rule in (r for r in RULES if r not in SEARCHED_AS):  # a variant sizes as its rule
        runs = [r for r in finals if r["setting"] == "client" and r.get("rule", "ffa") == rule]
        if counts := [r["noised_parameters"] for r in runs if "noised_parameters" in r]:
            for clients, q in populations:
                m = q * clients
                ratio = z[q] * counts[0] ** 0.5 / m
                each = f"m = {m:g} a round" if q < 1 else f"all every round (z = {z[q]:.2f})"
                lines.append(f"| client level | {rule} | {clients:,} clients, {each} | {ratio:.2f} |")
    runs = [r for r in finals if r["setting"] == "example" and "smallest_client_rows" in r]
    if runs:
        rows, d = runs[0]["smallest_client_rows"], runs[0]["noised_parameters"]
        for batch in (16, 64, 256, 1024):
            z = get_noise_multiplier(
                target_epsilon=8.0, target_delta=DELTA, sample_rate=batch / rows, steps=ROUNDS * LOCAL_STEPS
            )
            ratio = z * d**0.5 / batch
            lines.append(
                f"| example level | ffa | batch {batch} of {rows:,} rows (z = {z:.2f}) | {ratio:.2f} |"
            )
    return lines


def report_row(
    mode: str, rule: str, epsilon: float | None, group: list[dict[str, Any]], plain_runs: list[dict[str, Any]]
) -> str | None:
    """The table row of one (setting, rule, epsilon) from the final runs of that setting and rule,
    its share of ``plain_runs`` (the same configuration without DP)."""
    runs = sorted((r for r in group if r["epsilon"] == epsilon), key=lambda r: r["seed"])
    if not runs:
        return None
    accs = [r["accuracy"] for r in runs]
    plain = [r["accuracy"] for r in plain_runs]
    counts = [r["noised_parameters"] for r in group if "noised_parameters" in r]
    share = f"{statistics.fmean(accs) / statistics.fmean(plain):.1%}" if plain else "–"
    z = runs[0]["noise_multiplier"]
    z_cell = "–" if z is None else f"{z:.3f}"
    ratio = "–" if z is None or not counts else f"{noise_to_clip(runs[0], counts[0]):.2f}"
    return (
        f"| {mode} level, {runs[0]['clients']} clients | {rule} | {label(epsilon).removeprefix('eps=')} | "
        f"{z_cell} | {ratio} | {mean_std(accs)} | {share} | " + ", ".join(f"{a:.4f}" for a in accs) + " |"
    )


def frame_overlaps(names: list[str]) -> str:
    """For each recorded Fed-SB run whose directory holds its checkpoint: how much of the frozen frame (B's
    column space, A's row space) it shares with the non-private Fed-SB run of the same seed, as the
    mean squared cosine of their principal angles (1: the same subspace; r / d: as two random ones)."""
    lines = ["| run | B overlap | A overlap | random (r / d) |", "|---|---:|---:|---:|"]
    for name in names:
        seed = name.rsplit("=", 1)[-1]
        reference = run_dir(f"fedsb/client/none/seed={seed}")
        if not name.startswith("fedsb") or not (run_dir(name) / "checkpoint.safetensors").is_file():
            continue
        if not (reference / "checkpoint.safetensors").is_file():
            continue
        ours, theirs = (load_checkpoint(d).state.adapter for d in (run_dir(name), reference))
        b = statistics.fmean(subspace_overlap(f.B, theirs[m].B) for m, f in ours.items())
        a = statistics.fmean(subspace_overlap(f.A.T, theirs[m].A.T) for m, f in ours.items())
        first = next(iter(ours.values()))
        lines.append(f"| {name} | {b:.3f} | {a:.3f} | {first.rank / first.B.shape[0]:.3f} |")
    return "\n".join(lines)


def subspace_overlap(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of X and Y."""
    qx, qy = (torch.linalg.qr(t.double()).Q for t in (X, Y))
    return float((qx.T @ qy).square().sum()) / min(qx.shape[1], qy.shape[1])


def main(argv: list[str] | None = None) -> int:
    parser = pieces_parser(__doc__.splitlines()[0], OUT, "sst2_glue/")
    parser.add_argument(
        "--frames", action="store_true", help="compare the Fed-SB runs' frames (needs their run directories)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = RunsFile(args.out, "dp_sst2")
    if args.frames:
        print(frame_overlaps([name for name in pieces() if results.get(name) is not None]))
        return 0
    data_dir = args.data_dir.resolve()
    missing = [f for f in (TRAIN, TEST, PUBLIC) if not (data_dir / f).is_file()]
    if not (args.list or args.report) and missing:
        print(
            f"dp_sst2: {data_dir / missing[0]} not found; pass --data-dir <folder with sst2_glue/>",
            file=sys.stderr,
        )
        return 2
    runs = pieces()

    @functools.cache
    def held_out() -> tuple[HeldOut, dict[str, Path]]:
        read = lambda f: pd.read_csv(data_dir / f, sep="\t").rename(columns={"sentence": "text"})  # noqa: E731
        files = write_splits(read(TRAIN), read(TEST), WORK / "data", 1000, 10**9, 12345)
        held = HeldOut(config_of(base_config(files, "client", 0, LRS[0])), files, LABELS)
        files["public"] = WORK / "data" / "public.tsv"
        public = read(PUBLIC)
        public[["text", "label"]].to_csv(files["public"], sep="\t", header=False, index=False)
        # the proxy's rows: the public rows less PROXY_VAL_ROWS, and those (it has no test rows)
        proxy = write_splits(public, public[:0], WORK / "data" / "proxy", PROXY_VAL_ROWS, 0, 12345)
        files |= {"proxy_train": proxy["train"], "proxy_val": proxy["val"]}
        return held, files

    @functools.cache
    def proxy_held_out() -> HeldOut:
        held, files = held_out()
        proxy = {"train": files["proxy_train"], "val": files["proxy_val"]}
        return HeldOut(held.config, proxy, LABELS)

    def execute(name: str) -> dict[str, Any]:
        mode, epsilon, seed, lr, rule = runs[name]
        if lr is not None and epsilon is not None:
            start = results.get(f"search/{prefix(rule)}lr={lr:g}")
            if start is None:
                raise SystemExit(f"dp_sst2: {name} clips from {rule}'s search run at lr {lr:g}; run it first")
            return proxy_run(proxy_held_out(), held_out()[1], name, lr, rule, start["median_update_norm"])
        if lr is not None:
            return search_run(*held_out(), name, lr, rule)
        best = chosen(results, rule)
        if best is None or "median_update_norm" not in best:
            search = f"search/{prefix(rule)}*"
            raise SystemExit(
                f"dp_sst2: {name} needs the chosen lr and its update norm; run the search first "
                f"(--only '{search}')"
            )
        return run(*held_out(), name, mode, epsilon, seed, best["lr"], rule, best["median_update_norm"])

    if not (args.list or args.report):
        supersede_stale(results, runs)
        adopt_twins(results, runs)
    run_pieces(results, [name for name, spec in runs.items() if needed(results, name, spec)], execute, args)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
