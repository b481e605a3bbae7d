"""Starting Flower's own commands (SuperLink, SuperNode, ``flwr``) for ``fedpeft server`` / ``client``.

Not transport: Flower does all the networking; this only sets up their environment and stops
what they started.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

from fedpeft.errors import UserError


class FlowerCommandError(UserError):
    """One of Flower's commands could not be found, started or driven; the message says what to do."""


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower's commands: its state under ``home``, this interpreter's scripts
    first on PATH (the SuperLink and SuperNode start ``flower-superexec`` and the app processes by
    name), and no third-party deprecation chatter in the log."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home.resolve())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    return env


def flower_command(name: str) -> str:
    """The path of one of Flower's console scripts installed next to this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FlowerCommandError(f"{path} is missing; install fedpeft's dependencies (make setup)")
    return str(path)


def start_watchdog(*remove: Path) -> subprocess.Popen:
    """Start ``fedpeft.watchdog`` for this process: if it dies, even by SIGKILL, every process it
    started is stopped and ``remove`` is deleted (the watchdog runs in a session of its own, so a
    signal to this process's group does not take it down first)."""
    cmd = [sys.executable, "-m", "fedpeft.watchdog", str(os.getpid()), *map(str, remove)]
    null = subprocess.DEVNULL
    return subprocess.Popen(cmd, start_new_session=True, stdin=null, stdout=null, stderr=null)


class ProcessTree:
    """A process and every process it starts. Flower starts its helpers in sessions of their own,
    and they can outlive their parent, so neither a process group nor a look at the children after
    the parent died finds them: ``watch()`` records them while the parent lives."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.members: dict[int, psutil.Process] = {}
        self.watch()

    def watch(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            for member in [root, *root.children(recursive=True)]:
                self.members.setdefault(member.pid, member)

    def running(self) -> bool:
        """Whether the parent runs (and, as a side effect, a fresh look at its descendants)."""
        self.watch()
        return self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """Terminate every member; kill the ones still alive after ``grace`` seconds."""
        self.watch()
        stop_processes(list(self.members.values()), grace)
        self.process.wait()


def stop_processes(processes: list[psutil.Process], grace: float) -> None:
    """Terminate ``processes``; kill the ones still alive after ``grace`` seconds."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
