"""Client-level differential privacy around a linear strategy (central DP at the server; DP-FedAvg,
McMahan et al. 2018, with adaptive clipping from Andrew et al. 2021).

Each round the server samples every connected client independently with probability q = m / N
(Poisson sampling: m = ``clients_per_round`` expected clients of N = ``num_clients``), from a
secret cryptographically secure stream. Each reply's whole update (every tensor the client
trained, as a delta from what it received) is clipped to L2 norm C; the server sums the clipped
deltas, adds N(0, (z C)²) per coordinate from the same secret stream, and divides by m (not by the
replies that arrived, so one client changes the result by at most C / m). The noised mean delta
is handed to the inner strategy as a single virtual client, which for a linear strategy returns it
unchanged. A round runs whatever arrives, even nothing (then it releases noise only), and is never
retried: a retry would condition the sample the accountant assumes.

The accountant (opacus' RDP) is the Poisson-subsampled Gaussian mechanism with sampling rate q and
noise multiplier z under add/remove-one-client adjacency: exactly the mechanism run.

Adaptive clipping (``target_quantile``): C follows the γ-quantile of the update norms,
C ← C exp(-η (b̃ - γ)), with b̃ the noised fraction of updates at most C long, released centred,
b̃ = (sum_k (1[‖Δ_k‖ <= C] - 1/2) + N(0, σ_b²)) / m + 1/2: adding or removing a client moves the
centred sum by 1/2 (the plain count would move by 1, and the number of clients that replied is not
public under Poisson sampling, so it cannot be subtracted afterwards), as in TensorFlow Privacy's
quantile estimator. The updates then get noise multiplier z_Δ = (z⁻² - (2 σ_b)⁻²)^(-1/2), so that
the two releases together cost what one Gaussian with z does (Andrew et al., Theorem 1, whose
(2 σ_b) is the centred sum's sensitivity 1/2): the accountant charges z.

Every round draws its own sample, Fed-SB's project round too (its inner plan asks for the range
round's clients, ``ClientPlan.same_clients``, which ``dp`` drops): the two initialisation sketches
are then of two samples' mean gradients, which agree as far as the clients' gradients do.

With ``train.freeze_head`` (FedBABU) the clients keep the dense extras (a head) at their shared
init and do not send them: the noise then covers the LoRA tensors only, far fewer values for the
same noise per value (the noise's norm on the mean is z C sqrt(d) / m over d noised values).

Noise amplification: with FedAvg both A and B get noise, and the product
(B + N_B)(A + N_A) = BA + N_B A + B N_A + N_B N_A multiplies it; FFA (A frozen, only B noised)
avoids this and is the recommended inner strategy.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from fedpeft.kernels import FOLD_WIDTH, released_, segments_statistics
from fedpeft.privacy import PrivacyAccountant, SecureRandom, clip_factor
from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, split_trained
from strategies.accumulate import HeldFold, Probe, add_scaled_, release_sum, zeroed_sum
from strategies.base import StopFederation, Strategy, aggregate_stream
from strategies.clip import DeltaClipper
from strategies.registry import StrategyError, create_strategy


class DifferentialPrivacy(Strategy):
    """``dp(inner)``: Poisson sampling, clipping (fixed or adaptive), Gaussian noise and (ε, δ)
    accounting with an optional budget."""

    name = "dp"
    linear = True
    private = True  # the server samples through select_clients and logs nothing per client

    def __init__(
        self,
        clients_per_round: int,
        num_clients: int,
        inner: str = "ffa",
        inner_options: dict[str, Any] | None = None,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        epsilon_budget: float | None = None,
        target_quantile: float | None = None,
        clip_norm_lr: float = 0.2,
        count_noise_std: float | None = None,
        allow_nonlinear: bool = False,
        insecure_noise_seed: int | None = None,
        freeze_extras: bool = False,
    ) -> None:
        """``freeze_extras`` (from ``train.freeze_head``, not a [strategy] option): the clients keep
        the dense extras at the global ones, so they are neither clipped nor noised, and the
        released extras are the global ones unchanged."""
        self.freeze_extras = freeze_extras
        self.inner: Strategy = create_strategy(inner, inner_options)
        if not self.inner.linear and not allow_nonlinear:
            raise StrategyError(
                f"dp wraps strategies whose aggregate is linear in the client updates (fedavg, ffa); "
                f"'{inner}' is not, so its noise calibration would not hold; set allow_nonlinear = true "
                "in [strategy] to wrap it anyway"
            )
        if clip_norm <= 0 or noise_multiplier < 0:
            raise StrategyError("dp needs clip_norm > 0 and noise_multiplier >= 0")
        if not 0 < clients_per_round <= num_clients:
            raise StrategyError("dp needs 0 < clients_per_round <= num_clients")
        self.clients_per_round = clients_per_round
        self.sample_rate = clients_per_round / num_clients
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.epsilon_budget = epsilon_budget
        self.adaptive = AdaptiveClip.create(
            target_quantile, clip_norm_lr, count_noise_std, noise_multiplier, clients_per_round
        )
        self.accountant = PrivacyAccountant(noise_multiplier, self.sample_rate, delta)
        if epsilon_budget is not None and self.accountant.epsilon(1) > epsilon_budget:
            raise StrategyError(
                f"dp: epsilon_budget = {epsilon_budget} cannot pay for a single round (epsilon after "
                f"round 1 would be {self.accountant.epsilon(1):.3f}); raise epsilon_budget or "
                "noise_multiplier"
            )
        self.random = (
            SecureRandom()
            if insecure_noise_seed is None
            else SecureRandom.insecure_for_tests(insecure_noise_seed)
        )
        self.last_metrics: dict[str, float] = {}

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the summed updates (below z when adaptive clipping spends part
        of the budget on the clipped count)."""
        return self.adaptive.update_noise if self.adaptive else self.noise_multiplier

    @property
    def secure_clip_norm(self) -> float:
        """Under secure aggregation the clients clip their own deltas (the server cannot see them)."""
        if self.adaptive is not None:
            raise StrategyError(
                "dp's adaptive clipping needs each client's clipped-or-not bit, which secure aggregation "
                "hides; set a fixed clip_norm (no target_quantile) or server.secure_aggregation = false"
            )
        return self.clip_norm

    def select_clients(self, rnd: int, candidates: list[int]) -> list[int]:
        """Poisson sampling: each candidate independently with probability q, from the secret stream."""
        draws = self.random.uniform(len(candidates))
        return [c for c, u in zip(candidates, draws, strict=True) if u < self.sample_rate]

    def initial_state(self, state: GlobalState, seed: int) -> GlobalState:
        return self.inner.initial_state(state, seed)

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        if self.epsilon_budget is not None:
            after = self.accountant.epsilon(self.accountant.rounds + 1)
            if after > self.epsilon_budget:
                raise StopFederation(
                    f"privacy budget: one more round would bring epsilon to {after:.3f}, above "
                    f"epsilon_budget = {self.epsilon_budget} (delta = {self.accountant.delta}); raise the "
                    "budget or the noise_multiplier to train longer"
                )
        # every round a fresh Poisson sample, as the accountant assumes (reusing the last round's
        # clients would make two rounds' samples dependent): the inner plan's same_clients is dropped
        return replace(self.inner.client_instructions(rnd, state), same_clients=False)

    def start(self, rnd: int, state: GlobalState) -> PrivateSum:
        return PrivateSum(self, rnd, state)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        """The round's release; with no updates (nobody sampled or nobody replied), noise only."""
        return aggregate_stream(self, rnd, state, updates)

    def aggregate_sum(
        self, rnd: int, state: GlobalState, summed: dict[str, Tensor], weight: float
    ) -> GlobalState:
        """The round's result from the sum of the deltas the clients clipped themselves to
        ``clip_norm``, each with weight 1 (secure aggregation: the server sees only the sum). The
        noise and the division by the expected m are as in any round, whatever ``weight`` is."""
        accumulator = self.start(rnd, state)
        accumulator.add_sum(summed)
        return accumulator.result()

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "random": self.random.state_dict(),
            "clip_norm": self.clip_norm,
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.random = SecureRandom.from_state_dict(state["random"])
        self.clip_norm = float(state["clip_norm"])
        self.inner.load_state_dict(state["inner"])


