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

This script runs the pieces; ``noniid_protocol.py`` holds the settings, the searches and the pieces,
``noniid_report.py`` the tables and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_DATA_DIR,
    HeldOut,
    agnews_config,
    missing_agnews,
    run_scored,
    train_and_score,
    write_results,
)
from noniid_protocol import (
    CLIENT_STEPS,
    CLIENTS,
    FEDSB_INIT_ROUNDS,
    LABELS,
    OUT,
    RECENT,
    RECIPES,
    SCHEDULES,
    SEARCH_OUT,
    SERVER_DEFAULTS,
    SETTINGS,
    TEST_ROWS,
    TOKENS,
    Piece,
    Results,
    Setting,
    fixed_pieces,
    method_overrides,
    prepare_files,
    resolve,
    run_dir_of,
    search_pieces,
    server_text,
    setting_overrides,
    settled_without,
    twin_of,
)
from noniid_report import plot, report
from rich.console import Console

from fedpeft.data import partition
from fedpeft.testing import LocalGrid
from server.checkpoint import load_checkpoint
from server.loop import FederatedRun


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
        picks before it (the defaults after it), a setting's the search's choice; None (the
        defaults) for the lr search."""
        if piece.knob is not None:
            knob, value = piece.knob
            return SERVER_DEFAULTS | self.results.knob_walk(method, knob) | {knob.key: value}
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
        result = run_scored(label, config, self.scorers.evaluator("test", config.lora), run_dir, metrics)
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
        test = self.scorers.evaluator("test", config.lora)(run.state, init_seed=0)["eval_accuracy"]
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
