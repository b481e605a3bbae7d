"""``fedpeft client``: a Flower SuperNode whose node settings point at this client's private data.

The data file is read only here, by the ClientApp that the SuperNode runs; only LoRA factors,
example counts and training metrics leave the machine. Before starting the SuperNode, a TLS probe
of the server turns the usual set-up mistakes (wrong CA, TLS on one side only) into one clear line,
and the SuperNode's own exit is translated the same way (an unregistered key).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from client.preflight import check_data
from client.settings import CLIENT_ID, DATA_PATH, FAULT_KINDS, INJECT_FAULT, RANK, STATE_DIR
from fedpeft.certs import key_id_of_file
from fedpeft.errors import UserError
from fedpeft.processes import ProcessTree, flower_env, start_watchdog

PROBE_SECONDS = 5.0
ACTIVATION_FAILED = "Failed to activate SuperNode"  # Flower's words for a key it does not know
UNREACHABLE = "Giving up reconnection"
MARKERS = (ACTIVATION_FAILED, UNREACHABLE)
ACTIVATION_ATTEMPTS = 3  # the key is refused for good on the third refusal in a row
REJOIN_SECONDS = 10.0


class ClientError(UserError):
    """A client that cannot join; the message says what to fix."""


def default_state_dir() -> Path:
    """Where a client keeps what it carries between rounds unless told otherwise:
    ``$XDG_STATE_HOME/fedpeft`` (``~/.local/state/fedpeft``)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedpeft"


@dataclass(frozen=True)
class ClientOptions:
    """What ``fedpeft client`` was asked to do."""

    server: str
    data: Path
    name: str
    rank: int | None = None
    key: Path | None = None
    ca: Path | None = None
    insecure: bool = False
    connect_timeout: float = 600.0
    inject_fault: str | None = None
    config: Path | None = None  # the run's TOML: check the data against it before joining
    verbose: bool = False  # the SuperNode's tracebacks in full
    state_dir: Path = field(default_factory=default_state_dir)  # client/node_state.py

    def check(self) -> None:
        if not self.data.is_file():
            raise ClientError(
                f"data file {self.data} does not exist; pass this client's own file with --data"
            )
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit():
            raise ClientError(f"--server {self.server!r} must be HOST:PORT, e.g. 192.0.2.10:9092")
        if self.insecure and self.key is not None:
            raise ClientError("--key needs TLS: drop --insecure and pass the server's CA with --ca")
        if not self.insecure:
            for flag, path in (("--ca", self.ca), ("--key", self.key)):
                if path is None or not path.is_file():
                    raise ClientError(
                        f"{flag} {path or ''} is not a file; pass the files `fedpeft certs` made "
                        "(ca.pem and clients/NAME), or --insecure for a server started with --insecure"
                    )
        if self.rank is not None and self.rank < 1:
            raise ClientError("--rank must be at least 1")
        if self.inject_fault is not None and self.inject_fault not in FAULT_KINDS:
            raise ClientError(f"--inject-fault must be one of {', '.join(FAULT_KINDS)}")

    def node_config(self) -> str:
        """Flower's ``--node-config``: space-separated ``key=value`` with TOML values."""
        settings: dict[str, str | int] = {
            DATA_PATH: str(self.data.resolve()),
            CLIENT_ID: self.name,
            STATE_DIR: str(self.state_dir.expanduser().resolve()),
        }
        if self.rank is not None:
            settings[RANK] = self.rank
        if self.inject_fault is not None:
            settings[INJECT_FAULT] = self.inject_fault
        return " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())


def run_client(options: ClientOptions) -> int:
    """Serve the federation until stopped (Ctrl-C or SIGTERM): run after run, and across server
    restarts. A restarted server forgets its SuperNodes, so a SuperNode that the server ends is
    started again. A refused key is retried a few times first: a server that is just starting
    accepts connections a moment before it has registered its clients."""
    options.check()
    _say(options, f"data: {check_data(options.data, options.config)}")  # one line, and exit, if unusable
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the SuperNode is stopped with us
    if options.insecure:
        _say(options, "WARNING: --insecure: no TLS and no authentication; for local experiments only")
    _say(options, f"joining {options.server} with {options.data}")
    refusals = 0
    while True:
        probe_server(options)
        returncode, output = _run_supernode(options)
        if ACTIVATION_FAILED in output.seen:
            refusals += 1
            if refusals == ACTIVATION_ATTEMPTS:
                raise ClientError(explain_exit(output, options))
            _say(options, f"the server did not accept this key (yet); retry {refusals} of 2")
        elif returncode != 0:
            raise ClientError(explain_exit(output, options))
        else:
            refusals = 0
            _say(options, "the server ended this session; joining again")
        time.sleep(REJOIN_SECONDS)


def _say(options: ClientOptions, message: str) -> None:
    print(f"client {options.name}: {message}", flush=True)


@dataclass
class SuperNodeOutput:
    """What a SuperNode printed: which of ``MARKERS`` appeared, and its last lines."""

    seen: set[str] = field(default_factory=set)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def add(self, line: str) -> None:
        self.seen.update(marker for marker in MARKERS if marker in line)
        self.tail.append(line)


