"""AG News under non-IID label skew: federated strategies against centralized and local-only LoRA.

MiniLM-L6 with LoRA r = 8 (alpha 16) on query/value plus the classifier head, inputs cut at 32
tokens (the median row has 41; at 64 a run takes twice as long on a 2-core machine); 10 clients
holding a Dirichlet label split of the training rows (at least 50 rows each); 20 local AdamW steps
of batch 32 per client and round; three settings of 1,000 client steps each:

- S1: alpha = 0.1, all 10 clients every round, 5 rounds;
- S2: alpha = 0.1, 5 of 10 clients every round, 10 rounds;
- S3: alpha = 1.0, all 10 clients every round, 5 rounds.

``fedsb`` (and ``fedsb_r32``, at rank 32) runs ``FEDSB_INIT_ROUNDS`` more rounds: its
initialisation (``strategies/fedsb.py``) takes two rounds that train nothing.

Rows: ``dev.tsv`` (10,001 rows) is the training data. A fixed, seeded 1,000 of its rows are held
out as the validation split, on which every hyperparameter is chosen; the other 9,001 rows are
what clients (and the baselines) train on. The server evaluates the validation split every round
(the per-round curve); a federated run's hyperparameters are judged by its mean validation accuracy
over its last 3 rounds (the final round alone swings with the clients sampled). Final accuracy is
on a fixed, seeded 2,000-row sample of ``test.tsv``, the same rows for every run, never used to
choose anything.

Two protocols. The default, *fixed*, runs every method with the client recipe ``FIXED_RECIPE``
(chosen by a first ablation on S2, see ``benchmarks/README.md``) and each method of ``LR_CHECKS``
and the centralized baseline at the lr its ``lr/`` pieces pick on the validation split (1e-3,
``DEFAULT_LR``, until the search settles; the other methods always). The search walks ``LRS`` from
1e-3, up first, and settles on the best validation score once the lrs beside it are in (3e-3
beating 1e-3 settles it: 3e-4 is not run). A run trained at another lr than
its method's pick is superseded (kept in the file under ``superseded``, with the reason) and runs
again; S1 seed 0 at the picked lr is the ``lr/`` piece itself, copied. The whole grid is about 90
runs of 6 to 8 minutes:

- ``S1|S2|S3/<method>/seed=<s>``, ``central/seed=<s>``, ``local/alpha=<a>/seed=<s>``, listed in
  the order worth running (the cheap decisive comparisons of every seed first);
- ``recipe/S1/<recipe>/seed=<s>``: S1 fedavg at lr 1e-3 under the client recipes of
  ``RECIPE_CHECKS``, to check the fixed recipe on every seed;
- ``schedule/S1-10x10/seed=<s>``: S1 fedavg at lr 1e-3 with its 1,000 client steps as 10 rounds of 10;
- ``lr/S1/<method>/lr=<lr>`` and ``lr/central/lr=<lr>``: S1 seed 0 of each method of
  ``LR_CHECKS`` (and the centralized baseline) at the lrs of ``LRS`` its walk needs: the lr search; local-only
  runs at the centralized baseline's lr;
- ``slr/S1/<method>/slr=<eta>`` then ``mom/S1/<method>/mom=<beta>``: S1 seed 0 of each method of
  ``SERVER_CHECKS`` (FedAvgM) at the client lr its search picked, walking each knob of
  ``SERVER_KNOBS`` in turn from its default (the server lr at momentum 0.9, then the momentum at the
  picked server lr; a default's run is the previous walk's pick, first the ``lr/`` piece): the
  server optimizer's search, settled and applied as the lr search is;
- ``S1|S2|S3/<method>+ccvr/seed=<s>``: that setting's run of a rule with its head
  calibrated by CCVR after the last round (``calibration.method = "ccvr"``,
  ``fedpeft/calibration.py``). CCVR only acts after training, so it runs on the stored run: the
  run's final state, every client of the setting through the same server and client code over an
  in-process grid (``fedpeft.testing.LocalGrid``), which is what the simulation would have done
  after its last round.

``--search`` runs the protocol that searches (results in ``noniid_agnews_search.json``):

- ``ablation/...``: the client-side recipes of ``RECIPES`` (weighting of clients, label-skew
  remedy, FedProx, lr decay) on S2 seed 0 with fedavg at lr 1e-3; every other federated run uses
  the one with the best validation score.
- ``search/<method>/lr=<lr>``: S1, seed 0, each method at each learning rate of ``LRS``; a method's
  lr is the one with the best validation score, and the best server optimizer of
  ``SERVER_OPTIMIZERS`` is chosen the same way. These runs are also the S1 seed-0 runs at the
  chosen lr.
- ``S1|S2|S3/<method>/seed=<s>``: the other seeds and settings, at the chosen lr.
- ``central/lr=<lr>`` then ``central/seed=<s>``: centralized LoRA, 1,000 steps on all 9,001 rows,
  lr chosen on the validation split the same way.
- ``local/alpha=<a>/seed=<s>``: each client alone on its own rows for 100 steps (what it trains
  in a federation of 1,000 client steps), at the centralized lr; mean over the 10 clients.

The work comes in pieces, each appended to one results file as it finishes (``--only`` picks
pieces by name pattern; ``--list`` shows them and what is done; a piece already in the file is
skipped unless ``--redo``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/noniid_agnews.py --list
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/noniid_agnews.py --only '*/seed=0'
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/noniid_agnews.py --search --only 'search/*'
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/noniid_agnews.py --report
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    REPO,
    TEST_FILE,
    TRAIN_FILE,
    HeldOut,
    RunsFile,
    agnews_config,
    mean_std,
    missing_agnews,
    run_scored,
    settled_pick,
    train_and_score,
    write_results,
    write_splits,
)
from rich.console import Console  # noqa: E402

from fedpeft.config import CalibrationSection  # noqa: E402
from fedpeft.data import partition  # noqa: E402
from fedpeft.testing import LocalGrid  # noqa: E402
from server.checkpoint import load_checkpoint  # noqa: E402
from server.loop import FederatedRun  # noqa: E402


@dataclass(frozen=True)
class Setting:
    alpha: float
    fraction: float
    rounds: int
    local_steps: int = 20


SETTINGS = {
    "S1": Setting(alpha=0.1, fraction=1.0, rounds=5),
    "S2": Setting(alpha=0.1, fraction=0.5, rounds=10),
    "S3": Setting(alpha=1.0, fraction=1.0, rounds=5),
}
# S1's 1,000 client steps as 10 rounds of 10 local steps: does the number of rounds close S1's gap?
SCHEDULES = {"S1-10x10": Setting(alpha=0.1, fraction=1.0, rounds=10, local_steps=10)}
CLIENTS, BATCH, MIN_ROWS, TOKENS = 10, 32, 50, 32
CLIENT_STEPS = 1000  # per setting: rounds x clients per round x local steps
LRS = (3e-4, 1e-3, 3e-3)
DEFAULT_LR = 1e-3  # where each lr search starts, and the fixed protocol's lr until a search settles
LR_WALK = sorted(LRS, key=lambda lr: abs(math.log(lr / DEFAULT_LR)))  # 1e-3, then 3e-3, then 3e-4
SEEDS = (0, 1, 2)
VAL_ROWS, TEST_ROWS, SPLIT_SEED = 1000, 2000, 12345
RECENT = 3  # a federated run is judged by its mean validation accuracy over its last rounds
BASE_METHODS = ("fedavg", "stacking", "fedex", "ffa", "vcma", "fedsb", "fedsb_r32")
FEDSB_INIT_ROUNDS = 2  # fedsb's two initialisation rounds train nothing: it gets them on top
SERVER_OPTIMIZERS = ("fedavgm", "fedadam")  # the best of these is reported as "server optimizer"


@dataclass(frozen=True)
class ServerKnob:
    """A server optimizer's hyperparameter, searched on S1 seed 0 after the client lr."""

    key: str  # the strategy's option, and the field of a run that records it
    label: str  # its name in tables
    prefix: str  # the name of its search pieces: <prefix>/S1/<method>/<prefix>=<value>
    grid: tuple[float, ...]  # walked from the first value, the strategy's default


