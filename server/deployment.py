"""``fedpeft server``: a Flower SuperLink with TLS and SuperNode authentication, running one fedpeft run.

Flower is the distributed engine; this module only drives its commands, the way an operator would:

1. start ``flower-superlink`` with the TLS certificate from ``fedpeft certs`` and SuperNode
   authentication enabled (or ``--insecure``, loudly);
2. register every client public key of the certificate directory (``flwr supernode register``);
3. submit the run with ``flwr run`` (this project is the Flower app) and stream its log;
4. stop the SuperLink when the run ends.

Everything Flower keeps (its app installs, the SuperLink's log) goes to ``RUN_DIR/flower/``.
No dependency is installed at run time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedpeft.certs import CertsLayout
from fedpeft.config import load_config
from fedpeft.processes import FlowerCommandError, ProcessTree, flower_command, flower_env, start_watchdog
from fedpeft.tasks import get_task
from server.app import new_run_dir
from server.loop import build_strategy, check_run_dir
from server.superlink import REFUSED

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedpeft"
STARTUP_SECONDS = 60.0


class DeploymentError(FlowerCommandError):
    """The SuperLink could not be started or driven; the message says what to do."""


@dataclass(frozen=True)
class ServerOptions:
    """What ``fedpeft server`` was asked to do."""

    config: Path
    overrides: tuple[str, ...] = ()
    run_dir: Path | None = None
    resume: bool = False
    certs_dir: Path | None = None
    insecure: bool = False
    host: str = "0.0.0.0"
    port: int = 9092


@dataclass(frozen=True)
class Deployment:
    """Checked server options: everything that can fail has been tried before a SuperLink starts."""

    config: Path
    overrides: tuple[str, ...]
    run_dir: Path
    resume: bool
    certs: CertsLayout | None  # None: --insecure
    host: str
    port: int


def prepare(options: ServerOptions) -> Deployment:
    """Check the certificates, configuration, server-side data, strategy and run directory."""
    if options.insecure == (options.certs_dir is not None):
        raise DeploymentError(
            "pass --certs DIR (made by `fedpeft certs`) for TLS and client authentication, "
            "or --insecure for a local experiment (not both)"
        )
    certs = CertsLayout(options.certs_dir) if options.certs_dir else None
    overrides = list(options.overrides)
    if certs is not None:
        certs.check_server_files()
        # The federation is the registered clients; a user's own --set still wins.
        overrides.insert(0, f"data.num_clients={len(certs.client_public_keys())}")
    config = load_config(options.config, overrides)
    config.faults.refuse_deployment()
    get_task(config.model.task).server_splits(config.data)
    if config.server.evaluate and not config.data.test_source:
        raise DeploymentError(
            "server.evaluate needs a held-out file on the server: set data.test_source, "
            "or server.evaluate=false"
        )
    build_strategy(config)
    run_dir = options.run_dir or new_run_dir(config)
    check_run_dir(run_dir, options.resume)
    return Deployment(
        options.config, tuple(overrides), run_dir, options.resume, certs, options.host, options.port
    )


def serve(options: Deployment, console: Console) -> Path:
    """Run the federation described by ``options`` to its end; returns the run directory."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise DeploymentError(f"{APP_DIR} holds no pyproject.toml; run fedpeft server from a source checkout")
    home = options.run_dir / "flower"
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    _write_connection(home, options)
    if options.certs is None:
        console.print(
            "[bold red]WARNING: --insecure: no TLS and no client authentication. Anyone who can reach "
            f"port {options.port} can join the federation and read the global adapter. Use it only for "
            "local experiments.[/bold red]"
        )
    log_path = home / "superlink.log"
    _check_port_free(options.host, options.port)
    watchdog = start_watchdog()  # a SIGKILLed server takes its SuperLink and run processes with it
    superlink = ProcessTree(_start_superlink(options, env, log_path))
    submission: ProcessTree | None = None
    try:
        _wait_listening(options.port, superlink.process, log_path)
        console.print(
            f"SuperLink listening on {options.host}:{options.port} (log: {log_path})", soft_wrap=True
        )
        if options.certs is not None:
            _register_clients(options.certs, env, console)
        submission = ProcessTree(_submit_run(options, env))
        refusals = RefusalRelay(log_path, console)
        while submission.running():
            if not superlink.running():
                raise DeploymentError(f"the SuperLink stopped during the run; see {log_path}")
            refusals.poll()
            time.sleep(1.0)
    finally:
        if submission is not None:
            submission.stop()
        superlink.stop()
        watchdog.terminate()
    if not (options.run_dir / "summary.json").is_file():
        raise DeploymentError(
            f"the run ended before finishing; see the log above and {log_path}; "
            f"continue it with --resume {options.run_dir}"
        )
    return options.run_dir


