"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024): clients train at different ranks r_k <= R around one global adapter of rank R.

Each client starts from the global adapter's leading r_k components (``AdapterFactors.truncated``:
A's first r_k rows, B's first r_k columns, B rescaled to the client's LoRA scale s_k so that
s_k B_k A_k is the global's s B[:, :r_k] A[:r_k]). The server zero-pads every reply back to rank R
at the global scale s,

    Â_k = [A_k; 0],   B̂_k = [(s_k / s) B_k, 0],

and averages the padded factors: A = sum_k p_k Â_k, B = sum_k p_k B̂_k (component i of the global
adapter is then a sum over the clients whose rank exceeds i, diluted by the others' zeros, as the
paper defines it). With ``weighting = "sparsity"`` (the paper's sparsity-weighted aggregation, the
default) p_k is proportional, per module, to the Frobenius norm of the client's whole adapter
||s_k B_k A_k||_F (the paper's ||S_k||: the product the client holds, including the part of the
global adapter it started from, not only what it trained this round; a client of a larger rank
starts from more of it, so it tends to weigh more); the dense extras (a head) are weighted by each
client's norm over all modules (our addition: the paper has no head). ``examples``, ``steps`` and
``uniform`` weigh as fedavg does. The paper's local rank self-pruning is not implemented (a
client's rank is fixed). One deviation: the components beyond every reply's rank (no client of the
round trained them) keep their global values, where the zero-padded average would set their A rows
and B columns to zero, which no later round could undo (both factors of a component at zero get
no gradient). No code of the authors' is public; third-party versions differ in where
they put s_k / s (FlexLoRA's HetLoRA baseline splits it as a square root over A and B, with data
weights): any split gives the same products, not the same averaged factors.

Like fedavg it is inexact (mean(B) mean(A) != mean(B A)); with every client at rank R and a data
weighting it is fedavg.
"""

from __future__ import annotations

import math

import torch

from fedpeft.state import WEIGHTINGS, AdapterFactors, ClientPlan, ClientUpdate, GlobalState, update_weight
from strategies.base import Strategy, require_updates, weighted_sum
from strategies.registry import StrategyError

WEIGHTING_CHOICES = ("sparsity", *WEIGHTINGS)


class HetLoRA(Strategy):
    """Zero-padding aggregation of clients at ranks up to the global adapter's."""

    name = "hetlora"
    mixed_ranks = True

    def __init__(self, weighting: str = "sparsity") -> None:
        if weighting not in WEIGHTING_CHOICES:
            raise StrategyError(f"hetlora's weighting must be one of {', '.join(WEIGHTING_CHOICES)}")
        self.weighting = weighting

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan(weighting="examples" if self.weighting == "sparsity" else self.weighting)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        if state.adapter is None:
            raise StrategyError("hetlora needs the global adapter (lora.init = 'shared')")
        norms = [{m: f.delta_norm() for m, f in u.factors.items()} for u in updates]
        adapter = {}
        for module, glob in state.adapter.items():
            padded = [padded_to(u.factors[module], glob) for u in updates]
            p = self.weights(updates, [n[module] for n in norms])
            A, B = weighted_sum((f.A for f in padded), p), weighted_sum((f.B for f in padded), p)
            covered = max(u.factors[module].rank for u in updates)
            A[covered:], B[:, covered:] = glob.A[covered:], glob.B[:, covered:]  # no reply trained these
            adapter[module] = AdapterFactors(A=A, B=B, scale=glob.scale)
        overall = [math.sqrt(sum(v**2 for v in n.values())) for n in norms]
        p = self.weights(updates, overall)
        extras = {name: weighted_sum((u.extras[name] for u in updates), p) for name in updates[0].extras}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)

    def weights(self, updates: list[ClientUpdate], norms: list[float]) -> list[float]:
        """p_k: by the update norms under ``sparsity`` (uniform if every norm is zero), else by
        the weighting's raw weights; normalised to sum to 1."""
        if self.weighting == "sparsity":
            raw = norms if sum(norms) > 0 else [1.0] * len(norms)
        else:
            raw = [update_weight(u, self.weighting) for u in updates]
        total = sum(raw)
        if total <= 0:
            raise ValueError("cannot aggregate: the replies report no training examples in total")
        return [w / total for w in raw]


def padded_to(factors: AdapterFactors, glob: AdapterFactors) -> AdapterFactors:
    """``factors`` (a client's, rank r_k <= R) zero-padded to ``glob``'s rank R at its scale."""
    extra = glob.rank - factors.rank
    if extra < 0:
        raise ValueError(f"a client's rank {factors.rank} exceeds the global adapter's {glob.rank}")
    A = torch.cat([factors.A.float(), factors.A.new_zeros(extra, factors.A.shape[1])])
    B = torch.cat(
        [factors.B.float() * (factors.scale / glob.scale), factors.B.new_zeros(factors.B.shape[0], extra)], 1
    )
    return AdapterFactors(A=A, B=B, scale=glob.scale)