# FedAvgM's server lr eta, then its momentum beta at the picked eta (Reddi et al. tune eta at beta =
# 0.9; Hsu et al. tune both), each walked down from the default: the server lr was added after its
# S2 seed 2 swung by 0.2 between rounds at eta = 1 (an effective step of eta / (1 - 0.9) = 10
# updates), the momentum after seeds 1 and 2 of S2 ended below 0.60 at the searched eta = 1
SERVER_KNOBS = (
    ServerKnob("server_lr", "server lr", "slr", (1.0, 0.3, 0.1)),
    ServerKnob("momentum", "momentum", "mom", (0.9, 0.6, 0.3)),
)
SERVER_CHECKS = ("fedavgm",)
# Client recipes: name -> (the strategy's weighting, [train] overrides). The ablation pieces run
# each with fedavg on S2; every other federated run uses the best on the validation split.
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "examples+none": ("examples", {"train.label_skew": "none"}),
    "examples+fedlc": ("examples", {"train.label_skew": "fedlc"}),
    "uniform+none": ("uniform", {"train.label_skew": "none"}),
    "uniform+fedlc": ("uniform", {"train.label_skew": "fedlc"}),
    "uniform+balanced": ("uniform", {"train.label_skew": "balanced_softmax"}),
    "uniform+prox": ("uniform", {"train.proximal_mu": 0.1}),
    "uniform+decay": ("uniform", {"train.lr_decay": 0.8}),
    "uniform+frozen": ("uniform", {"train.freeze_head": True}),
    "uniform+balanced+frozen": (
        "uniform",
        {"train.label_skew": "balanced_softmax", "train.freeze_head": True},
    ),
}
FIXED_RECIPE = "uniform+balanced"  # the fixed protocol's client recipe
# the fixed protocol's lr search: each of these (and the centralized baseline) along LR_WALK
LR_CHECKS = ("fedavg", "stacking", "fedex", "ffa", "vcma", *SERVER_OPTIMIZERS)
# the fixed protocol's recipe pieces (S1 fedavg), each against FIXED_RECIPE on every seed
RECIPE_CHECKS = ("uniform+none", "examples+none", "uniform+frozen", "uniform+balanced+frozen")
# CCVR's retraining lr, chosen on the validation split of S1 fedavg seed 2 (the worst seed)
CCVR_LRS = (1e-3, 1e-2, 1e-1)
CCVR_DEFAULT_LR = CalibrationSection().lr
LABELS = ("Business", "Sci/Tech", "Sports", "World")
OUT = REPO / "benchmarks" / "results" / "noniid_agnews.json"
SEARCH_OUT = OUT.with_name("noniid_agnews_search.json")
WORK = REPO / "runs" / "noniid-agnews"


