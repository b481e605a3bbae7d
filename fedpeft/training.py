"""Local training and evaluation, for sequence classification and causal language models.

``train`` works on any encoded data with ``__len__`` and ``collate(indices, tokenizer)`` (a batch
of model inputs including ``labels``): ``Encoded`` here, ``InstructionBatches`` for causal LMs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedpeft.dp_sgd import ExampleDP, PrivateGradients, poisson_batches
from fedpeft.instructions import IGNORE, InstructionBatches


class Batches(Protocol):
    input_ids: list[list[int]]  # each row's token ids (their lengths size a token budget)

    def __len__(self) -> int: ...

    def collate(self, indices: list[int], tokenizer: PreTrainedTokenizerBase) -> dict[str, Tensor]: ...


@dataclass
class Encoded:
    """A tokenized dataset: unpadded token ids and integer labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def collate(self, indices: list[int], tokenizer: PreTrainedTokenizerBase) -> dict[str, Tensor]:
        return collate(self, indices, tokenizer)

    def split(self, fraction: float, seed: int) -> tuple[Encoded, Encoded]:
        """(kept, held out): a seeded ``fraction`` of the rows held out, at least one row of two or
        more, never all of them."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        held = min(max(round(fraction * len(self)), 1), len(self) - 1) if len(self) > 1 else 0
        pick = lambda rows: Encoded([self.input_ids[i] for i in rows], [self.labels[i] for i in rows])  # noqa: E731
        return pick(sorted(order[held:])), pick(sorted(order[:held]))


def encode(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    ids = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(input_ids=ids, labels=list(dataset["label"]))


def collate(data: Encoded, indices: list[int], tokenizer: PreTrainedTokenizerBase) -> dict[str, Tensor]:
    batch = tokenizer.pad({"input_ids": [data.input_ids[i] for i in indices]}, return_tensors="pt")
    batch["labels"] = torch.tensor([data.labels[i] for i in indices])
    return dict(batch)


def sample_batches(
    size: int, batch_size: int, steps: int, seed: int, token_budget: TokenBudget | None = None
) -> Iterator[list[int]]:
    """``steps`` batches of indices, walking seeded permutations epoch after epoch; with a
    ``token_budget`` a batch takes only the rows that fit it, and the rest wait for the next step."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, size):
            order += torch.randperm(size, generator=generator).tolist()
        take = batch_size if token_budget is None else token_budget.fitting(order[:batch_size])
        batch, order = order[:take], order[take:]
        yield batch


