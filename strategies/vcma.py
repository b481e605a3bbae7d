"""Variance-corrected model averaging (VCMA; "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems"): averaging K *uncorrelated* models (independently initialised) shrinks
each weight tensor's variance towards 1/K of the models', below what their initialisation set;
VCMA averages, then rescales each randomly initialised weight tensor around its mean so that its
variance is the unweighted mean of the received models' variances:

    w' = (w̄ - mean(w̄)) * sqrt((σ²_T + ε) / (var(w̄) + ε)) + mean(w̄),   σ²_T = (1/K) sum_k var(w_k)

As in the authors' code (``model_variance_correct.py`` in their DFL_torch repository): ``var`` is
torch's unbiased variance, ε is a fixed 1e-4 (``epsilon``), σ²_T is unweighted (``weighted_target``
weighs it like the average instead), and single-value tensors are left alone. Where we differ: their
code skips only batch-norm statistics; here only the tensors the clients initialise randomly are
rescaled (LoRA A and dense weights such as a classifier's), never B (zero at init), biases (zero at
init) or single values.

Their ε is sized for full weights. A LoRA A's variance is of its order (about 9e-4 at init for
384-wide layers, 1e-4 after a first average), so at 1e-4 the correction restores only part of the
shrinkage: 0.58 of the clients' variance against 1.00 at ε = 1e-8 in ``benchmarks/vcma_agnews.py``.
Use 1e-8 for LoRA.

The premise holds when clients initialise their adapters independently (``lora.init =
"per_client"``); with the shared seeded init the models are correlated, and the correction should
change little. ``last_metrics`` reports, per round, the variance of the averaged A relative to the
clients' mean variance before correction (``variance_ratio_averaged``: about 1/K for uncorrelated
A's); the server logs the ratio of the result (``variance_ratio``) for every strategy.
"""

from __future__ import annotations

import statistics

from torch import Tensor

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from strategies.base import WeightedStrategy, require_updates
from strategies.fedavg import FedAvg

DEFAULT_EPSILON = 1e-4  # the authors' code's fixed epsilon


class VCMA(WeightedStrategy):
    name = "vcma"
    linear = False

    def __init__(
        self, epsilon: float = DEFAULT_EPSILON, weighted_target: bool = False, weighting: str = "examples"
    ) -> None:
        super().__init__(weighting)
        if epsilon < 0:
            raise ValueError("vcma's epsilon must be >= 0")
        self.epsilon, self.weighted_target = epsilon, weighted_target
        self.last_metrics: dict[str, float] = {}

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        averaged = FedAvg(self.weighting).aggregate(rnd, state, updates)
        p = self.weights(updates) if self.weighted_target else [1 / len(updates)] * len(updates)
        before = []
        adapter = {}
        for module, mean in averaged.adapter.items():
            clients = [u.factors[module].A for u in updates]
            target = target_variance(clients, p)
            corrected = self.correct(mean.A, target)
            if target > 0:
                before.append(float(mean.A.var()) / target)
            adapter[module] = AdapterFactors(A=corrected, B=mean.B, scale=mean.scale)
        extras = {
            name: t
            if not randomly_initialised(name, t)
            else self.correct(t, target_variance([u.extras[name] for u in updates], p))
            for name, t in averaged.extras.items()
        }
        self.last_metrics = {"variance_ratio_averaged": statistics.fmean(before)} if before else {}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)

    def correct(self, mean: Tensor, target: float) -> Tensor:
        """``mean`` rescaled around its mean to variance ``target`` (up to ε); unchanged when it
        holds a single value or the clients' tensors have no spread (B at its zero init)."""
        if mean.numel() < 2 or target == 0.0:
            return mean
        center = mean.mean()
        factor = ((target + self.epsilon) / (float(mean.var()) + self.epsilon)) ** 0.5
        return (mean - center) * factor + center


def target_variance(tensors: list[Tensor], p: list[float]) -> float:
    """sum_k p_k var(w_k), the variance VCMA restores (torch's unbiased variance, as the authors')."""
    if tensors[0].numel() < 2:
        return 0.0
    return sum(pk * float(t.float().var()) for pk, t in zip(p, tensors, strict=True))


def randomly_initialised(name: str, tensor: Tensor) -> bool:
    """Whether a dense extra is a weight the clients initialise randomly: not a bias (zero at
    init), not a single value."""
    return not name.endswith("bias") and tensor.numel() > 1