def method_overrides(method: str, weighting: str, server: dict[str, float] | None = None) -> dict[str, Any]:
    """The [strategy] of ``method`` with clients weighted by ``weighting`` (a server optimizer with
    the hyperparameters ``server``, None: its defaults); ``<rule>_r<rank>`` is the rule at that LoRA
    rank (alpha 2 x rank, the scale of the other runs)."""
    if method in SERVER_OPTIMIZERS:
        out = {"strategy.name": method, "strategy.inner_options": {"weighting": weighting}}
        return out | {f"strategy.{key}": value for key, value in (server or {}).items()}
    rule, _, rank = method.partition("_r")
    out: dict[str, Any] = {"strategy.name": rule, "strategy.weighting": weighting}
    if rank:
        out |= {"lora.rank": int(rank), "lora.alpha": 2.0 * int(rank)}
    return out


def setting_overrides(setting: Setting, seed: int, lr: float, files: dict[str, Path]) -> dict[str, Any]:
    return {
        "run.seed": seed,
        "run.rounds": setting.rounds,
        "data.source": str(files["train"]),
        "data.test_source": str(files["val"]),  # the server's per-round evaluation: validation rows
        "data.num_clients": CLIENTS,
        "data.dirichlet_alpha": setting.alpha,
        "data.min_partition_size": MIN_ROWS,
        "server.fraction": setting.fraction,
        "server.min_clients": round(setting.fraction * CLIENTS),
        "train.local_steps": setting.local_steps,
        "train.batch_size": BATCH,
        "train.eval_batch_size": 128,
        "train.lr": lr,
        "model.max_length": TOKENS,
        "lora.rank": 8,
        "lora.alpha": 16.0,
        "data.labels": list(LABELS),
    }


# ---------------------------------------------------------------------------- the results file


def selection_score(run: dict[str, Any]) -> float:
    """What hyperparameters are chosen by: a federated run's mean validation accuracy over its last
    ``RECENT`` rounds (its final round alone swings with the clients sampled), a centralized run's
    final validation accuracy."""
    return run.get("val_recent", run["val_accuracy"])


def server_of(run: dict[str, Any]) -> dict[str, float] | None:
    """The ``SERVER_KNOBS`` a run of a method of ``SERVER_CHECKS`` trained at (None for the others)."""
    if run["method"].removesuffix("+ccvr") not in SERVER_CHECKS:
        return None
    return {knob.key: run.get(knob.key, knob.grid[0]) for knob in SERVER_KNOBS}


def server_text(server: dict[str, float]) -> str:
    """``server`` as a table shows it: "server lr 1, momentum 0.9"."""
    return ", ".join(f"{knob.label} {server[knob.key]:g}" for knob in SERVER_KNOBS if knob.key in server)


def method_label(run: dict[str, Any]) -> str:
    """A run's method, with its server hyperparameters where those are searched."""
    server = server_of(run)
    return run["method"] if server is None else f"{run['method']} ({server_text(server)})"


