"""Fed-SB (Singhal et al. 2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning"): LoRA-SB's W = W0 + s B R A with B and A
frozen and only the r x r core R trained, sent and averaged.

Averaging R is exact, sum_k p_k s B R_k A = s B (sum_k p_k R_k) A, and linear: it streams, takes
``dp``'s noise on r² values per module, and runs under secure aggregation. A client sends r² values
per module (and the dense extras) instead of LoRA's r (d_in + d_out).

Initialisation. LoRA-SB sets B and A from the truncated SVD of an estimate of the first full
fine-tuning step, -lr sign(G) for the loss gradient G of each adapted weight, computed once on
pooled data (the authors' code: ``estimate_and_process_grads_torch``, then ``get_svd_grad``). Here
the data stay on the clients, so the SVD is that of the clients' mean gradient Ḡ = sum_k p_k G_k,
computed as a randomized SVD (Halko et al. 2011) whose two passes are the first two rounds:

1. ``range``: each client sends Y_k = G_k Ωᵀ as its B, Ω being the shared seeded LoRA A; the
   server keeps Q = orth(sum_k p_k Y_k) (d_out x r) as B and sets A to zero.
2. ``project``: each client sends M_k = Qᵀ G_k as its A; the server takes the SVD
   sum_k p_k M_k = U S Vᵀ (r x d_in) and sets B = Q U, A = Vᵀ and R = 0.

Each client computes G_k over the same seeded batches in both rounds (``train.local_steps``
batches), and trains nothing in them: a run of N rounds trains in N - 2. The project round goes to
the clients whose sketches made Q (``ClientPlan.same_clients``), not to a fresh sample: Q spans the
range of their mean gradient, and projecting another sample's mean onto it captures that mean only
as far as the two samples' gradients agree (nothing of it when they are orthogonal, as under strong
label skew). A client of the range round that does not answer the project round leaves the
projected mean one client short. Under ``dp`` each round is its own Poisson sample, since its
accounting assumes independent samples (see ``strategies/dp.py``). Both rounds are linear
in the clients' gradients, so ``dp`` and secure aggregation serve them as any other round (what
leaves a client is clipped and noised like an update, and the rounds count in the privacy
accounting); each costs one LoRA factor of upload per module. What they reveal: two r-column
sketches of each client's mean gradient per module.

With ``init = "random"`` there are no initialisation rounds: B and A are a random orthonormal frame
(A the shared seeded initial A, orthonormalised; B a Gaussian seeded by the run seed) and R trains
from round 1. That is for ``dp``, where each round's noise has norm about z C sqrt(d) / m over the d
values a client sends: a sketch round sends d_out r or r d_in values per module where a core round
sends r², so its noise is several times a core round's (4.5 times on MiniLM at r = 4 with its head:
d = 19,202 against 962) while its signal is at most C, as a core round's; at the m of a few hundred
clients the sketch is mostly noise, the frame it finds little better than a random one, and it
spends two rounds of the privacy budget, where a random frame spends none.

With ``init = "public"`` the frame is read from ``frame``, a file ``fedpeft frame`` wrote from rows
the operator may publish (``server/public_frame.py``): LoRA-SB's own initialisation, the truncated
SVD of the first-step estimate -sign(G) over those rows, computed in one place as the paper does, so
it costs no round and no privacy budget, and reveals nothing of the clients' data. It is private
only if those rows are public: rows of any client (or drawn from the clients' data) are not.

Where this differs from the paper, and why: the subspace is that of Ḡ, not of sign(Ḡ) (a sign of a
sum is not linear in the clients' contributions, so neither secure aggregation nor DP could serve
it); the sketch has no oversampling or power iteration, so Q holds the top-r range of Ḡ as well as
its spectrum decays; and R starts at zero, so training starts from the base model as LoRA's does,
where LoRA-SB's R starts at the singular values of its first-step estimate at the first warm-up
step's learning rate (a delta near zero). The delta is s B R A with LoRA's scale s = alpha / r, as
under every rule here (2 with alpha = 2 r), where the authors' code sets alpha = r (s = 1): under
Adam, whose step on R does not depend on the gradient's size, s multiplies the step on the weights
as a learning rate would. Under DP the authors' code (``fed_sb/DP/SNLI/fed_trainer.py``) is
example level and estimates the frame's gradient on training rows outside the accounting; here the
frame's rounds are clipped, noised and charged as any round (or skipped: ``init = "random"``).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedpeft.state import (
    AdapterFactors,
    ClientPlan,
    ClientUpdate,
    GlobalState,
    split_trained,
    trained_tensors,
    update_weight,
)
from strategies.accumulate import WeightedSum
from strategies.base import WeightedStrategy, aggregate_stream, require_updates
from strategies.fedavg import check_same_ranks
from strategies.registry import StrategyError

RANGE, PROJECT, CORE = "range", "project", "core"


INITS = ("gradient", "random", "public")


class FedSB(WeightedStrategy):
    """Two initialisation rounds (a randomized SVD of the clients' mean gradient; none with
    ``init = "random"`` or ``"public"``), then the weighted mean of the LoRA-SB cores R and the
    dense extras (``weighting``: examples, steps or uniform)."""

    name = "fedsb"
    linear = True

    def __init__(self, weighting: str = "examples", init: str = "gradient", frame: str | None = None) -> None:
        super().__init__(weighting)
        if init not in INITS:
            raise StrategyError(f"fedsb's init must be one of {', '.join(INITS)}, got {init!r}")
        if (init == "public") != (frame is not None):
            raise StrategyError(
                "fedsb's frame (a file `fedpeft frame` wrote) goes with init = 'public', and only with it"
            )
        if frame is not None and not Path(frame).is_file():
            raise StrategyError(f"fedsb's frame {frame} does not exist; write it with `fedpeft frame`")
        self.init, self.frame = init, frame

    def initial_state(self, state: GlobalState, seed: int) -> GlobalState:
        """With ``init = "random"`` or ``"public"``: the frame's B and A (orthonormal), R = 0, from
        round 1."""
        if self.init == "gradient" or state.adapter is None:
            return state
        if self.init == "random":
            adapter = {name: random_frame(f, seed, name) for name, f in state.adapter.items()}
        else:
            assert self.frame is not None
            adapter = framed(state.adapter, load_frame(Path(self.frame)), self.frame)
        return GlobalState(round=state.round, merged=state.merged, adapter=adapter, extras=state.extras)

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        stage = fedsb_stage(state)
        if stage == RANGE:
            return ClientPlan(
                train_lora_A=False, send_lora_A=False, init_gradient=RANGE, weighting=self.weighting
            )
        if stage == PROJECT:
            return ClientPlan(
                train_lora_B=False, init_gradient=PROJECT, same_clients=True, weighting=self.weighting
            )
        return ClientPlan(train_lora_A=False, send_lora_A=False, train_lora_B=False, weighting=self.weighting)

    def start(self, rnd: int, state: GlobalState) -> CoreAverage:
        if state.adapter is None:
            raise StrategyError(
                "fedsb needs the shared initial adapter; it cannot run with lora.client_ranks mixed "
                "or lora.init = 'per_client'"
            )
        return CoreAverage(self.name, rnd, state, self.client_instructions(rnd, state))

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        return aggregate_stream(self, rnd, state, updates)


def fedsb_stage(state: GlobalState) -> str:
    """Where a Fed-SB run stands: ``core`` once the adapter has cores; ``project`` after the range
    round (A all zero); ``range`` before (the seeded initial adapter)."""
    adapter = state.adapter or {}
    if any(f.R is not None for f in adapter.values()):
        return CORE
    if adapter and all(not f.A.any() for f in adapter.values()):
        return PROJECT
    return RANGE


class CoreAverage:
    """The running weighted mean of what the round's plan has clients send; its result is the
    next stage's adapter."""

    def __init__(self, strategy: str, rnd: int, state: GlobalState, plan: ClientPlan) -> None:
        self.strategy, self.rnd, self.state, self.plan = strategy, rnd, state, plan
        self.sum = WeightedSum()
        self.ranks: set[tuple[int, float]] = set()

    def add(self, update: ClientUpdate) -> None:
        self.ranks.add((update.rank, update.alpha))
        check_same_ranks(self.strategy, self.ranks)
        tensors = trained_tensors(
            update.factors, update.extras, self.plan.train_lora_A, self.plan.train_lora_B
        )
        self.sum.add(tensors, update_weight(update, self.plan.weighting))

    def result(self) -> GlobalState:
        if self.sum.count == 0:
            raise ValueError(f"strategy {self.strategy!r} was given no client updates to aggregate")
        assert self.state.adapter is not None
        factors, extras = split_trained(self.sum.mean(), self.state.adapter)
        if self.plan.init_gradient == RANGE:
            factors = {name: range_basis(f) for name, f in factors.items()}
        elif self.plan.init_gradient == PROJECT:
            factors = {name: core_init(f) for name, f in factors.items()}
        return GlobalState(round=self.rnd, merged=self.state.merged, adapter=factors, extras=extras)


