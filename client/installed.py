"""A deployed client runs the fedpeft installed on its machine, never code the server sends.

Flower's SuperNode receives the run's app bundle (FAB) from the SuperLink, installs it and has each
``flwr-clientapp`` process import the ClientApp from it: whoever controls the server would run code
on every client. ``fedpeft client`` therefore starts the SuperNode through ``supernode()``, which
has it launch ``fedpeft-clientapp`` instead of ``flwr-clientapp``: Flower's own task runner with
the bundle neither installed nor imported (written here: Flower has no option for it). The bundle
is only read, for its version: a server running another fedpeft version is refused in one line.
The ClientApp is ``client.app:app`` as installed.
"""

from __future__ import annotations

import io
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

CLIENTAPP_COMMAND = "fedpeft-clientapp"  # [project.scripts] in pyproject.toml


class BundleMismatch(RuntimeError):
    """The server's app bundle is not the fedpeft this client has installed."""


def bundle_version(fab: bytes) -> tuple[str, str]:
    """The (name, version) a FAB's ``pyproject.toml`` declares."""
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        project = tomllib.loads(bundle.read("pyproject.toml").decode())["project"]
    return str(project["name"]), str(project["version"])


def check_bundle(fab: bytes, **_: Any) -> None:
    """Refuse a bundle of another app or another fedpeft version than the one installed here;
    install nothing."""
    name, found = bundle_version(fab)
    installed = version("fedpeft")
    if name != "fedpeft" or found != installed:
        raise BundleMismatch(
            f"the server runs {name} {found}, this client has fedpeft {installed} installed; "
            "install the server's version on this client"
        )


def installed_app_loader(**_: Any):  # type: ignore[no-untyped-def]
    """Flower's ``get_load_client_app_fn`` replaced: whatever bundle is named, the installed app."""

    def load(*_: Any):  # type: ignore[no-untyped-def]
        from client.app import app

        return app

    return load


def run_installed(runner: ModuleType) -> None:
    """Make Flower's task runner module ``runner`` check the bundle instead of installing it, and
    load the installed ClientApp instead of the bundle's."""
    runner.install_from_fab = check_bundle  # type: ignore[attr-defined]
    runner.get_project_dir = lambda *_: Path.cwd()  # type: ignore[attr-defined]  # nothing to look up
    runner.get_load_client_app_fn = installed_app_loader  # type: ignore[attr-defined]


def clientapp() -> None:
    """``fedpeft-clientapp``: ``flwr-clientapp`` running the installed ClientApp."""
    import flwr.supernode.runtime.run_clientapp as runner
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    run_installed(runner)
    flwr_clientapp()


def supernode() -> None:
    """``python -m client.installed ARGS``: ``flower-supernode ARGS`` launching
    ``fedpeft-clientapp`` for every message."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if not sys.stdout.isatty():
        update_console_handler(colored=False)

    command = Path(sys.executable).parent / CLIENTAPP_COMMAND
    if not command.is_file():
        raise SystemExit(f"{command} is missing; reinstall fedpeft (make setup)")
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(command)  # the dict Flower's executors read
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    supernode()