class AdaptiveClip:
    """Andrew et al. 2021's geometric update of the clipping norm towards a quantile of the norms."""

    def __init__(self, quantile: float, lr: float, count_std: float, update_noise: float) -> None:
        self.quantile, self.lr, self.count_std, self.update_noise = quantile, lr, count_std, update_noise

    @classmethod
    def create(
        cls, quantile: float | None, lr: float, count_std: float | None, noise_multiplier: float, m: int
    ) -> AdaptiveClip | None:
        """None for a fixed clipping norm; else the rule, with σ_b = ``count_std`` (default m / 20,
        as in the paper) and the update noise multiplier that keeps the total at z."""
        if quantile is None:
            return None
        if not 0 <= quantile <= 1 or lr <= 0:
            raise StrategyError("dp's adaptive clipping needs target_quantile in [0, 1] and clip_norm_lr > 0")
        count_std = m / 20 if count_std is None else count_std
        if noise_multiplier == 0:
            return cls(quantile, lr, 0.0, 0.0)
        if count_std <= noise_multiplier / 2:
            raise StrategyError(
                f"dp: count_noise_std = {count_std:g} must exceed noise_multiplier / 2 = "
                f"{noise_multiplier / 2:g} for adaptive clipping to fit in the noise budget; raise it"
            )
        return cls(quantile, lr, count_std, (noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5)

    def next_norm(
        self, norm: float, unclipped: int, count: int, m: int, random: SecureRandom
    ) -> tuple[float, float]:
        """The next clipping norm and the noised fraction of unclipped updates it came from, of
        ``count`` updates, ``unclipped`` of them within ``norm`` (centred: sensitivity 1/2)."""
        noise = float(random.normal(1, self.count_std)[0]) if self.count_std > 0 else 0.0
        fraction = (unclipped - count / 2 + noise) / m + 0.5
        return norm * math.exp(-self.lr * (fraction - self.quantile)), fraction


NOISE_CHUNK = 1 << 22  # noise drawn per chunk of this many values: its float64 draws stay 32 MiB


class PrivateSum:
    """dp's accumulator: the sum of the clients' clipped deltas from the global adapter, all
    tensors of an update taken as one flat vector.

    Clipping needs an update's norm before its fold, so each update is read twice. A reply the
    server hands over unjudged (``add_probed``: it decoded whole in this round's layout) waits
    until ``FOLD_WIDTH`` do; one pass then measures them, reading the sent state once for all
    (its rows fill the probes the server judges them by), and the finite ones are folded clipped."""

    def __init__(self, dp: DifferentialPrivacy, rnd: int, state: GlobalState) -> None:
        self.dp, self.rnd, self.state = dp, rnd, state
        plan = dp.inner.client_instructions(rnd, state)
        self.clipper = DeltaClipper(
            dp.name, state, plan.train_lora_A, plan.train_lora_B, trains_extras=not dp.freeze_extras
        )
        # sum_k f_k x_k over the clipped updates x_k (f_k their clipping factors), and sum_k f_k:
        # the sum of clipped deltas is then the first less the second times the reference, in
        # float64 (cancellation costs about K float64 ulps of x: far below float32's)
        self.total = zeroed_sum(self.clipper.layout.numel)  # float64: order-independent
        self.pending = HeldFold(self.total)
        self.factors = 0.0
        self.held: list[tuple[Tensor, Probe]] = []  # unjudged replies' spans, not yet measured

    def add(self, update: ClientUpdate) -> None:
        factor = self.clipper.clip(update, self.dp.clip_norm)
        self.factors += factor
        self.pending.add(self.clipper.span, factor, keep=self.clipper.own_bytes)  # a copy may be reused

    def add_probed(self, update: ClientUpdate, probe: Probe) -> bool:
        """Hold ``update`` to be measured with others (``fold_held``); False where it did not
        decode whole in this round's layout. ``settle`` it once ``probe`` is filled."""
        span = self.clipper.layout.span_of(update.flat)
        if span is None:
            return False
        self.held.append((span, probe))
        if len(self.held) == FOLD_WIDTH:
            self.fold_held()
        return True

    def fold_held(self) -> None:
        """Measure the held replies in one pass, filling their probes, and fold each finite one
        clipped (a NaN or Inf stays out: the server refuses it)."""
        if not self.held:
            return
        spans, probes = zip(*self.held, strict=True)
        self.held = []
        rows = segments_statistics(spans, self.clipper.reference, probes[0].starts, probes[0].sizes)
        for span, probe, row in zip(spans, probes, rows, strict=True):
            probe.rows = row
            if math.isfinite(probe.squared_distance):
                self.pending.add(span, self._factor(probe))

    def settle(self, update: ClientUpdate, probe: Probe, accepted: bool) -> None:
        """Count an accepted reply (its norm and clipping factor), or take a refused one back."""
        if accepted:
            self.factors += self.clipper.record(math.sqrt(probe.squared_distance), self.dp.clip_norm)
        elif math.isfinite(probe.squared_distance):  # it was folded
            self.pending.add(self.clipper.layout.span_of(update.flat), -self._factor(probe))

    def _factor(self, probe: Probe) -> float:
        """The clipping factor of a measured reply: 0 where its norm overflowed (nothing folded)."""
        norm = math.sqrt(probe.squared_distance)
        return clip_factor(norm, self.dp.clip_norm) if math.isfinite(norm) else 0.0

    def add_sum(self, clipped: dict[str, Tensor]) -> None:
        """Fold in a sum of deltas already clipped (by the clients themselves)."""
        add_scaled_(self.total, self.clipper.layout.gather([clipped[k] for k in self.clipper.layout.keys]))

    def result(self) -> GlobalState:
        dp, layout = self.dp, self.clipper.layout
        self.pending.add(self.clipper.reference, -self.factors, keep=False)  # now the sum of clipped deltas
        std = dp.update_noise_multiplier * dp.clip_norm
        mean = torch.empty(layout.numel)  # the noised mean delta, added to the reference
        for start in range(0, layout.numel, NOISE_CHUNK):  # bounded temporaries
            end = min(start + NOISE_CHUNK, layout.numel)
            noise = dp.random.normal(end - start, std) if std > 0 else torch.zeros(end - start)
            reference = self.clipper.reference[start:end]
            released_(mean[start:end], self.total[start:end], noise, reference, dp.clients_per_round)
        release_sum(self.total)
        dp.accountant.step()
        metrics = {
            "epsilon": dp.accountant.epsilon(),
            "delta": dp.accountant.delta,
            "clip_norm": dp.clip_norm,
        }
        if dp.adaptive is not None:
            count = len(self.clipper.norms)  # the clipper counts the updates it measured and clipped
            dp.clip_norm, fraction = dp.adaptive.next_norm(
                dp.clip_norm, count - self.clipper.clipped, count, dp.clients_per_round, dp.random
            )
            metrics["noised_unclipped_fraction"] = fraction
        dp.last_metrics = metrics
        noised = dict(zip(layout.keys, layout.views(mean), strict=True))
        factors, noised_extras = split_trained(noised, self.state.adapter)
        extras = {**self.state.extras, **noised_extras}  # frozen extras: the global ones
        first = next(iter(factors.values()))
        virtual = ClientUpdate(
            factors, extras, 1, self.rnd, first.rank, first.scale * first.rank, num_trained=1
        )
        return dp.inner.aggregate(self.rnd, self.state, [virtual])