class Results(RunsFile):
    """The results file, and the choices the search pieces make (fixed ones without ``search``)."""

    def __init__(self, path: Path, search: bool) -> None:
        super().__init__(path, "noniid_agnews")
        self.search = search
        protocol = "search" if search else "fixed"
        if self.data.setdefault("protocol", protocol) != protocol:
            raise SystemExit(f"noniid_agnews: {path} holds the {self.data['protocol']} protocol; pass --out")

    def searched_lr(self, method: str) -> float | None:
        """The lr ``method``'s (or the centralized baseline's) search settled on, None while it is
        under way: the best validation score of its runs so far, once the lrs beside it on ``LRS``
        are in too. The search walks the grid from ``DEFAULT_LR`` (``LR_WALK``) and stops at a
        local best: an lr beyond it on the grid is one no unimodal curve would pick."""
        found = {lr: run for lr in LRS if (run := self.get(lr_piece(method, lr, self.search)))}
        return settled_pick(LRS, found, selection_score)

    def chosen_lr(self, method: str) -> float | None:
        """The lr ``method`` (or the centralized baseline) trains at: its search's, once settled
        (the fixed protocol's ``DEFAULT_LR`` until then, and for the methods it does not search)."""
        if not self.search and method not in (*LR_CHECKS, "central"):
            return DEFAULT_LR
        picked = self.searched_lr(method)
        return picked if picked is not None or self.search else DEFAULT_LR

    def searched_server(self, method: str) -> dict[str, float]:
        """The ``SERVER_KNOBS`` of ``method``'s search that have settled, in order (at its picked
        client lr; each walk at the values the walks before it picked): empty while the client lr
        search is under way, and each knob missing once one before it is."""
        lr, picks = self.searched_lr(method), {}
        if lr is None:
            return picks
        for knob in SERVER_KNOBS:
            found = {}
            for value in knob.grid:
                run = self.get(server_piece(method, lr, picks, knob, value))
                if run and all(server_of(run)[k] == v for k, v in picks.items()):
                    found[value] = run
            picked = settled_pick(knob.grid, found, selection_score)
            if picked is None:
                break
            picks[knob.key] = picked
        return picks

    def chosen_server(self, method: str) -> dict[str, float] | None:
        """The ``SERVER_KNOBS`` ``method`` trains at: its search's where settled, the defaults
        elsewhere; None for a method whose server optimizer is not searched (its defaults)."""
        if method not in SERVER_CHECKS:
            return None
        return {knob.key: knob.grid[0] for knob in SERVER_KNOBS} | self.searched_server(method)

    def adopt_twins(self) -> None:
        """Record S1's (and the centralized baseline's) seed-0 runs as the lr-search pieces of their
        lr too, where those are missing: the same configuration, so the same run."""
        for method in (*LR_CHECKS, "central"):
            twin = self.get("central/seed=0" if method == "central" else f"S1/{method}/seed=0")
            if twin and twin.get("recipe", FIXED_RECIPE) == FIXED_RECIPE:
                if not self.get(name := lr_piece(method, twin["lr"], search=False)):
                    self.copy(twin["piece"], name)

    def supersede_stale(self) -> None:
        """Supersede the runs of the settings and baselines trained at another lr (or server
        hyperparameters) than their method's pick (the calibrations of such a run with it), so that
        they run again."""
        for run in list(self.data["runs"]):
            piece = run["piece"]
            if piece.split("/")[0] not in (*SETTINGS, "central", "local"):
                continue  # lr/, slr/, recipe/, schedule/ and ccvr-lr/ pieces keep the lr they name
            federated = run["kind"] == "federated"
            method = run["method"].removesuffix("+ccvr") if federated else "central"
            picked, server = self.chosen_lr(method), self.chosen_server(method)
            if picked is not None and run["lr"] != picked:
                self.supersede(piece, f"its method's lr search picked {picked:g}")
            elif server is not None and server_of(run) != server:
                self.supersede(piece, f"its method's server search picked {server_text(server)}")

    def chosen_recipe(self) -> str | None:
        """The client recipe with the best validation accuracy, once every ablation piece is in."""
        if not self.search:
            return FIXED_RECIPE
        found = {name: self.get(f"ablation/S2/{name}") for name in RECIPES}
        if any(r is None for r in found.values()):
            return None
        return max(found, key=lambda name: selection_score(found[name]))

    def best_server_optimizer(self) -> str | None:
        if not self.search:
            return None  # the fixed protocol reports each server optimizer
        lrs = {m: self.chosen_lr(m) for m in SERVER_OPTIMIZERS}
        if any(lr is None for lr in lrs.values()):
            return None
        return max(SERVER_OPTIMIZERS, key=lambda m: selection_score(self.get(f"search/{m}/lr={lrs[m]:g}")))


def lr_piece(method: str, lr: float, search: bool) -> str:
    """The name of the lr-search piece of ``method`` (or ``"central"``) at ``lr`` (S1, seed 0)."""
    if search:
        return f"central/lr={lr:g}" if method == "central" else f"search/{method}/lr={lr:g}"
    return f"lr/central/lr={lr:g}" if method == "central" else f"lr/S1/{method}/lr={lr:g}"


def server_piece(method: str, lr: float, picks: dict[str, float], knob: ServerKnob, value: float) -> str:
    """The name of the search piece of ``method`` (S1, seed 0, at the client lr ``lr`` its lr search
    picked) at ``knob`` = ``value``, the knobs before it at ``picks``: at ``knob``'s default, the
    previous knob's piece at its pick (the lr search's own piece before the first)."""
    if value != knob.grid[0]:
        return knob_piece(method, knob, value)
    at = SERVER_KNOBS.index(knob)
    if at == 0:
        return lr_piece(method, lr, search=False)
    previous = SERVER_KNOBS[at - 1]
    return server_piece(method, lr, picks, previous, picks[previous.key])


def knob_piece(method: str, knob: ServerKnob, value: float) -> str:
    """The name of the search piece of ``method`` at ``knob`` = ``value``, not its default."""
    return f"{knob.prefix}/S1/{method}/{knob.prefix}={value:g}"


def chosen_server_piece(method: str, lr: float, server: dict[str, float]) -> str:
    """The search piece of ``method`` that ran at the client lr ``lr`` and the server knobs ``server``."""
    last = SERVER_KNOBS[-1]
    return server_piece(method, lr, server, last, server[last.key])


