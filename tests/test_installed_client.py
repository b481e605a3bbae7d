"""A deployed client runs the fedpeft installed on it: the server's app bundle is checked for its
version, never installed or imported; and the bundle carries code, not docs or benchmarks."""

from __future__ import annotations

import io
import subprocess
import sys
import types
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import client.app
from client.installed import BundleMismatch, check_bundle, run_installed

REPO = Path(__file__).resolve().parents[1]


def bundle(name: str = "fedpeft", release: str | None = None, app_code: str = "") -> bytes:
    """A FAB-like zip: a pyproject.toml and a client/app.py with ``app_code``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as fab:
        fab.writestr(
            "pyproject.toml", f'[project]\nname = "{name}"\nversion = "{release or version("fedpeft")}"\n'
        )
        fab.writestr("client/app.py", app_code)
    return out.getvalue()


def test_the_runner_loads_the_installed_app_and_installs_nothing_of_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    runner = types.ModuleType("runner")  # stands for flwr.supernode.runtime.run_clientapp
    run_installed(runner)
    hostile = bundle(app_code="raise SystemExit('the server ran code on this client')")
    runner.install_from_fab(hostile, skip_prompt=True)
    assert not any(tmp_path.rglob("*"))  # nothing written under FLWR_HOME
    loaded = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert loaded("fedpeft/fedpeft", version("fedpeft"), "hash") is client.app.app


@pytest.mark.parametrize(
    ("name", "release"), [("fedpeft", "0.0.0-other"), ("someone-else", None)], ids=["version", "app"]
)
def test_a_bundle_of_another_version_or_app_is_refused_in_one_line(name, release):
    with pytest.raises(BundleMismatch) as refusal:
        check_bundle(bundle(name, release))
    assert "\n" not in str(refusal.value) and "install the server's version" in str(refusal.value)


def test_the_bundle_flwr_run_sends_holds_code_and_configurations_only(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(REPO)], cwd=tmp_path, check=True, capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "client/app.py" in names and "server/app.py" in names and "strategies/fedavg.py" in names
    assert not [n for n in names if n.startswith(("docs/", "tests/", "benchmarks/")) or n.endswith(".md")]
    check_bundle(fab.read_bytes())  # the server's own bundle passes this client's check
