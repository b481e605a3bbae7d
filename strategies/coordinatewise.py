"""Coordinate-wise order statistics over a round's updates, the shared core of ``median`` and
``trimmed_mean``: per coordinate of A, B and every extra, sort the K clients' values, drop the
``trim`` smallest and largest, and average the rest (unweighted).

torch has no trimmed mean (scipy's ``trim_mean`` works on NumPy arrays of all K at once), so it is
a sort here, over chunks of coordinates: the extra memory is one chunk of K values, not K more
copies of the adapter.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies.base import Strategy, require_updates
from strategies.fedavg import check_same_ranks

CHUNK_VALUES = 1 << 20  # values (K x coordinates) sorted at once: 4 MiB of float32


def trimmed_mean(tensors: Sequence[Tensor], trim: int, chunk_values: int = CHUNK_VALUES) -> Tensor:
    """Per coordinate of the same-shaped ``tensors``, the mean of the values left after dropping the
    ``trim`` smallest and the ``trim`` largest."""
    count = len(tensors)
    if not 0 <= 2 * trim < count:
        raise ValueError(f"cannot trim {trim} values from each end of {count}")
    flat = [t.reshape(-1) for t in tensors]  # views of contiguous tensors: no copy
    out = torch.empty(flat[0].numel())
    step = max(1, chunk_values // count)
    for start in range(0, out.numel(), step):
        stacked = torch.stack([f[start : start + step] for f in flat], dim=1).float()  # (chunk, K)
        out[start : start + step] = stacked.sort(dim=1).values[:, trim : count - trim].mean(dim=1)
    return out.view(tensors[0].shape)


class CoordinateWise(Strategy):
    """A coordinate-wise trimmed mean of A, B and the extras; ``trim_count`` says how much to trim."""

    name: str
    linear = False  # an order statistic is not a weighted sum: no DP or secure aggregation around it

    @abstractmethod
    def trim_count(self, rnd: int, count: int) -> int:
        """Values to drop from each end of each coordinate when ``count`` updates arrived."""

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        check_same_ranks(self.name, {(u.rank, u.alpha) for u in updates})
        trim = self.trim_count(rnd, len(updates))
        first = updates[0]
        adapter = {
            module: AdapterFactors(
                A=trimmed_mean([u.factors[module].A for u in updates], trim),
                B=trimmed_mean([u.factors[module].B for u in updates], trim),
                scale=f.scale,
            )
            for module, f in first.factors.items()
        }
        extras = {name: trimmed_mean([u.extras[name] for u in updates], trim) for name in first.extras}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)
