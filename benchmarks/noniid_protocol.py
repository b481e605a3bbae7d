"""The protocol of ``noniid_agnews.py``: its settings, the searches and what they pick, the
results file and the pieces the work comes in (see that script's docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from common import (
    REPO,
    TEST_FILE,
    TRAIN_FILE,
    HeldOut,
    RunsFile,
    agnews_config,
    settled_pick,
    write_splits,
)

from fedpeft.config import CalibrationSection


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
# What the lr search picked on the validation split for every rule and for the centralized baseline
# (benchmarks/README.md): the other AG News benchmarks of this model and rank (fedau, fedsa, mixed
# ranks) train at it rather than search again
SEARCHED_LR = 3e-3
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
SERVER_DEFAULTS = {knob.key: knob.grid[0] for knob in SERVER_KNOBS}
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
LR_CHECKS = ("fedavg", "stacking", "fedex", "ffa", "vcma", "fedsb", *SERVER_OPTIMIZERS)
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
    rule, rank = rule_of(method), method.partition("_r")[2]
    out: dict[str, Any] = {"strategy.name": rule, "strategy.weighting": weighting}
    if rank:
        out |= {"lora.rank": int(rank), "lora.alpha": 2.0 * int(rank)}
    return out


def rule_of(method: str) -> str:
    """The aggregation rule of ``method``: ``<rule>_r<rank>`` is ``<rule>`` at another LoRA rank."""
    return method.partition("_r")[0]


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
        (the fixed protocol's ``DEFAULT_LR`` until then, and for the methods it does not search);
        a rule at another rank trains at its rule's."""
        if not self.search:
            method = rule_of(method)
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
        return SERVER_DEFAULTS | self.searched_server(method)

    def knob_walk(self, method: str, knob: ServerKnob) -> dict[str, float] | None:
        """The picks of the knobs before ``knob``, once ``method``'s client lr search and their walks
        have settled (``knob``'s walk can run then); None until then."""
        at, searched = SERVER_KNOBS.index(knob), self.searched_server(method)
        if self.searched_lr(method) is None or len(searched) < at:
            return None  # searched_server holds the settled knobs in order, stopping at the first open one
        return {k.key: searched[k.key] for k in SERVER_KNOBS[:at]}

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
    if piece.knob is not None and results.knob_walk(piece.method, piece.knob[0]) is None:
        return None  # a server search piece runs at the client lr and earlier knobs the search picked
    if method == SERVER_OPTIMIZER:
        method = results.best_server_optimizer()
        if method is None:
            return None
    lr = piece.lr if piece.lr is not None else results.chosen_lr(method)
    return None if lr is None else (method, lr, recipe)


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