def agnews_held_out(data_dir: Path, tokens: int | None = TOKENS) -> HeldOut:
    """The training rows, the validation split and the test sample of ``prepare_files``, with
    their evaluators, inputs cut at ``tokens`` (None: the configuration's default)."""
    files = prepare_files(data_dir)
    base: dict[str, Any] = {"data.source": str(files["train"])}
    if tokens is not None:
        base["model.max_length"] = tokens
    return HeldOut(agnews_config(data_dir, base), files, list(LABELS))


def prepare_files(data_dir: Path) -> dict[str, Path]:
    """dev.tsv less the validation split, the split, and the test sample (``write_splits``)."""
    read = lambda p: pd.read_csv(p, sep="\t", header=None, names=["text", "label"])  # noqa: E731
    train, test = read(data_dir / TRAIN_FILE), read(data_dir / TEST_FILE)
    return write_splits(train, test, WORK / "data", VAL_ROWS, TEST_ROWS, SPLIT_SEED)


# ---------------------------------------------------------------------------- the pieces

SERVER_OPTIMIZER = "server_optimizer"  # the method slot filled by the best of SERVER_OPTIMIZERS


@dataclass(frozen=True)
class Piece:
    """One measurement: a federated run, a centralized run or a local-only set of runs.

    ``lr`` None means the lr chosen on the validation split (known once the search is in), and
    ``method`` ``SERVER_OPTIMIZER`` the best server optimizer of the search."""

    name: str
    kind: str
    setting: str = "S1"
    method: str = "fedavg"
    seed: int = 0
    lr: float | None = None
    recipe: str | None = None  # None: the recipe chosen on the validation split
    alpha: float = 0.1
    calibration_lr: float | None = None  # a calibrated piece's CCVR lr (None: the config default)
    knob: tuple[ServerKnob, float] | None = None  # a server search piece's knob and value


def fixed_pieces() -> list[Piece]:
    """Every piece of the fixed protocol, in the order they are worth running: per seed the
    centralized baseline, fedavg and stacking on S1 and S2 and local-only; then S3; then the other
    methods."""
    first, later = ("fedavg", "stacking"), ("fedex", "ffa", "fedsb", "vcma", *SERVER_OPTIMIZERS, "fedsb_r32")
    federated = lambda settings, methods, seed: [  # noqa: E731
        Piece(f"{setting}/{method}/seed={seed}", "federated", setting, method, seed)
        for setting in settings
        for method in methods
    ]
    out = [  # the lr search (S1, seed 0), first: the choices every other run waits for
        Piece(lr_piece(method, lr, search=False), "federated", "S1", method, 0, lr)
        for method in LR_CHECKS
        for lr in LR_WALK
    ]
    out += [Piece(lr_piece("central", lr, search=False), "centralized", lr=lr) for lr in LR_WALK]
    out += [  # named by the knob only: they run at the client lr (and knobs) the search picked
        Piece(knob_piece(method, knob, value), "federated", "S1", method, 0, knob=(knob, value))
        for method in SERVER_CHECKS
        for knob in SERVER_KNOBS
        for value in knob.grid[1:]
    ]
    for seed in SEEDS:
        out += [
            Piece(f"central/seed={seed}", "centralized", seed=seed),
            *federated(("S1", "S2"), first, seed),
        ]
        out.append(Piece(f"local/alpha=0.1/seed={seed}", "local", seed=seed, alpha=0.1))
    for seed in SEEDS:
        out += [
            *federated(("S3",), first, seed),
            Piece(f"local/alpha=1/seed={seed}", "local", seed=seed, alpha=1.0),
        ]
    for seed in SEEDS:
        out += federated(SETTINGS, later, seed)
    out += [
        Piece(f"recipe/S1/{recipe}/seed={seed}", "federated", "S1", "fedavg", seed, DEFAULT_LR, recipe)
        for seed in SEEDS
        for recipe in RECIPE_CHECKS
    ]
    out += [
        Piece(f"schedule/{name}/seed={seed}", "federated", name, "fedavg", seed, DEFAULT_LR)
        for name in SCHEDULES
        for seed in SEEDS
    ]
    out += [
        Piece(f"ccvr-lr/S1/fedavg/lr={lr:g}/seed=2", "calibrated", "S1", "fedavg", 2, calibration_lr=lr)
        for lr in CCVR_LRS
        if lr != CCVR_DEFAULT_LR  # that one is the S1/fedavg+ccvr/seed=2 piece
    ]
    out += [
        Piece(f"{setting}/{method}+ccvr/seed={seed}", "calibrated", setting, method, seed)
        for setting in SETTINGS
        for method in ("fedavg", "stacking")
        for seed in SEEDS
    ]
    out += [  # the other rules, on S1 first
        Piece(f"{setting}/{method}+ccvr/seed={seed}", "calibrated", setting, method, seed)
        for setting in ("S1", "S3", "S2")
        for method in ("fedex", "ffa", "fedsb")
        for seed in SEEDS
    ]
    return out


