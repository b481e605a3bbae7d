"""A custom aggregation strategy, written as a fedpeft user would: coordinate-wise median.

The median of each coordinate of A, B and the dense extras across this round's clients (unweighted):
robust to a minority of clients sending extreme values, at the price of the exactness of the mean.
It needs nothing but tensors: no Flower, no model, no transport.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState


class CoordinateMedian:
    name = "coordinate-median"
    linear = False  # a median is not a weighted sum: DP and secure aggregation do not apply

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan()  # clients train A and B as usual

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        if len({u.rank for u in updates}) > 1:
            raise ValueError("coordinate-median needs every client at the same LoRA rank")
        first = updates[0]
        adapter = {
            module: AdapterFactors(
                A=_median([u.factors[module].A for u in updates]),
                B=_median([u.factors[module].B for u in updates]),
                scale=f.scale,
            )
            for module, f in first.factors.items()
        }
        extras = {name: _median([u.extras[name] for u in updates]) for name in first.extras}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _median(tensors: list[torch.Tensor]) -> torch.Tensor:
    # torch.median returns the lower of the two middle values for an even count; use their mean
    return torch.quantile(torch.stack([t.float() for t in tensors]), 0.5, dim=0)
