"""What a client process keeps between rounds: the base model, tokenizer and its encoded data.

Loaded once per process (per model spec / data partition) and reused every round; only the
global state is applied afresh each round.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

from flwr.app import Context
from transformers import PreTrainedTokenizerBase

from client.settings import CLIENT_ID, DATA_PATH, RANK
from fedpeft.config import ClientConfig
from fedpeft.data import Splits, load_client_file, load_splits, partition
from fedpeft.lora import AdapterHost
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.training import Encoded, encode


def is_deployed(context: Context) -> bool:
    """A deployed client reads its own data file; a simulated one takes a partition."""
    return DATA_PATH in context.node_config


def client_id(context: Context) -> str:
    """A name for this client that is stable across runs (Flower's node ids are not)."""
    if CLIENT_ID in context.node_config:
        return str(context.node_config[CLIENT_ID])
    if is_deployed(context):
        return Path(str(context.node_config[DATA_PATH])).stem
    return f"partition-{int(context.node_config['partition-id'])}"


def seed_key(context: Context) -> int:
    """An integer that tells clients apart in their training seeds, the same in every process:
    the partition id in simulation, a CRC of the client id when deployed (``hash`` of a string
    differs between processes)."""
    if is_deployed(context):
        return zlib.crc32(client_id(context).encode())
    return int(context.node_config["partition-id"])


def client_rank(config: ClientConfig, context: Context) -> int:
    """This client's LoRA rank: the node setting ``rank`` (deployment), else ``lora.client_ranks``
    cycled over partitions (simulation), else ``lora.rank``."""
    if RANK in context.node_config:
        return int(context.node_config[RANK])
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


def client_data(config: ClientConfig, context: Context) -> Encoded:
    """This client's training rows, tokenized: its own file when deployed, its share of the
    training set in simulation (cached per process: the last few, so a process that serves many
    virtual clients keeps bounded memory)."""
    if is_deployed(context):
        return _encoded_file(config.to_json(), str(context.node_config[DATA_PATH]))
    return _encoded_partition(config.to_json(), int(context.node_config["partition-id"]))


@lru_cache(maxsize=8)
def _encoded_file(config_json: str, path: str) -> Encoded:
    config = ClientConfig.from_json(config_json)
    rows = load_client_file(path, config.data)
    return encode(rows, tokenizer(config.model.name), config.model.max_length)


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