def search_pieces() -> list[Piece]:
    """Every piece of the protocol that searches, in the order they are worth running."""
    out = [Piece(f"ablation/S2/{recipe}", "federated", "S2", "fedavg", 0, 1e-3, recipe) for recipe in RECIPES]
    out += [
        Piece(lr_piece(method, lr, search=True), "federated", "S1", method, 0, lr)
        for method in (*BASE_METHODS, *SERVER_OPTIMIZERS)
        for lr in LR_WALK
    ]
    out += [Piece(lr_piece("central", lr, search=True), "centralized", lr=lr) for lr in LR_WALK]
    for setting in SETTINGS:
        out += [
            Piece(f"{setting}/{method}/seed={seed}", "federated", setting, method, seed)
            for method in (*BASE_METHODS, SERVER_OPTIMIZER)
            for seed in SEEDS
            if (setting, seed) != ("S1", 0)  # that run is the search run at the chosen lr
        ]
        if setting == "S1":
            out += [Piece(f"central/seed={seed}", "centralized", seed=seed) for seed in SEEDS[1:]]
    alphas = sorted({s.alpha for s in SETTINGS.values()})
    out += [
        Piece(f"local/alpha={alpha:g}/seed={seed}", "local", seed=seed, alpha=alpha)
        for alpha in alphas
        for seed in SEEDS
    ]
    return out


def resolve(piece: Piece, results: Results) -> tuple[str, float, str] | None:
    """The method, lr and client recipe ``piece`` runs with, or None while the search that picks
    them (or, for a calibration, the run it calibrates) is missing."""
    if piece.kind == "calibrated":
        trained = results.get(f"{piece.setting}/{piece.method}/seed={piece.seed}")
        return None if trained is None else (piece.method, trained["lr"], trained["recipe"])
    if piece.kind != "federated":
        lr = piece.lr if piece.lr is not None else results.chosen_lr("central")
        return None if lr is None else ("central", lr, "")
    recipe = piece.recipe or results.chosen_recipe()
    if recipe is None:
        return None
    method = piece.method
    if piece.knob is not None and not server_walk_open(piece, results):
        return None  # a server search piece runs at the client lr and earlier knobs the search picked
    if method == SERVER_OPTIMIZER:
        method = results.best_server_optimizer()
        if method is None:
            return None
    lr = piece.lr if piece.lr is not None else results.chosen_lr(method)
    return None if lr is None else (method, lr, recipe)


def server_walk_open(piece: Piece, results: Results) -> bool:
    """Whether the walk of a server search piece's knob can run: its method's client lr search and
    the walks of the knobs before it have settled."""
    searched = results.searched_server(piece.method)
    before = SERVER_KNOBS[: SERVER_KNOBS.index(piece.knob[0])]
    return results.searched_lr(piece.method) is not None and all(k.key in searched for k in before)


def settled_without(piece: Piece, results: Results) -> bool:
    """Whether ``piece`` is an lr- or server-search run, not run, that its method's search
    settled without."""
    if piece.knob is not None:
        return results.get(piece.name) is None and piece.knob[0].key in results.searched_server(piece.method)
    method = "central" if piece.kind == "centralized" else piece.method
    searching = piece.lr is not None and piece.name == lr_piece(method, piece.lr, results.search)
    return searching and results.get(piece.name) is None and results.searched_lr(method) is not None


def twin_of(piece: Piece, method: str, lr: float, results: Results) -> str | None:
    """The search piece that is the same run as ``piece`` (S1 or the centralized baseline, seed 0,
    at the lr and server knobs the searches picked), once it is in; None for any other piece."""
    if results.search or piece.seed != 0 or piece.name not in (f"S1/{method}/seed=0", "central/seed=0"):
        return None
    server = results.chosen_server(method)
    twin = lr_piece(method, lr, search=False) if server is None else chosen_server_piece(method, lr, server)
    return twin if results.get(twin) else None


def run_dir_of(piece: str) -> Path:
    """Where a federated piece's run directory (metrics, checkpoint) is kept."""
    return WORK / "runs" / piece.replace("/", "-").replace("=", "")


