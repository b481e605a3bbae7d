"""What a client process keeps between rounds: the base model, tokenizer and its encoded data.

Loaded once per process (per model spec / data partition) and reused every round; only the
global state is applied afresh each round.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context
from transformers import PreTrainedTokenizerBase

from fedpeft.config import ClientConfig
from fedpeft.data import Splits, load_splits, partition
from fedpeft.lora import AdapterHost
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.training import Encoded, encode


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


def classifier_spec(config: ClientConfig, rank: int) -> ClassifierSpec:
    labels = config.data.labels
    if not labels:
        raise ValueError("the client configuration carries no label names (data.labels)")
    return ClassifierSpec.from_config(config.model.name, len(labels), config.lora, config.seed, rank=rank)


@lru_cache(maxsize=2)
def model_host(spec: ClassifierSpec) -> AdapterHost:
    return AdapterHost(load_classifier(spec))


@lru_cache(maxsize=2)
def tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)


def partition_data(config: ClientConfig, partition_id: int) -> Encoded:
    """This simulated client's share of the training set, tokenized (cached per process: the last
    few partitions, so a process that serves many virtual clients keeps bounded memory)."""
    return _encoded_partition(config.to_json(), partition_id)


@lru_cache(maxsize=8)
def _encoded_partition(config_json: str, partition_id: int) -> Encoded:
    config = ClientConfig.from_json(config_json)
    rows = partition(_splits(config_json).train, config.data, partition_id, config.seed)
    return encode(rows, tokenizer(config.model.name), config.model.max_length)


@lru_cache(maxsize=1)
def _splits(config_json: str) -> Splits:
    """The dataset, loaded once per process and configuration, not once per partition."""
    config = ClientConfig.from_json(config_json)
    return load_splits(config.data, config.seed)