def random_frame(initial: AdapterFactors, seed: int, module: str) -> AdapterFactors:
    """Orthonormal A rows (the seeded initial A's, orthonormalised) and B columns (a Gaussian seeded
    by ``seed`` and the module's name), and R = 0: a LoRA-SB frame that costs no round and reveals
    nothing of the data."""
    d_out, rank = initial.B.shape
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))
    B = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=torch.float64)).Q
    A = torch.linalg.qr(initial.A.double().T).Q.T
    return AdapterFactors(
        A=A.float().contiguous(), B=B.float().contiguous(), scale=initial.scale, R=torch.zeros(rank, rank)
    )


def framed(
    initial: dict[str, AdapterFactors], frame: dict[str, tuple[torch.Tensor, torch.Tensor]], source: str
) -> dict[str, AdapterFactors]:
    """The initial adapter's modules with the (A, B) of ``frame`` and R = 0; the frame must hold
    every module, at its shapes."""
    if set(frame) != set(initial):
        raise StrategyError(
            f"fedsb's frame {source} is for other modules than this run adapts "
            f"(lora.target_modules); write it again with `fedpeft frame` and this run's configuration"
        )
    out = {}
    for name, f in initial.items():
        A, B = frame[name]
        if A.shape != f.A.shape or B.shape != f.B.shape:
            raise StrategyError(
                f"fedsb's frame {source} has {name} at rank {A.shape[0]} (A {tuple(A.shape)}), this run "
                f"{tuple(f.A.shape)}; write it again with `fedpeft frame` and this run's configuration"
            )
        out[name] = AdapterFactors(A=A, B=B, scale=f.scale, R=torch.zeros(f.rank, f.rank))
    return out


