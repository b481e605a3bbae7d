"""``fedpeft`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fedpeft.config import load_config
from fedpeft.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run N virtual clients on this machine")
    sim.add_argument("config", type=Path, help="run configuration (TOML)")
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set run.rounds=3",
    )
    sim.add_argument(
        "--run-dir", type=Path, help="where to write the run (default: a new folder in run.output_dir)"
    )
    sim.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    _add_models_parser(sub)
    return parser


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="fetch and list the known downloadable models")
    action = models.add_subparsers(dest="models_command", required=True)
    fetch = action.add_parser("fetch", help="download a known model into the fedpeft cache")
    fetch.add_argument("name", help="e.g. smollm2-135m-instruct")
    action.add_parser("list", help="show the known models and whether each is on this machine")


def _models(args: argparse.Namespace) -> int:
    from fedpeft import model_store

    if args.models_command == "fetch":
        print(model_store.fetch(args.name))
        return 0
    for model in model_store.KNOWN_MODELS.values():
        where = model_store.gguf_path(model)
        state = (
            f"present  {where}"
            if model_store.is_fetched(model)
            else f"absent   (fedpeft models fetch {model.name})"
        )
        print(f"{model.name:24} {state}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from server.app import new_run_dir
    from server.simulation import simulate

    config = load_config(args.config, args.overrides)
    run_dir = args.resume or args.run_dir or new_run_dir(config)
    simulate(config, run_dir, resume=args.resume is not None)
    print(f"run directory: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    try:
        return {"simulate": _simulate, "models": _models}[args.command](args)
    except (UserError, FileNotFoundError) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
