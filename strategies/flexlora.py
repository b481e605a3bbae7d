"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024): clients train at different ranks r_k <= R; the server
averages their full weight updates and redistributes them by SVD.

Per module, the server forms the weighted mean of the clients' products (exact, kept factored as a
rank-sum_k r_k stack; ``recompress`` takes its leading SVD, see ``strategies/factored_svd.py``)

    ΔW = sum_k p_k s_k B_k A_k = U Σ V^T,

and keeps its best rank-R approximation as the global adapter (near-best once the true rank
exceeds R plus the oversampling: ``recompress``), Σ on the B side:
B = U_R Σ_R / s, A = V_R^T (beyond the true rank: zero B columns, A rows completing an orthonormal
set, as the singular vectors of zero singular values). A client of rank r_k starts from
the leading r_k components (``AdapterFactors.truncated``), which is the best rank-r_k approximation
of ΔW, as FlexLoRA's redistribution step gives it. The energy of ΔW beyond rank R is reported as
``discarded_energy``. The dense extras are averaged with the same weights.

This is the authors' code (``alibaba/FederatedScope``, branch ``FlexLoRA``:
``fed_utils/model_aggregation.py::FlexLoRA`` forms sum_k p_k (alpha/r_k) B_k A_k with p_k = n_k / n;
``fed_utils/adaptive_peft.py::distribute_weight_fast`` gives a client of rank r the factors
B = U_r Σ_r / (alpha/r), A = V_r^T, Σ all on B as here). Where we differ: their server keeps the
dense ΔW as the global model, ours its best rank-R approximation (clients get the same factors
whenever r_k <= R; the exported global adapter lacks ``discarded_energy``); and their aggregation
hard-codes alpha = 16 where ours uses each client's own scale s_k.
"""

from __future__ import annotations

import torch

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState, LowRankDelta
from strategies.base import WeightedStrategy, require_updates, weighted_sum
from strategies.lowrank import recompress, weighted_rows
from strategies.registry import StrategyError


class FlexLoRA(WeightedStrategy):
    """SVD redistribution of the weighted mean of the clients' weight updates."""

    name = "flexlora"
    mixed_ranks = True

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        if state.adapter is None:
            raise StrategyError("flexlora needs the global adapter (lora.init = 'shared')")
        p = self.weights(updates)
        adapter, worst = {}, 0.0
        for module, glob in state.adapter.items():
            stacked = LowRankDelta(
                U=torch.cat([u.factors[module].B.float() for u in updates], dim=1),
                V=weighted_rows(
                    [u.factors[module].A for u in updates],
                    [pk * u.factors[module].scale for pk, u in zip(p, updates, strict=True)],
                ),
            )
            best, discarded = recompress(stacked, glob.rank)
            adapter[module] = singular_values_on_B(best, glob)
            worst = max(worst, discarded)
        self.last_metrics = {"discarded_energy": worst}
        extras = {name: weighted_sum((u.extras[name] for u in updates), p) for name in updates[0].extras}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)


def singular_values_on_B(best: LowRankDelta, glob: AdapterFactors) -> AdapterFactors:
    """``best`` (``recompress``'s U' = U sqrt(Σ), V' = sqrt(Σ) V^T, components in order) as
    factors of ``glob``'s rank and scale with Σ on B: B = U Σ / s, A = V^T. Row i of V' has norm
    sqrt(σ_i) (V^T has orthonormal rows), which moves the root across.

    Where ΔW's rank is below R (fewer replies than R components), the missing components get zero
    B columns and A rows that complete A's to an orthonormal set, as a full SVD's singular vectors
    of zero singular values do in the authors' code: a component with zero A and zero B would get
    no gradient and never train again. The completion is of ``glob``'s A (the previous round's
    directions, orthogonalised against the kept ones), so the same inputs give the same factors."""
    root = best.V.norm(dim=1)
    keep = root > 0
    A = best.V[keep] / root[keep, None]
    B = best.U[:, keep] * root[keep] / glob.scale
    missing = glob.rank - A.shape[0]
    if missing:
        # Householder QR: orthonormal columns whatever the rank of [A^T glob.A^T]; the first k span A's rows
        Q = torch.linalg.qr(torch.cat([A, glob.A.to(A.dtype)]).double().T).Q
        A = torch.cat([A, Q[:, A.shape[0] : glob.rank].T.to(A.dtype)])
        B = torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)
    return AdapterFactors(A=A.contiguous(), B=B, scale=glob.scale)
