"""Processes a killed fedpeft leaves behind: the watchdog stops them (and removes the folders it was
given), even for helpers that run in sessions of their own, as Flower's do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from fedpeft.processes import start_watchdog

    start_watchdog(Path(sys.argv[1]))
    # a helper in its own session that starts a grandchild, as flower-superlink starts its apps
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    helper = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, time; g = subprocess.Popen({sleeper!r}, "
         "start_new_session=True); print(g.pid, flush=True); time.sleep(600)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )
    print(helper.pid, helper.stdout.readline().strip(), flush=True)
    time.sleep(600)
    """
)


def test_a_sigkilled_parent_leaves_no_process_and_no_folder(tmp_path):
    folder = tmp_path / "fedpeft-client-x"
    folder.mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    helper, grandchild = (int(pid) for pid in parent.stdout.readline().split())
    time.sleep(1.5)  # the watchdog has recorded the tree
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _, alive = psutil.wait_procs([psutil.Process(helper), psutil.Process(grandchild)], timeout=15)
    assert not alive, f"still running: {alive}"
    deadline = time.monotonic() + 5
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists()


def test_a_server_refuses_a_port_a_leftover_process_listens_on():
    import socket

    import pytest

    from server.deployment import DeploymentError, _check_port_free

    with socket.socket() as leftover:
        leftover.bind(("127.0.0.1", 0))
        leftover.listen()
        port = leftover.getsockname()[1]
        with pytest.raises(
            DeploymentError, match=f"port {port} is in use, often by a SuperLink left running"
        ):
            _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", port)  # free again
