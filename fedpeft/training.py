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
from datasets import Dataset
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedpeft.instructions import IGNORE, InstructionBatches


class Batches(Protocol):
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


def encode(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    ids = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(input_ids=ids, labels=list(dataset["label"]))


def collate(data: Encoded, indices: list[int], tokenizer: PreTrainedTokenizerBase) -> dict[str, Tensor]:
    batch = tokenizer.pad({"input_ids": [data.input_ids[i] for i in indices]}, return_tensors="pt")
    batch["labels"] = torch.tensor([data.labels[i] for i in indices])
    return dict(batch)


def sample_batches(size: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of indices, walking seeded permutations epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, size):
            order += torch.randperm(size, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


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
) -> dict[str, float]:
    """Run ``steps`` AdamW steps on the trainable parameters; returns the mean training loss.

    Batches and dropout masks are drawn from ``seed``, so a round is reproducible.
    """
    if len(data) == 0:
        raise ValueError("this client has no training examples")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(train_lora_A)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        total = 0.0
        for indices in sample_batches(len(data), batch_size, steps, seed):
            loss = model(**_on(model, data.collate(indices, tokenizer))).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(True)
    return {"train_loss": total / steps}


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
