"""``fedpeft`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fedpeft.config import load_config
from fedpeft.errors import UserError


def _add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set run.rounds=3",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--set``, ``--run-dir`` and ``--resume``: shared by ``simulate`` and ``server``."""
    _add_set_option(parser)
    parser.add_argument(
        "--run-dir", type=Path, help="where to write the run (default: a new folder in run.output_dir)"
    )
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run N virtual clients on this machine")
    sim.add_argument("config", type=Path, help="run configuration (TOML)")
    sim.add_argument("--verbose", action="store_true", help="show the virtual clients' own output (Ray's)")
    _add_run_options(sim)

    certs = sub.add_parser("certs", help="make TLS certificates and client keys for a deployment")
    certs.add_argument("dir", type=Path, help="directory to write (an existing CA in it is reused)")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="a host name or IP address clients use to reach the server (repeatable; "
        "localhost and 127.0.0.1 are always included)",
    )
    certs.add_argument("--clients", nargs="+", default=[], metavar="NAME", help="one key pair per client")

    server = sub.add_parser("server", help="run a federation with real clients (a Flower SuperLink)")
    server.add_argument("--config", type=Path, required=True, help="run configuration (TOML)")
    server.add_argument("--certs", type=Path, help="directory made by `fedpeft certs`")
    server.add_argument(
        "--insecure", action="store_true", help="no TLS, no client authentication (local experiments only)"
    )
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    server.add_argument("--port", type=int, default=9092, help="port for clients (default: 9092)")
    _add_run_options(server)

    client = sub.add_parser("client", help="join a federation with this machine's private data")
    client.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    client.add_argument("--data", type=Path, required=True, help="this client's training data file")
    client.add_argument("--rank", type=int, help="this client's LoRA rank (default: the server's lora.rank)")
    client.add_argument("--key", type=Path, help="this client's private key (clients/NAME)")
    client.add_argument("--ca", type=Path, help="the CA certificate (ca.pem from `fedpeft certs`)")
    client.add_argument("--name", help="client name in the server's logs (default: the key's file name)")
    client.add_argument("--insecure", action="store_true", help="no TLS (local experiments only)")
    client.add_argument(
        "--connect-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to keep trying to reach the server (default: 600)",
    )
    client.add_argument("--verbose", action="store_true", help="show the SuperNode's tracebacks in full")
    client.add_argument(
        "--state-dir",
        type=Path,
        help="where this client keeps what it carries between rounds (a FedSA personal B, its DP step "
        "count), so a restart resumes it (default: $XDG_STATE_HOME/fedpeft or ~/.local/state/fedpeft)",
    )
    client.add_argument(
        "--config",
        type=Path,
        help="the run's configuration (the server's TOML): check the data against it before joining",
    )
    client.add_argument(
        "--inject-fault",
        metavar="KIND",
        help="misbehave on purpose to test the server's fault handling: nan or wrong-shape",
    )
    export = sub.add_parser("export", help="write a finished run's adapter merged into its base model")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    export.add_argument(
        "--merged", type=Path, required=True, metavar="OUT", help="directory for the full model"
    )
    frame = sub.add_parser(
        "frame", help='compute Fed-SB\'s frame from public rows (for [strategy] init = "public")'
    )
    frame.add_argument("config", type=Path, help="the run configuration (TOML) the frame is for")
    frame.add_argument("--data", type=Path, required=True, help="public rows, in a client data file's format")
    frame.add_argument("--out", type=Path, required=True, help="the frame file to write (safetensors)")
    _add_set_option(frame)

    compare = sub.add_parser("compare", help="compare finished runs: one plot and a table of final figures")
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories")
    compare.add_argument(
        "--out", type=Path, default=Path("compare.png"), help="the plot (default: compare.png)"
    )
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


def _print_finished(run_dir: Path) -> None:
    """The last lines of a run: where it is, and the base model its adapter loads on."""
    print(f"run directory: {run_dir}")
    summary = run_dir / "summary.json"
    if summary.is_file():
        base = json.loads(summary.read_text())["base_model"]
        print(f"adapter: {run_dir / 'adapter'} (load it on the base model {base})")


def _simulate(args: argparse.Namespace) -> int:
    from fedpeft.processes import start_watchdog
    from server.app import new_run_dir
    from server.simulation import simulate

    config = load_config(args.config, args.overrides)
    run_dir = args.resume or args.run_dir or new_run_dir(config)
    start_watchdog()  # Ray's agents must not outlive a killed simulation
    simulate(config, run_dir, resume=args.resume is not None, verbose=args.verbose)
    _print_finished(run_dir)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedpeft.certs import make_certs

    layout = make_certs(args.dir, args.hosts, args.clients)
    print(f"server: {layout.server_cert} and {layout.server_key} (keep the key on the server)")
    print(f"every client: {layout.ca_cert}")
    for name in args.clients:
        print(f"client {name}: {layout.client_key(name)} (its private key; give it to that client only)")
    keys = len(layout.client_public_keys())
    print(f"the server registers the {keys} client public keys in {args.dir}/clients")
    return 0


def _server(args: argparse.Namespace) -> int:
    from rich.console import Console

    from server.deployment import ServerOptions, prepare, serve

    options = ServerOptions(
        config=args.config,
        overrides=tuple(args.overrides),
        run_dir=args.resume or args.run_dir,
        resume=args.resume is not None,
        certs_dir=args.certs,
        insecure=args.insecure,
        host=args.host,
        port=args.port,
    )
    run_dir = serve(prepare(options), Console())
    _print_finished(run_dir)
    return 0


def _client(args: argparse.Namespace) -> int:
    from client.supernode import ClientOptions, run_client

    name = args.name or (args.key.name if args.key else args.data.stem)
    options = ClientOptions(
        server=args.server,
        data=args.data,
        name=name,
        rank=args.rank,
        key=args.key,
        ca=args.ca,
        insecure=args.insecure,
        connect_timeout=args.connect_timeout,
        inject_fault=args.inject_fault,
        config=args.config,
        verbose=args.verbose,
        **({"state_dir": args.state_dir} if args.state_dir else {}),
    )
    return run_client(options)


def _export(args: argparse.Namespace) -> int:
    from fedpeft.export import export_merged

    summary_path = args.run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{args.run_dir} is not a finished run (no summary.json); pass a run directory")
    summary = json.loads(summary_path.read_text())
    labelled = (args.run_dir / "adapter" / "labels.json").is_file()
    labels = summary["label_names"] if labelled else None
    print(export_merged(args.run_dir / "adapter", summary["base_model"], args.merged, labels))
    return 0


def _frame(args: argparse.Namespace) -> int:
    from server.public_frame import write_public_frame

    if not args.data.is_file():
        raise UserError(f"public rows file {args.data} does not exist; pass --data FILE")
    print(write_public_frame(load_config(args.config, args.overrides), args.data, args.out))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from server.compare import compare

    print(compare(args.run_dirs, args.out))
    print(f"plot: {args.out}")
    return 0


COMMANDS = {
    "simulate": _simulate,
    "models": _models,
    "certs": _certs,
    "server": _server,
    "client": _client,
    "compare": _compare,
    "frame": _frame,
    "export": _export,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    try:
        return COMMANDS[args.command](args)
    except (UserError, FileNotFoundError) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the commands stop what they started on the way out
        print("fedpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