class Bench:
    """Runs pieces and appends their results."""

    def __init__(self, data_dir: Path, results: Results) -> None:
        self.data_dir, self.results = data_dir, results
        self.files = prepare_files(data_dir)
        base = {
            "data.source": str(self.files["train"]),
            "train.eval_batch_size": 128,
            "model.max_length": TOKENS,
        }
        self.scorers = HeldOut(agnews_config(data_dir, base), self.files, list(LABELS))

    def run(self, piece: Piece, method: str, lr: float, recipe: str) -> dict[str, Any]:
        if piece.kind == "federated":
            return self.federated(piece, method, lr, recipe)
        if piece.kind == "calibrated":
            return self.calibrated(piece, method, lr, recipe)
        if piece.kind == "centralized":
            return self.centralized(piece.seed, lr)
        return self.local_only(piece.alpha, piece.seed, lr)

    def config(self, setting: Setting, seed: int, lr: float, extra: dict[str, Any] | None = None) -> Any:
        return agnews_config(
            self.data_dir, {**setting_overrides(setting, seed, lr, self.files), **(extra or {})}
        )

    def server_for(self, piece: Piece, method: str) -> dict[str, float] | None:
        """The server knobs a federated piece runs at: a server search piece's own value after the
        picks before it, a setting's the search's choice; None (the defaults) for the lr search."""
        if piece.knob is not None:
            knob, value = piece.knob
            return self.results.chosen_server(method) | {knob.key: value}
        return None if piece.lr is not None else self.results.chosen_server(method)

    def federated(self, piece: Piece, method: str, lr: float, recipe: str) -> dict[str, Any]:
        weighting, train = RECIPES[recipe]
        server = self.server_for(piece, method)
        extra = {**method_overrides(method, weighting, server), **train}
        setting = SETTINGS.get(piece.setting) or SCHEDULES[piece.setting]
        if method.startswith("fedsb"):
            setting = dataclasses.replace(setting, rounds=setting.rounds + FEDSB_INIT_ROUNDS)
        config = self.config(setting, piece.seed, lr, extra)
        run_dir = run_dir_of(piece.name)
        metrics = ("variance_ratio", "merged_rank", "discarded_energy")
        label = f"{piece.name}: {method} lr {lr:g}" + (f" {server_text(server)}" if server else "")
        result = run_scored(label, config, self.scorers.evaluator("test"), run_dir, metrics)
        curve = [result["curve"][k] for k in sorted(result["curve"], key=int)]
        return {
            "setting": piece.setting,
            "method": method,
            "kind": "federated",
            "seed": piece.seed,
            "lr": lr,
            **(server or {}),
            "recipe": recipe,
            "weighting": weighting,
            "train": train,
            "final_accuracy": result["test_accuracy"],
            "test_recall": self.scorers.recall(run_dir, "test"),  # per class
            "val_accuracy": curve[-1],
            "val_recent": statistics.fmean(curve[-RECENT:]),
            "test_rows": TEST_ROWS,
            "curve": curve,  # validation accuracy per round, from round 0
            "seconds": result["seconds"],
            "bytes_up_per_round": result["bytes_up_per_round"],
            "bytes_up_final_round": result["bytes_up_final_round"],  # a training round for every rule
            **{k: result[k] for k in metrics if k in result},
        }

    def calibrated(self, piece: Piece, method: str, lr: float, recipe: str) -> dict[str, Any]:
        """The stored ``<setting>/<method>/seed=<s>`` run's final state calibrated by CCVR: a
        ``FederatedRun`` of the same configuration plus ``calibration.method = "ccvr"``, holding
        that state, calibrates over an in-process grid of the setting's clients."""
        source = f"{piece.setting}/{method}/seed={piece.seed}"
        trained = self.results.get(source)
        if trained is None or not (run_dir_of(source) / "checkpoint.safetensors").is_file():
            raise SystemExit(f"{piece.name} calibrates the run of {source}: run that piece first")
        weighting, train = RECIPES[recipe]
        extra = {**method_overrides(method, weighting), **train, "calibration.method": "ccvr"}
        if piece.calibration_lr is not None:
            extra["calibration.lr"] = piece.calibration_lr
        config = self.config(SETTINGS[piece.setting], piece.seed, lr, extra)
        run_dir = run_dir_of(piece.name)
        shutil.rmtree(run_dir, ignore_errors=True)
        run = FederatedRun(config, run_dir, console=Console(quiet=True))
        run.state = load_checkpoint(run_dir_of(source)).state
        started = time.perf_counter()
        run.calibrate(LocalGrid(CLIENTS))
        seconds = time.perf_counter() - started
        row = run.recorder.rounds[-1]
        test = self.scorers.evaluator("test")(run.state, init_seed=0)["eval_accuracy"]
        print(f"[{piece.name}] test accuracy {trained['final_accuracy']:.4f} -> {test:.4f}", flush=True)
        keep = ("lr", "recipe", "weighting", "train", "bytes_up_per_round", "bytes_up_final_round")
        return {
            **{k: trained[k] for k in keep if k in trained},
            "setting": piece.setting,
            "method": f"{method}+ccvr",
            "kind": "federated",
            "calibrated_from": source,
            "seed": piece.seed,
            "final_accuracy": test,
            "uncalibrated_accuracy": trained["final_accuracy"],
            "test_recall": self.scorers.recall(run_dir, "test"),
            "val_accuracy": row["eval_accuracy"],
            "curve": [*trained["curve"], row["eval_accuracy"]],  # the calibrated head last
            "calibration_clients": row["calibration_clients"],
            "test_rows": TEST_ROWS,
            "seconds": round(seconds, 1),
        }

    def centralized(self, seed: int, lr: float) -> dict[str, Any]:
        config = self.config(SETTINGS["S1"], seed, lr)
        splits = self.scorers.with_test()
        print(
            f"\n[centralized] seed {seed} lr {lr:g}: {CLIENT_STEPS} steps on {len(splits.train)} rows",
            flush=True,
        )
        result = train_and_score(
            config, splits, splits.train, CLIENT_STEPS, {"val": self.scorers.sets["val"]}
        )
        print(f"[centralized] test accuracy {result['test_accuracy']:.4f}", flush=True)
        return {
            "setting": "all",
            "method": "centralized",
            "kind": "centralized",
            "seed": seed,
            "lr": lr,
            "final_accuracy": result["test_accuracy"],
            "val_accuracy": result["val_accuracy"],
            "test_rows": TEST_ROWS,
            "optimizer_steps": CLIENT_STEPS,
            "seconds": result["seconds"],
        }

    def add_recall(self) -> None:
        """Per-class test recall for the federated runs recorded before it was measured (their run
        directories must still exist)."""
        for run in self.results.data["runs"]:
            run_dir = run_dir_of(run["piece"])
            if run["kind"] == "federated" and "test_recall" not in run and run_dir.is_dir():
                run["test_recall"] = self.scorers.recall(run_dir, "test")
                print(f"[{run['piece']}] recall {run['test_recall']}", flush=True)
        write_results(self.results.data, self.results.path)

    def local_only(self, alpha: float, seed: int, lr: float) -> dict[str, Any]:
        config = self.config(Setting(alpha=alpha, fraction=1.0, rounds=5), seed, lr)
        splits = self.scorers.with_test()
        steps = CLIENT_STEPS // CLIENTS
        started, scores = time.perf_counter(), []
        for k in range(CLIENTS):
            rows = partition(splits.train, config.data, k, seed)
            scores.append(train_and_score(config, splits, rows, steps)["test_accuracy"])
            print(f"[local-only] alpha {alpha:g} seed {seed} client {k}: {len(rows)} rows, {scores[-1]:.4f}")
        return {
            "setting": f"alpha={alpha:g}",
            "method": "local",
            "kind": "local",
            "seed": seed,
            "lr": lr,
            "alpha": alpha,
            "final_accuracy": statistics.fmean(scores),
            "per_client": scores,
            "test_rows": TEST_ROWS,
            "optimizer_steps_per_client": steps,
            "seconds": round(time.perf_counter() - started, 1),
        }


