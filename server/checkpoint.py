"""Atomic checkpoints of the server's state: one safetensors file, replaced in a single rename.

Tensors go in the safetensors body; the round number, scales, strategy scalars and RNG state go
in its string metadata as JSON. A crash leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fedpeft.state import AdapterFactors, GlobalState, LowRankDelta

FILENAME = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    state: GlobalState
    rng_state: Any


def save_checkpoint(run_dir: Path, state: GlobalState, rng_state: Any) -> Path:
    tensors: dict[str, Tensor] = {}
    for name, d in state.merged.items():
        tensors[f"merged/{name}/U"], tensors[f"merged/{name}/V"] = d.U, d.V
    for name, f in (state.adapter or {}).items():
        tensors[f"adapter/{name}/A"], tensors[f"adapter/{name}/B"] = f.A, f.B
        if f.R is not None:
            tensors[f"adapter/{name}/R"] = f.R
    for name, t in state.extras.items():
        tensors[f"extra/{name}"] = t
    strategy_scalars = _tensors_out(state.strategy_state, "strategy", tensors)
    meta = {
        "round": state.round,
        "has_adapter": state.adapter is not None,
        "scales": {n: f.scale for n, f in (state.adapter or {}).items()},
        "merged": list(state.merged),  # the dicts' orders: safetensors hands tensors back sorted by
        "extras": list(state.extras),  # name, and a flat layout over the state (dp's noise) follows it
        "strategy": strategy_scalars,
        "rng": rng_state,
    }
    path = run_dir / FILENAME
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fedpeft": json.dumps(meta)}
    )
    _fsync(tmp)  # the bytes reach the disk before the rename makes them the checkpoint
    os.replace(tmp, path)
    _fsync(run_dir)  # and the rename itself survives a power cut
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; resume needs a run directory with one")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["fedpeft"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    merged: dict[str, LowRankDelta] = {}
    adapter: dict[str, AdapterFactors] = {}
    extras: dict[str, Tensor] = {}
    strategy_state: dict[str, Any] = _tensors_in(meta["strategy"], tensors)
    for name in meta.get("extras", [k.removeprefix("extra/") for k in tensors if k.startswith("extra/")]):
        extras[name] = tensors[f"extra/{name}"]
    for name, scale in meta["scales"].items():
        adapter[name] = AdapterFactors(
            A=tensors[f"adapter/{name}/A"],
            B=tensors[f"adapter/{name}/B"],
            scale=scale,
            R=tensors.get(f"adapter/{name}/R"),
        )
    merged_names = [
        k[len("merged/") : -len("/U")] for k in tensors if k.startswith("merged/") and k.endswith("/U")
    ]
    for name in meta.get("merged", merged_names):  # checkpoints before the order was kept: sorted
        merged[name] = LowRankDelta(U=tensors[f"merged/{name}/U"], V=tensors[f"merged/{name}/V"])
    state = GlobalState(
        round=meta["round"],
        merged=merged,
        adapter=adapter if meta["has_adapter"] else None,
        extras=extras,
        strategy_state=strategy_state,
    )
    return Checkpoint(state=state, rng_state=_tuplify(meta["rng"]))


def _tensors_out(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able copy of nested strategy state; tensors go to ``tensors`` under their path."""
    if isinstance(value, Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {k: _tensors_out(v, f"{path}/{k}", tensors) for k, v in value.items()}
    return value


def _tensors_in(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _tensors_in(v, tensors) for k, v in value.items()}
    return value


def _tuplify(value: Any) -> Any:
    """JSON turns random.getstate()'s tuples into lists; setstate needs tuples back."""
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