def save_frame(
    path: Path, frame: dict[str, tuple[torch.Tensor, torch.Tensor]], about: dict[str, str]
) -> None:
    """Write a LoRA-SB frame, (A, B) per module, as safetensors (``<module>.A``, ``<module>.B``)
    with ``about`` as its metadata, atomically."""
    tensors = {
        f"{name}.{part}": t.contiguous() for name, (A, B) in frame.items() for part, t in (("A", A), ("B", B))
    }
    staging = path.with_name(path.name + ".tmp")
    save_file(tensors, str(staging), metadata=about)
    os.replace(staging, path)


def load_frame(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) per module of a frame ``save_frame`` wrote."""
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise StrategyError(f"{path} is not a frame `fedpeft frame` wrote ({exc})") from None
    names = {key.rsplit(".", 1)[0] for key in tensors}
    try:
        return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in names}
    except KeyError as missing:
        raise StrategyError(f"{path} is not a frame `fedpeft frame` wrote (no {missing})") from None


def range_basis(sketch: AdapterFactors) -> AdapterFactors:
    """After the range round: B = an orthonormal basis Q of the mean sketch's columns, A = 0."""
    Q, _ = torch.linalg.qr(sketch.B.double())
    return AdapterFactors(A=torch.zeros_like(sketch.A), B=Q.float().contiguous(), scale=sketch.scale)


def core_init(projected: AdapterFactors) -> AdapterFactors:
    """After the project round (A = Qᵀ Ḡ, B = Q): with A = U S Vᵀ, B = Q U and A = Vᵀ (the top-r
    singular vectors of Q Qᵀ Ḡ, by singular value), and the core R = 0."""
    U, _, Vh = torch.linalg.svd(projected.A.double(), full_matrices=False)
    rank = projected.rank
    return AdapterFactors(
        A=Vh.float().contiguous(),
        B=(projected.B.double() @ U).float().contiguous(),
        scale=projected.scale,
        R=torch.zeros(rank, rank),
    )
