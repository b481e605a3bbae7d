"""A custom aggregation strategy, written as a fedpeft user would: Krum (Blanchard et al., 2017).

Each client's update (its A, B and dense extras as one vector) is scored by the summed squared
distances to its K - f - 2 nearest neighbours, where f (``byzantine``) is how many clients may be
hostile; the lowest-scored update becomes the next global state, whole. A hostile client far from
the others is never chosen. It needs nothing but tensors: no Flower, no model, no transport.
"""

from __future__ import annotations

import torch

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies import Strategy


class Krum(Strategy):
    name = "krum"  # linear stays False: a selection is not a weighted sum (no DP or secure aggregation)

    def __init__(self, byzantine: int = 1) -> None:
        if byzantine < 0:
            raise ValueError("krum's byzantine (the number of hostile clients tolerated) must be >= 0")
        self.byzantine = byzantine

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        neighbours = len(updates) - self.byzantine - 2
        if neighbours < 1:
            raise ValueError(
                f"krum with byzantine = {self.byzantine} needs at least {self.byzantine + 3} updates "
                f"per round, got {len(updates)}; sample more clients or lower byzantine"
            )
        vectors = torch.stack([_as_vector(u) for u in updates])  # fails on mixed ranks, as it must
        squared = torch.cdist(vectors, vectors, compute_mode="donot_use_mm_for_euclid_dist").square()
        # each row sorted: its own distance (0) first, then its nearest neighbours
        scores = squared.sort(dim=1).values[:, 1 : neighbours + 1].sum(dim=1)
        chosen = updates[int(scores.argmin())]
        adapter = {
            module: AdapterFactors(A=f.A.clone(), B=f.B.clone(), scale=f.scale)
            for module, f in chosen.factors.items()
        }
        extras = {name: t.clone() for name, t in chosen.extras.items()}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)


def _as_vector(update: ClientUpdate) -> torch.Tensor:
    parts = [t for f in update.factors.values() for t in (f.A, f.B)] + list(update.extras.values())
    return torch.cat([t.float().reshape(-1) for t in parts])
