"""What a client process keeps between rounds: the base model, tokenizer and its encoded data.

Loaded once per process (per model spec / data partition) and reused every round; only the
global state is applied afresh each round.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context
from transformers import PreTrainedTokenizerBase

from fedpeft.config import ClientConfig
from fedpeft.data import load_splits, partition
from fedpeft.instructions import encode_chats
from fedpeft.lora import AdapterHost
from fedpeft.models import CausalLMSpec, ClassifierSpec, ModelSpec, load_model, load_tokenizer
from fedpeft.training import Batches, encode


def client_id(context: Context) -> str:
    """A name for this client that is stable across runs (Flower's node ids are not)."""
    return f"partition-{int(context.node_config['partition-id'])}"


def client_rank(config: ClientConfig, context: Context) -> int:
    """This client's LoRA rank: the node setting ``rank`` (deployment), else ``lora.client_ranks``
    cycled over partitions (simulation), else ``lora.rank``."""
    if "rank" in context.node_config:
        return int(context.node_config["rank"])
    ranks = config.lora.client_ranks
    if not ranks:
        return config.lora.rank
    return ranks[int(context.node_config["partition-id"]) % len(ranks)]


def model_spec(config: ClientConfig, rank: int) -> ModelSpec:
    """The spec of this client's model: a causal LM or a classifier over the run's labels."""
    if config.model.task == "causal_lm":
        return CausalLMSpec.from_config(config.model.name, config.lora, config.seed, rank=rank)
    labels = config.data.labels
    if not labels:
        raise ValueError("the client configuration carries no label names (data.labels)")
    return ClassifierSpec.from_config(config.model.name, len(labels), config.lora, config.seed, rank=rank)


@lru_cache(maxsize=2)
def model_host(spec: ModelSpec) -> AdapterHost:
    return AdapterHost(load_model(spec))


@lru_cache(maxsize=2)
def tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)


_DATA_CACHE: dict[tuple[str, int], Batches] = {}


def partition_data(config: ClientConfig, partition_id: int) -> Batches:
    """This simulated client's share of the training set, tokenized (cached per process)."""
    key = (config.to_json(), partition_id)
    if key not in _DATA_CACHE:
        splits = load_splits(config.data, config.seed, config.model.task)
        rows = partition(splits.train, config.data, partition_id, config.seed)
        tok = tokenizer(config.model.name)
        if config.model.task == "causal_lm":
            _DATA_CACHE[key] = encode_chats(list(rows["messages"]), tok, config.model.max_length)
        else:
            _DATA_CACHE[key] = encode(rows, tok, config.model.max_length)
    return _DATA_CACHE[key]