# ---------------------------------------------------------------------------- the report

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
        lr, searched = results.searched_lr(method), results.searched_server(method)
        before = SERVER_KNOBS[: SERVER_KNOBS.index(knob)]
        if lr is None or any(k.key not in searched for k in before):
            continue
        name = f"{method} (lr {lr:g}" + "".join(f", {k.label} {searched[k.key]:g}" for k in before) + ")"
        cells[name] = [results.get(server_piece(method, lr, searched, knob, value)) for value in knob.grid]
        picks[name] = searched.get(knob.key)
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
                spread = [[mean - min(calibrated)], [max(calibrated) - mean]]
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


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding agnews/alps/")
    p.add_argument("--only", help="comma-separated name patterns of pieces to run, e.g. 'search/*,central/*'")
    p.add_argument("--list", action="store_true", help="list the pieces and which are done")
    p.add_argument("--report", action="store_true", help="print the tables and write the plot only")
    p.add_argument("--redo", action="store_true", help="rerun pieces already in the results file")
    p.add_argument("--search", action="store_true", help="the protocol that searches lr and recipe")
    p.add_argument("--recall", action="store_true", help="add per-class test recall to runs that lack it")
    p.add_argument(
        "--out", type=Path, help=f"results file (default {OUT.name}, {SEARCH_OUT.name} with --search)"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out = args.out or (SEARCH_OUT if args.search else OUT)
    results = Results(args.out, args.search)
    everything = search_pieces() if args.search else fixed_pieces()
    patterns = args.only.split(",") if args.only else ["*"]
    selected = [x for x in everything if any(fnmatch.fnmatch(x.name, pat) for pat in patterns)]
    if args.list:
        for piece in everything:
            done = results.get(piece.name)
            if done:
                state = f"done ({done['final_accuracy']:.4f})"
            elif settled_without(piece, results):
                state = "not needed"
            else:
                state = "ready" if resolve(piece, results) else "waits"
            print(f"{piece.name:40s} {state}")
        return 0
    if not args.report:
        data_dir = args.data_dir.resolve()
        if (absent := missing_agnews(data_dir)) is not None:
            print(
                f"noniid_agnews: {absent} not found; pass --data-dir <folder with agnews/alps/>",
                file=sys.stderr,
            )
            return 2
        bench = Bench(data_dir, results)
        if not args.search:
            results.adopt_twins()
            results.supersede_stale()
        if args.recall:
            bench.add_recall()
        for piece in selected if not args.recall else []:
            if results.get(piece.name) and not args.redo:
                continue
            if settled_without(piece, results):
                print(f"[{piece.name}] not needed: its method's lr search settled without it")
                continue
            chosen = resolve(piece, results)
            if chosen is None:
                print(f"[{piece.name}] skipped: it waits for the search that picks its lr (--list)")
                continue
            if twin := twin_of(piece, chosen[0], chosen[1], results):
                results.copy(twin, piece.name)
                if run_dir_of(twin).is_dir():
                    shutil.copytree(run_dir_of(twin), run_dir_of(piece.name), dirs_exist_ok=True)
                print(f"[{piece.name}] is {twin}: copied")
                continue
            results.measure(piece.name, lambda piece=piece, chosen=chosen: bench.run(piece, *chosen))
    plot(results, args.out.with_suffix(".png"))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
