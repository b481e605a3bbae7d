"""The tasks fedpeft fine-tunes for, in one registry (in the spirit of peft's
``register_peft_method``): everything that differs between sequence classification and causal
language modelling is a field of a ``Task``, so no other module compares task names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from peft import TaskType
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from fedpeft.config import DataSection, LoraSection, ModelSection
from fedpeft.data import (
    Splits,
    load_client_file,
    load_instruction_server_splits,
    load_instruction_splits,
    load_server_splits,
    load_splits,
    read_chats,
)
from fedpeft.instructions import encode_chats
from fedpeft.models import CausalLMSpec, ClassifierSpec, ModelSpec
from fedpeft.training import Batches, encode


@dataclass(frozen=True)
class Task:
    """One task: how its data is read and encoded, which model head it trains, how peft and the
    export name it."""

    name: str
    peft_type: TaskType
    auto_model: Any  # the transformers auto class of its models
    splits: Callable[[DataSection, int], Splits]  # the whole dataset (simulation)
    server_splits: Callable[[DataSection], Splits]  # a deployed server's held-out file
    client_file: Callable[[str, DataSection], Dataset]  # a deployed client's own file
    encode_rows: Callable[[Dataset, PreTrainedTokenizerBase, int], Batches]
    labelled: bool  # a classifier over ``data.labels``

    def model_spec(
        self, model: ModelSection, lora: LoraSection, seed: int, labels: list[str] | None, rank: int
    ) -> ModelSpec:
        """The spec of a client's (or the evaluator's) LoRA-wrapped model."""
        if not self.labelled:
            return CausalLMSpec.from_config(model, lora, seed, rank=rank)
        if not labels:
            raise ValueError("the client configuration carries no label names (data.labels)")
        return ClassifierSpec.from_config(model.name, len(labels), lora, seed, rank=rank)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name`` (``model.task``, validated by the configuration)."""
    return TASKS[name]


CLASSIFICATION = register_task(
    Task(
        name="classification",
        peft_type=TaskType.SEQ_CLS,
        auto_model=AutoModelForSequenceClassification,
        splits=load_splits,
        server_splits=load_server_splits,
        client_file=load_client_file,
        encode_rows=encode,
        labelled=True,
    )
)
CAUSAL_LM = register_task(
    Task(
        name="causal_lm",
        peft_type=TaskType.CAUSAL_LM,
        auto_model=AutoModelForCausalLM,
        splits=load_instruction_splits,
        server_splits=load_instruction_server_splits,
        client_file=read_chats,
        encode_rows=lambda rows, tokenizer, max_length: encode_chats(
            list(rows["messages"]), tokenizer, max_length
        ),
        labelled=False,
    )
)