class RefusalRelay:
    """Prints on the server's console, once per key, each client key the SuperLink refused
    (``server.superlink.REFUSED`` lines in its log): an operator sees who knocked."""

    def __init__(self, log_path: Path, console: Console) -> None:
        self.log_path, self.console = log_path, console
        self.offset = log_path.stat().st_size if log_path.is_file() else 0
        self.seen: set[str] = set()

    def poll(self) -> None:
        if not self.log_path.is_file():
            return
        with self.log_path.open("rb") as log:
            log.seek(self.offset)
            text = log.read()
        complete = text.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        self.offset += complete
        for line in text[:complete].decode(errors="replace").splitlines():
            if REFUSED in line:
                key = line.split(REFUSED, 1)[1].strip()
                if key not in self.seen:
                    self.seen.add(key)
                    self.console.print(
                        f"[yellow]refused a client whose key is not registered: {key} (the client's "
                        "refusal names the same key; register its .pub in the certs directory's "
                        "clients/ and restart the server)[/yellow]",
                        soft_wrap=True,
                    )


def _write_connection(home: Path, options: Deployment) -> None:
    """The ``flwr`` CLI's connection to our SuperLink's Control API (reached on loopback)."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f'address = "localhost:{options.port}"')
    if options.certs is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(options.certs.ca_cert.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _start_superlink(options: Deployment, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "server.superlink",  # flower-superlink, its Control and Runtime APIs refused to other hosts
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--disable-runtime-dependency-installation",
    ]
    if options.certs is None:
        cmd.append("--insecure")
    else:
        certs = options.certs
        cmd += ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key)]
        cmd += ["--ssl-ca-certfile", str(certs.ca_cert), "--enable-supernode-auth"]
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _check_port_free(host: str, port: int) -> None:
    """Refuse to start on a port something already listens on: most often the SuperLink of a
    server that was killed before its watchdog existed, which would otherwise answer our probe."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise DeploymentError(
                f"port {port} is in use, often by a SuperLink left running by a server that was killed "
                f"(`ss -ltnp 'sport = :{port}'` shows it; stop it), or choose another with --port"
            ) from None


def _wait_listening(port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise DeploymentError(
                f"the SuperLink exited ({process.returncode}): {' | '.join(tail)}; "
                f"is port {port} already in use? choose another with --port"
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeploymentError(
        f"the SuperLink did not listen on port {port} within {STARTUP_SECONDS:g}s; see {log_path}"
    )


def _register_clients(certs: CertsLayout, env: dict[str, str], console: Console) -> None:
    """Allow exactly the clients whose public keys are in the certificate directory."""
    for key in certs.client_public_keys():
        name = key.name.removesuffix(".pub")
        done = subprocess.run(
            [flower_command("flwr"), "supernode", "register", str(key), CONNECTION, "--name", name],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or "registered successfully" not in done.stdout:
            raise DeploymentError(
                f"could not register client key {key}: {(done.stdout + done.stderr).strip()}"
            )
        console.print(f"registered client {name} ({key})", soft_wrap=True)


def _submit_run(options: Deployment, env: dict[str, str]) -> subprocess.Popen:
    """``flwr run`` this project on our SuperLink and stream the ServerApp's log until it ends."""
    settings = {
        "config": str(options.config.resolve()),
        "overrides": ";".join(options.overrides),
        "run-dir": str(options.run_dir.resolve()),
        "resume": options.resume,
        "deployment": True,
    }
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
    cmd = [flower_command("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--stream"]
    return subprocess.Popen(cmd, env=env)
