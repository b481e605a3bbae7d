"""Client-side remedies for label skew in classification: additive logit adjustments used inside the
training loss only (evaluation and the exported model see the plain logits).

- ``fedlc`` (Zhang et al. 2022, "Federated Learning with Label Distribution Skew via Logits
  Calibration"): logits f_c - tau * n_c^(-1/4), n_c the client's count of class c. A class the
  client does not hold (n_c = 0) gets -inf: it drops out of the client's softmax, so local training
  does not push the shared head away from the classes other clients hold. As in the FedLC code
  released with FL-bench and fluke, the counts are raw (not normalised) and absent classes are
  masked.
- ``balanced_softmax`` (Ren et al. 2020, "Balanced Meta-Softmax"; the logit-adjusted loss of Menon
  et al. 2021, "Long-tail learning via logit adjustment"): logits f_c + tau * log(n_c / n). At
  tau = 1 the loss is minimised by a model whose plain logits are those of the class-balanced
  distribution, whatever the client's label mix; absent classes get -inf, as above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LABEL_SKEW_METHODS = ("none", "fedlc", "balanced_softmax")


def logit_adjustment(labels: Sequence[int], num_labels: int, method: str, tau: float) -> Tensor | None:
    """The per-class term ``method`` adds to the logits of a client holding ``labels``; None for
    ``"none"``."""
    if method == "none":
        return None
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_labels).float()
    if method == "fedlc":
        return -tau * counts.pow(-0.25)  # 0 ** -0.25 = inf: an absent class is masked
    if method == "balanced_softmax":
        return tau * (counts / counts.sum()).log()  # log 0 = -inf: an absent class is masked
    raise ValueError(f"unknown label-skew method {method!r}; choose one of {', '.join(LABEL_SKEW_METHODS)}")
