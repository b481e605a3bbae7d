"""CCVR: classifier calibration with virtual representations (Luo et al., NeurIPS 2021, "No Fear of
Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data").

Under label skew the federated feature extractor is often fine while the classifier head is biased
towards the classes most clients hold (on AG News at Dirichlet alpha 0.1, retraining only the head
this way lifts fedavg from 0.72 to 0.85, centralized being 0.87; ``benchmarks/README.md``). CCVR
fixes the head after training: each client reports, per class, the moments of the head's input
over its own rows; the server pools them into one Gaussian per class, samples virtual features
from each, and retrains the head on them.

The paper has clients send per-class means and covariances and pools them with its Eq. 3-4; here
clients send the sums they are made of (count, sum x, sum x x^T), which pool by addition to the
same unbiased mean and covariance. The retraining follows the reference implementation: SGD with
momentum 0.9, batches of 64, a few epochs over ``virtual_per_class`` samples of each class,
starting from the aggregated head. Hand-written: no library does this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedpeft.config import CalibrationSection
from fedpeft.lora import ADAPTER, PEFT_PREFIX
from fedpeft.training import Encoded, collate, in_order

JITTER = 1e-5  # added to each covariance's diagonal, so a class seen on few rows still samples


@dataclass
class ClassMoments:
    """Per class: how many rows, the sum of their features and of their outer products (float64)."""

    counts: Tensor  # (C,)
    sums: Tensor  # (C, d)
    outer: Tensor  # (C, d, d)

    @classmethod
    def zeros(cls, classes: int, dim: int) -> ClassMoments:
        f64 = torch.float64
        return cls(torch.zeros(classes, dtype=f64), torch.zeros(classes, dim, dtype=f64),
                   torch.zeros(classes, dim, dim, dtype=f64))  # fmt: skip

    def add(self, features: Tensor, labels: Tensor) -> None:
        x = features.to(torch.float64)
        for c in labels.unique().tolist():
            rows = x[labels == c]
            self.counts[c] += len(rows)
            self.sums[c] += rows.sum(0)
            self.outer[c] += rows.T @ rows

    def check(self, classes: int, dim: int) -> None:
        """A ``ValueError`` unless these are moments of ``classes`` classes of ``dim`` features,
        with counts that are whole and non-negative."""
        shapes = {"counts": (classes,), "sums": (classes, dim), "outer": (classes, dim, dim)}
        got = {k: tuple(getattr(self, k).shape) for k in shapes}
        if got != shapes:
            raise ValueError(f"calibration moments of shapes {got}, expected {shapes}")
        if (self.counts < 0).any() or not torch.equal(self.counts, self.counts.round()):
            raise ValueError("calibration counts must be whole and non-negative")
        if not all(torch.isfinite(t).all() for t in (self.sums, self.outer)):
            raise ValueError("calibration moments must be finite")

    def __add__(self, other: ClassMoments) -> ClassMoments:
        return ClassMoments(self.counts + other.counts, self.sums + other.sums, self.outer + other.outer)

    def gaussians(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Each class seen on at least one row: its mean and unbiased covariance (zero for one row)."""
        out = {}
        for c in torch.nonzero(self.counts).flatten().tolist():
            n = self.counts[c]
            mean = self.sums[c] / n
            scatter = self.outer[c] - n * torch.outer(mean, mean)
            out[c] = (mean, scatter / (n - 1) if n > 1 else torch.zeros_like(scatter))
        return out


def head_of(model: PeftModel) -> tuple[str, nn.Linear]:
    """The trained classifier head (peft's trainable copy of it) and its name in the base model;
    a ``ValueError`` unless it is one linear layer (CCVR retrains a linear classifier)."""
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(heads) != 1 or not isinstance(heads[0][1].modules_to_save[ADAPTER], nn.Linear):
        found = ", ".join(f"{n} ({type(m.modules_to_save[ADAPTER]).__name__})" for n, m in heads) or "none"
        raise ValueError(f"CCVR calibrates one linear classifier head; this model's trained heads: {found}")
    name, wrapper = heads[0]
    return name.removeprefix(PEFT_PREFIX), wrapper.modules_to_save[ADAPTER]


@torch.no_grad()
def class_moments(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, data: Encoded, classes: int, batch_size: int
) -> ClassMoments:
    """The per-class moments of the head's input over ``data`` (the model in eval mode)."""
    _, head = head_of(model)
    moments = ClassMoments.zeros(classes, head.in_features)
    seen: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    model.eval()
    try:
        for indices in in_order(len(data), batch_size):
            batch = collate(data, indices, tokenizer)
            labels = batch.pop("labels")
            model(**{k: v.to(model.device) for k, v in batch.items()})
            moments.add(seen.pop().cpu(), labels)
    finally:
        hook.remove()
    return moments


def calibrated_head(
    moments: ClassMoments, weight: Tensor, bias: Tensor, settings: CalibrationSection, seed: int
) -> tuple[Tensor, Tensor]:
    """The head (``weight``, ``bias``) retrained on ``settings.virtual_per_class`` virtual features
    of each class drawn from the pooled Gaussians; a class no client holds gets none."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = [], []
    for c, (mean, cov) in moments.gaussians().items():
        cov = cov + JITTER * torch.eye(len(mean), dtype=cov.dtype)
        chol = torch.linalg.cholesky(cov)
        noise = torch.randn(settings.virtual_per_class, len(mean), generator=generator, dtype=torch.float64)
        features.append((mean + noise @ chol.T).float())
        labels.append(torch.full((settings.virtual_per_class,), c))
    x, y = torch.cat(features), torch.cat(labels)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=settings.lr, momentum=0.9)
    for _ in range(settings.epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            loss = nn.functional.cross_entropy(head(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.weight.detach().clone(), head.bias.detach().clone()
