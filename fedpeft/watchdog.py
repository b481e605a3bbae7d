"""A guard that outlives ``fedpeft server`` / ``fedpeft client``: Flower starts its helpers in
sessions of their own, so when the fedpeft process is killed outright (SIGKILL, OOM killer) they
keep running, holding ports and carrying on with the next round. The watchdog records the process
tree of the fedpeft process while it lives, and when it dies, stops every recorded process still
running and removes the directories it was given. No library offers this for processes that
leave their parent's session, so it is written here.

    python -m fedpeft.watchdog PARENT_PID [DIR ...]
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time

import psutil

from fedpeft.processes import stop_processes

POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def alive(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def guard(parent_pid: int, directories: list[str]) -> None:
    """Record ``parent_pid``'s descendants until it dies, then stop them and remove ``directories``."""
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    members: dict[int, psutil.Process] = {}
    me = psutil.Process().pid
    while alive(parent):
        with contextlib.suppress(psutil.Error):
            for child in parent.children(recursive=True):
                if child.pid != me:
                    members.setdefault(child.pid, child)
        time.sleep(POLL_SECONDS)
    stop_processes([m for m in members.values() if alive(m)], GRACE_SECONDS)  # is_running checks start times
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    guard(int(sys.argv[1]), sys.argv[2:])