def _run_supernode(options: ClientOptions) -> tuple[int, SuperNodeOutput]:
    """One SuperNode, its output forwarded as it comes; returns its exit code and output."""
    with tempfile.TemporaryDirectory(prefix=f"fedpeft-client-{options.name}-") as home:
        process = subprocess.Popen(
            _supernode_command(options),
            env=flower_env(Path(home)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        tree = ProcessTree(process)
        watchdog = start_watchdog(Path(home))  # a SIGKILLed client takes its SuperNode and folder with it
        output = SuperNodeOutput()
        forward = threading.Thread(
            target=_forward, args=(process.stdout, output, options.verbose), daemon=True
        )
        forward.start()
        try:
            while tree.running():
                time.sleep(1.0)
        finally:
            tree.stop(grace=5.0)
            forward.join(timeout=5.0)
            watchdog.terminate()
    return process.returncode, output


def _supernode_command(options: ClientOptions) -> list[str]:
    # flower-supernode, running the fedpeft installed here for every message (client/installed.py)
    cmd = [sys.executable, "-m", "client.installed", "--superlink", options.server]
    cmd += ["--node-config", options.node_config(), "--port", str(_free_port())]
    cmd += ["--max-wait-time", str(options.connect_timeout)]
    if options.insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(options.ca), "--auth-supernode-private-key", str(options.key)]


def _forward(stream: IO[str], output: SuperNodeOutput, verbose: bool = False) -> None:
    fold = TracebackFold(show=verbose)
    for line in stream:
        output.add(line)
        for shown in fold.feed(line if sys.stdout.isatty() else ANSI.sub("", line)):
            print(shown, end="", flush=True)


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes: kept on a terminal, not in a log file


class TracebackFold:
    """The SuperNode's output with each Python traceback folded into its last line (the exception),
    which is what an operator needs: a reconnecting SuperNode prints pages of them. ``show``
    passes everything through (``--verbose``)."""

    def __init__(self, show: bool = False) -> None:
        self.show, self.hidden = show, 0

    def feed(self, line: str) -> list[str]:
        """The lines to print for one line of output."""
        if self.show:
            return [line]
        if line.startswith("Traceback (most recent call last):"):
            self.hidden += 1  # a chained exception continues the same fold
            return []
        if not self.hidden:
            return [line]
        if line.startswith((" ", "\t", "\n", "During handling", "The above exception")) or not line.strip():
            self.hidden += 1
            return []
        hidden, self.hidden = self.hidden, 0
        return [f"{line.rstrip()} ({hidden} traceback lines folded; --verbose shows them)\n"]


def probe_server(options: ClientOptions) -> None:
    """Wait until the server accepts connections (up to ``connect_timeout``: clients may start
    first), then check that both sides agree on TLS and that the server's certificate verifies."""
    deadline = time.monotonic() + options.connect_timeout
    while True:
        try:
            speaks_tls = _speaks_tls(options)
            break
        except ClientError:
            raise
        except OSError:
            if time.monotonic() > deadline:
                raise ClientError(
                    f"could not reach the server at {options.server} within {options.connect_timeout:g}s; "
                    "check the address and that the server runs (--connect-timeout to wait longer)"
                ) from None
            time.sleep(PROBE_SECONDS)
    if options.insecure and speaks_tls:
        raise ClientError(
            f"the server at {options.server} requires TLS but this client was started with --insecure; "
            "drop --insecure and pass --ca ca.pem and --key clients/NAME from the operator"
        )
    if not options.insecure and not speaks_tls:
        raise ClientError(
            f"the server at {options.server} does not speak TLS (started with --insecure?); "
            "ask the operator to start it with --certs, or pass --insecure for a local experiment"
        )


def _speaks_tls(options: ClientOptions) -> bool:
    """One TLS handshake with the server (``OSError`` if it cannot be reached)."""
    host, _, port = options.server.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=None if options.insecure else str(options.ca))
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return True
        except ssl.SSLCertVerificationError as exc:
            raise ClientError(
                f"the server's certificate does not verify against {options.ca} ({exc.verify_message}); "
                "use the ca.pem from the server's certs directory, and a --server host name or IP "
                "that the certificate lists (fedpeft certs --host)"
            ) from exc
        except ssl.SSLError:
            return False


def explain_exit(output: SuperNodeOutput, options: ClientOptions) -> str:
    """One line for a SuperNode that gave up, from what it printed."""
    if ACTIVATION_FAILED in output.seen:
        key = f"{options.key}.pub" if options.key else "its public key"
        named = f" (key {key_id_of_file(options.key)})" if options.key else ""
        return (
            f"the server refused client {options.name}{named}: its key is not registered there; ask "
            f"the operator to add {key} to the server's certs directory (fedpeft certs DIR --clients "
            f"{options.name}) and restart the server"
        )
    if UNREACHABLE in output.seen:
        return (
            f"lost the server at {options.server} for more than {options.connect_timeout:g}s; "
            "check that it runs (--connect-timeout to wait longer)"
        )
    last = [line.strip() for line in output.tail if line.strip()][-3:]
    return f"the SuperNode stopped: {' | '.join(last)}"


def _free_port() -> int:
    """A free local port for the SuperNode's own runtime API (several clients may share a machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
