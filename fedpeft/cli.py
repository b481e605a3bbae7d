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
    return parser


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
        return {"simulate": _simulate}[args.command](args)
    except (UserError, FileNotFoundError) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
