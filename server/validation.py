"""Server-side checks on a client reply before it may reach a strategy."""

from __future__ import annotations

from collections import Counter

import torch

from fedpeft.state import ClientUpdate, GlobalState

Signature = tuple[tuple[str, tuple[int, int]], ...]


def signature(update: ClientUpdate) -> Signature:
    """Module names with their (d_out, d_in), plus extras with their shapes: what must agree."""
    mods = [(n, (f.B.shape[0], f.A.shape[1])) for n, f in update.factors.items()]
    extras = [(f"extra/{n}", tuple(t.shape)) for n, t in update.extras.items()]
    return tuple(sorted(mods + extras))  # type: ignore[arg-type]


def reference_signature(state: GlobalState, updates: list[ClientUpdate]) -> Signature | None:
    """Expected layout: the global adapter's if there is one, else the most common among replies."""
    if state.adapter is not None:
        mods = [(n, (f.B.shape[0], f.A.shape[1])) for n, f in state.adapter.items()]
        extras = [(f"extra/{n}", tuple(t.shape)) for n, t in state.extras.items()]
        return tuple(sorted(mods + extras))  # type: ignore[arg-type]
    shaped = [signature(u) for u in updates if shape_problem(u) is None]
    return Counter(shaped).most_common(1)[0][0] if shaped else None


def shape_problem(update: ClientUpdate) -> str | None:
    """Internal consistency: A is (rank x d_in), B is (d_out x rank), 2-D, at the declared rank."""
    if not update.factors:
        return "the update carries no LoRA factors"
    for name, f in update.factors.items():
        if f.A.ndim != 2 or f.B.ndim != 2:
            return f"{name}: factors must be 2-D, got A{tuple(f.A.shape)} B{tuple(f.B.shape)}"
        if f.A.shape[0] != update.rank or f.B.shape[1] != update.rank:
            return (
                f"{name}: shapes A{tuple(f.A.shape)} B{tuple(f.B.shape)} do not match "
                f"the declared rank {update.rank}"
            )
    return None


def validate(update: ClientUpdate, rnd: int, reference: Signature | None) -> str | None:
    """``None`` if the update may be aggregated, else the reason to drop it."""
    if update.round != rnd:
        return f"the update is for round {update.round}, not {rnd}"
    if update.num_examples <= 0:
        return "the update reports no training examples"
    problem = shape_problem(update)
    if problem:
        return problem
    if reference is not None and signature(update) != reference:
        return "module names or layer shapes differ from the global adapter"
    tensors = [t for f in update.factors.values() for t in (f.A, f.B)] + list(update.extras.values())
    if any(not t.is_floating_point() for t in tensors):
        return "a tensor is not floating point"
    if not all_finite(tensors):
        return "a tensor holds NaN or Inf"
    return None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite: one fused norm per tensor (NaN and Inf propagate into it),
    and the exact element-wise test only for a tensor whose norm is not finite (it may merely
    overflow)."""
    norms = torch._foreach_norm(tensors)
    return all(
        bool(torch.isfinite(t).all())
        for t, ok in zip(tensors, torch.stack(norms).isfinite().tolist(), strict=True)
        if not ok
    )
