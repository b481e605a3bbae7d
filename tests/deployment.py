"""A real deployment on 127.0.0.1 for tests: `fedpeft server` and `fedpeft client` as separate OS
processes, each client with its own data file, with TLS and client authentication."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedpeft import demo_data
from fedpeft.certs import make_certs
from tests.factories import metrics_rows

ROOT = Path(__file__).resolve().parents[1]
CLIENT_ROWS = {"alice": 40, "bob": 55, "carol": 70}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path: Path, texts: list[str], labels: list[int]) -> Path:
    with path.open("w") as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": text, "label": demo_data.LABELS[label]}) + "\n")
    return path


def write_config(path: Path, model_dir: Path, test_file: Path, **server: object) -> Path:
    """A small deployment config: the tiny test model, 3 required clients, every client each round."""
    settings = {"fraction": 1.0, "min_clients": 3, "min_replies": 2, "round_timeout": 90.0, **server}
    lines = [
        "[run]",
        'name = "deployed"',
        "rounds = 2",
        "[model]",
        f"name = {json.dumps(str(model_dir))}",
        "max_length = 32",
        "[lora]",
        "rank = 2",
        "alpha = 4.0",
        "[data]",
        f"labels = {json.dumps(demo_data.LABELS)}",
        f"test_source = {json.dumps(str(test_file))}",
        "[train]",
        "local_steps = 2",
        "batch_size = 8",
        "lr = 0.02",
        "[server]",
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Federation:
    """Certificates, data files, a config, and the processes of one test deployment."""

    root: Path
    model_dir: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    client_rows: dict[str, int] = field(default_factory=lambda: dict(CLIENT_ROWS))  # name -> rows

    def __post_init__(self) -> None:
        train, test = demo_data.demo_splits(sum(self.client_rows.values()), 40, seed=3)
        self.data: dict[str, Path] = {}
        start = 0
        for name, rows in self.client_rows.items():
            texts, labels = train["text"][start : start + rows], train["label"][start : start + rows]
            self.data[name] = write_rows(self.root / f"{name}.jsonl", texts, labels)
            start += rows
        self.test_file = write_rows(self.root / "test.jsonl", test["text"], test["label"])
        self.certs = make_certs(self.root / "certs", ["127.0.0.1"], list(self.client_rows))
        self.config = write_config(self.root / "deployed.toml", self.model_dir, self.test_file)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def output(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """``fedpeft ARGS`` in a fresh process of its own, its output in ``ROOT/NAME.log``."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with self.log(name).open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedpeft.cli", *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def start_server(
        self, run_dir: Path, *overrides: str, resume: bool = False, name: str = "server"
    ) -> subprocess.Popen:
        """``fedpeft server`` on this federation's port, ``overrides`` as ``--set`` values."""
        args = ["server", "--config", str(self.config), "--certs", str(self.certs.root)]
        args += ["--host", "127.0.0.1", "--port", str(self.port)]
        args += [item for override in overrides for item in ("--set", override)]
        args += ["--resume" if resume else "--run-dir", str(run_dir)]
        return self.start(name, args)

    def start_client(self, name: str, *extra: str) -> subprocess.Popen:
        key = self.certs.client_key(name)
        args = ["client", "--server", f"127.0.0.1:{self.port}", "--data", str(self.data[name])]
        args += ["--key", str(key), "--ca", str(self.certs.ca_cert), *extra]
        args += ["--state-dir", str(self.state_dir(name))]
        return self.start(name, args)

    def state_dir(self, name: str) -> Path:
        """Where client ``name`` keeps what it carries between rounds (``--state-dir``)."""
        return self.root / "client-state" / name

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started, as a crash or a power cut would."""
        process = self.processes.pop(name)
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.5)


def rounds_done(run_dir: Path) -> int:
    return max((row["round"] for row in metrics_rows(run_dir)), default=-1)