@dataclass(frozen=True)
class TokenBudget:
    """At most ``max_tokens`` padded tokens (rows x the longest row) per batch."""

    lengths: list[int]  # each row's token count
    max_tokens: int

    def fitting(self, candidates: list[int]) -> int:
        """How many of ``candidates``, taken in order, fit the budget (at least one)."""
        longest = 0
        for count, row in enumerate(candidates):
            longest = max(longest, self.lengths[row])
            if (count + 1) * longest > self.max_tokens:
                return max(count, 1)
        return len(candidates)


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training reports: the mean training loss and the number of
    examples trained on (steps x batch, or fewer when the data is smaller than a batch)."""

    train_loss: float
    examples: int


def train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Batches,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    train_lora_A: bool = True,
    train_lora_B: bool = True,
    train_extras: bool = True,
    proximal_mu: float = 0.0,
    logit_adjustment: Tensor | None = None,
    example_dp: ExampleDP | None = None,
    gradient_checkpointing: bool = False,
    max_batch_tokens: int | None = None,
    bf16_autocast: bool = False,
) -> LocalResult:
    """Run ``steps`` AdamW steps on the trainable parameters (LoRA A and B unless frozen by
    ``train_lora_A`` / ``train_lora_B``, a LoRA-SB core, the dense extras unless ``train_extras``
    is false).

    ``proximal_mu`` adds FedProx's term mu/2 ||w - w_start||^2 over the trainable tensors (w_start:
    their values when training starts, i.e. the global state received), applied as its gradient
    mu (w - w_start). ``logit_adjustment`` (one value per class, see ``fedpeft.label_skew``) is
    added to a classifier's logits inside the training loss only. Batches and dropout masks are
    drawn from ``seed``, so a round is reproducible; with ``example_dp`` the steps are DP-SGD's
    (``fedpeft.dp_sgd``: Poisson batches and noise from a secret stream, not reproducible).
    ``gradient_checkpointing`` recomputes the base's activations in the backward pass (for these
    steps only; evaluation keeps them). ``max_batch_tokens`` caps a batch's padded tokens (rows of
    ``data.input_ids``; see ``TokenBudget``); ``bf16_autocast`` runs the forward pass under bfloat16
    autocast.
    """
    if len(data) == 0:
        raise ValueError("this client has no training examples")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _freeze(model, train_lora_A, train_lora_B, train_extras)
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        if gradient_checkpointing:
            activation_checkpointing(model, True)
        private = None
        budget = None
        if max_batch_tokens is not None:
            budget = TokenBudget([len(row) for row in data.input_ids], max_batch_tokens)
        batches = sample_batches(len(data), batch_size, steps, seed, budget)
        if example_dp is not None:
            rate = min(1.0, batch_size / len(data))
            private = PrivateGradients(model, params, example_dp, expected_batch=rate * len(data))
            batches = poisson_batches(len(data), rate, steps, private.random)
        total: Tensor | float = 0.0  # summed on the device: no host sync per step
        examples = 0
        try:
            for indices in batches:
                batch = _on(model, data.collate(indices, tokenizer)) if indices else None
                if private is not None:
                    total += private.backward(batch)
                else:
                    with torch.autocast(model.device.type, torch.bfloat16, enabled=bf16_autocast):
                        loss = _loss(model, batch, logit_adjustment)
                    loss.backward()
                    total += loss.detach()
                if start:
                    grads = [p.grad for p in params]
                    torch._foreach_add_(grads, torch._foreach_sub(params, start), alpha=proximal_mu)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                examples += len(indices)
        finally:
            if private is not None:
                private.close()
            if gradient_checkpointing:
                activation_checkpointing(model, False)
            _freeze(model, True, True, True)
    return LocalResult(train_loss=float(total) / steps, examples=examples)


def activation_checkpointing(model: PeftModel, on: bool) -> None:
    """Recompute the base's activations in the backward pass (``on``) or keep them. Non-reentrant,
    so the frozen base's inputs need no ``requires_grad`` hook. transformers renamed the methods
    ``activation_checkpointing_*`` within 5.x and drops the old names in 6: either is used."""
    base = model.get_base_model()
    renamed = hasattr(base, "activation_checkpointing_enable")
    if on and renamed:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif renamed:
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _freeze(model: PeftModel, train_lora_A: bool, train_lora_B: bool, train_extras: bool) -> None:
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(train_lora_A)
        elif "lora_B" in name:
            param.requires_grad_(train_lora_B)
        elif "modules_to_save" in name:  # peft's trainable copy of a dense extra (a head)
            param.requires_grad_(train_extras)


def weight_gradients(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Batches,
    weights: dict[str, Tensor],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    logit_adjustment: Tensor | None = None,
) -> tuple[dict[str, Tensor], LocalResult]:
    """The mean over ``steps`` seeded batches of the training loss's gradient with respect to each
    of ``weights`` (frozen base weights, by name), and the mean loss; nothing is updated."""
    if len(data) == 0:
        raise ValueError("this client has no training examples")
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    total, examples = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        try:
            for w in weights.values():
                w.requires_grad_(True)
            for indices in sample_batches(len(data), batch_size, steps, seed):
                loss = _loss(model, _on(model, data.collate(indices, tokenizer)), logit_adjustment)
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, grad in zip(weights, grads, strict=True):
                    sums[name].add_(grad.float().cpu())
                total += loss.item()
                examples += len(indices)
        finally:
            for w in weights.values():
                w.requires_grad_(False)
    return {name: s / steps for name, s in sums.items()}, LocalResult(
        train_loss=total / steps, examples=examples
    )


def _loss(model: PeftModel, batch: dict[str, Tensor], logit_adjustment: Tensor | None) -> Tensor:
    """The model's own loss, or cross-entropy over adjusted logits."""
    if logit_adjustment is None:
        return model(**batch).loss
    labels = batch.pop("labels")
    logits = model(**batch).logits
    return F.cross_entropy(logits + logit_adjustment.to(logits.device), labels)


@torch.no_grad()
def evaluate(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, data: Encoded, batch_size: int
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``data``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for indices in in_order(len(data), batch_size):
        batch = collate(data, indices, tokenizer)
        out = model(**batch)
        loss_sum += out.loss.item() * len(indices)
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    return {"loss": loss_sum / len(data), "accuracy": correct / len(data)}


@torch.no_grad()
def evaluate_lm(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, data: InstructionBatches, batch_size: int
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the response tokens, and its perplexity."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for indices in in_order(len(data), batch_size):
        batch = _on(model, data.collate(indices, tokenizer))
        count = int((batch["labels"][:, 1:] != IGNORE).sum())  # the loss shifts labels by one
        loss_sum += model(**batch).loss.item() * count
        tokens += count
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss)}


def in_order(size: int, batch_size: int) -> Iterator[list[int]]:
    """The indices ``0 .. size-1`` in consecutive batches of at most ``batch_size``."""
    for start in range(0, size, batch_size):
        yield list(range(start, min(start + batch_size, size)))


def _on(model: PeftModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.to(model.device) for key, value in batch.items()}
