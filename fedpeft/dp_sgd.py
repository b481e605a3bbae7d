"""Example-level differential privacy on a client: DP-SGD (Abadi et al. 2016) over its own rows.

Each step samples every row independently with probability q = batch_size / n (Poisson sampling,
as the accountant assumes), computes each sampled row's gradient of the trainable tensors (opacus'
``GradSampleModule``), clips each to L2 norm C (``max_grad_norm``) over all trainable tensors
together, sums them, adds N(0, (z C)²) per coordinate from a cryptographically secure stream, and
divides by the expected batch q n; the optimizer (AdamW) then steps on that gradient, which is
post-processing. A client's guarantee is (ε, δ) for any one of its rows, against everyone who sees
its updates (the server, other clients), accounted by opacus' RDP accountant over every step the
client has taken in the run (``ExampleAccountant``, kept in the client's node state).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from peft import PeftModel
from torch import Tensor

from fedpeft.instructions import IGNORE
from fedpeft.privacy import SecureRandom


@dataclass(frozen=True)
class ExampleDP:
    """DP-SGD's parameters: noise multiplier z, per-example clipping norm C, and δ."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5


def poisson_batches(size: int, rate: float, steps: int, random: SecureRandom) -> Iterator[list[int]]:
    """``steps`` batches, each row in each independently with probability ``rate`` (may be empty)."""
    for _ in range(steps):
        yield [i for i, u in enumerate(random.uniform(size)) if u < rate]


def per_example_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each example's loss: cross-entropy of its label (classification), or the mean cross-entropy
    of its response tokens (causal LM: labels per token, ``IGNORE`` where not scored)."""
    labels = batch.pop("labels")
    logits = model(**batch).logits
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]  # token t predicts token t + 1
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    scored = (labels != IGNORE).sum(1).clamp(min=1)
    return losses.sum(1) / scored


class PrivateGradients:
    """Sets the trainable tensors' ``.grad`` to DP-SGD's noised mean of clipped per-example
    gradients. Hooks ``model`` for per-example gradients until ``close``."""

    def __init__(self, model: PeftModel, params: list[Tensor], dp: ExampleDP, expected_batch: float) -> None:
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params, self.dp, self.expected_batch = params, dp, expected_batch
        self.random = SecureRandom()

    def backward(self, batch: dict[str, Tensor] | None) -> float:
        """Compute the private gradient of ``batch`` (None: an empty Poisson batch, noise only);
        returns the batch's mean loss (0 for an empty one)."""
        loss = 0.0
        summed = [torch.zeros_like(p) for p in self.params]
        if batch is not None:
            losses = per_example_loss(self.module, batch)
            with warnings.catch_warnings():  # opacus' hooks on a frozen input: expected, harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            loss = float(losses.detach().mean())
            samples = [p.grad_sample for p in self.params]  # type: ignore[attr-defined]
            norms = torch.stack([s.flatten(1).norm(dim=1) for s in samples]).norm(dim=0)
            factors = (self.dp.max_grad_norm / norms.clamp(min=1e-12)).clamp(max=1.0)  # min(1, C / norm)
            for total, sample in zip(summed, samples, strict=True):
                total.add_(torch.einsum("b,b...->...", factors.to(sample.dtype), sample))
            for p in self.params:
                p.grad_sample = None  # type: ignore[attr-defined]
        std = self.dp.noise_multiplier * self.dp.max_grad_norm
        for p, total in zip(self.params, summed, strict=True):
            noise = self.random.normal(total.numel(), std).view(total.shape).to(total.device, total.dtype)
            p.grad = (total + noise) / self.expected_batch
        return loss

    def close(self) -> None:
        """Remove the per-example hooks: the model is the plain model again."""
        self.module._close()


class ExampleAccountant:
    """(ε, δ) of one client's DP-SGD over every step it has taken (opacus' RDP accountant)."""

    def __init__(self, dp: ExampleDP, sample_rate: float, steps: int = 0) -> None:
        self.dp, self.sample_rate, self.steps = dp, sample_rate, steps

    def epsilon(self, steps: int | None = None) -> float:
        steps = self.steps if steps is None else steps
        if steps == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.dp.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(delta=self.dp.delta))
