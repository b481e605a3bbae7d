"""What a client process keeps between rounds: the base model, tokenizer and its encoded data.

Loaded once per process (per model spec / data partition) and reused every round; only the
global state is applied afresh each round.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

from datasets import Dataset
from flwr.app import ConfigRecord, Context
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from client.settings import CLIENT_ID, DATA_PATH, RANK
from fedpeft.config import ClientConfig, DataSection, ModelSection
from fedpeft.data import Splits, partition
from fedpeft.dp_sgd import ExampleAccountant, ExampleDP
from fedpeft.errors import UserError
from fedpeft.label_skew import logit_adjustment as label_skew_adjustment
from fedpeft.lora import AdapterHost
from fedpeft.models import ModelSpec, load_model, load_tokenizer
from fedpeft.tasks import get_task
from fedpeft.training import Batches, Encoded


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


def init_seed(config: ClientConfig, round_seed: int, context: Context) -> int:
    """The seed of a fresh adapter (when the server sends none): the round's seed, shared by every
    client, or with ``lora.init = "per_client"`` one mixed with this client's ``seed_key``."""
    if config.lora.init == "shared":
        return round_seed
    return zlib.crc32(f"{round_seed}/{seed_key(context)}".encode())


def client_rank(config: ClientConfig, context: Context) -> int:
    """This client's LoRA rank: the node setting ``rank`` (deployment), else ``lora.client_ranks``
    cycled over partitions (simulation), else ``lora.rank``."""
    if RANK in context.node_config:
        return int(context.node_config[RANK])
    ranks = config.lora.client_ranks
    if not ranks:
        return config.lora.rank
    return ranks[int(context.node_config["partition-id"]) % len(ranks)]


def model_spec(config: ClientConfig, rank: int) -> ModelSpec:
    """The spec of this client's model: a causal LM or a classifier over the run's labels."""
    task = get_task(config.model.task)
    return task.model_spec(config.model, config.lora, config.seed, config.data.labels, rank)


@lru_cache(maxsize=2)
def model_host(spec: ModelSpec) -> AdapterHost:
    return AdapterHost(load_model(spec))


@lru_cache(maxsize=2)
def tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)


def client_data(config: ClientConfig, context: Context) -> Batches:
    """This client's training rows, tokenized: its own file when deployed, its share of the
    training set in simulation (cached per process: the last few, so a process that serves many
    virtual clients keeps bounded memory)."""
    if is_deployed(context):
        return _encoded_file(config.data, config.model, str(context.node_config[DATA_PATH]))
    return _encoded_partition(
        config.data, config.model, config.seed, int(context.node_config["partition-id"])
    )


def client_splits(config: ClientConfig, context: Context) -> tuple[Batches, Encoded | None]:
    """This client's training rows, and the rows it holds out to evaluate the model each round
    starts from (``data.client_eval_fraction``; None without)."""
    data = client_data(config, context)
    if config.data.client_eval_fraction == 0:
        return data, None
    assert isinstance(data, Encoded), "client evaluation needs labelled classification data"
    return data.split(config.data.client_eval_fraction, seed_key(context) ^ config.seed)


def logit_adjustment(config: ClientConfig, data: Batches) -> Tensor | None:
    """The training-loss logit adjustment ``train.label_skew`` asks for, from this client's labels."""
    if config.train.label_skew == "none":
        return None
    assert isinstance(data, Encoded) and config.data.labels, "label_skew needs labelled classification data"
    return label_skew_adjustment(
        data.labels, len(config.data.labels), config.train.label_skew, config.train.label_skew_tau
    )


EXAMPLE_DP_STEPS = "example-dp-steps"  # the DP-SGD steps this client has taken in the run


class ExampleBudgetSpent(UserError):
    """This client's example-level privacy budget cannot pay for another round."""


def example_accountant(config: ClientConfig, data: Batches, context: Context) -> ExampleAccountant | None:
    """This client's example-level DP accountant (``[example_dp]``), with the steps it has taken so
    far (kept in the node's state, which lasts the run); None when example-level DP is off.
    Raises ``ExampleBudgetSpent`` when one more round would exceed ``epsilon_budget``."""
    settings = config.example_dp
    if not settings.enabled:
        return None
    dp = ExampleDP(settings.noise_multiplier, settings.max_grad_norm, settings.delta)
    record = context.state.get(EXAMPLE_DP_STEPS)
    steps = int(record["steps"]) if isinstance(record, ConfigRecord) else 0
    accountant = ExampleAccountant(dp, min(1.0, config.train.batch_size / len(data)), steps)
    after = accountant.epsilon(steps + config.train.local_steps)
    if settings.epsilon_budget is not None and after > settings.epsilon_budget:
        raise ExampleBudgetSpent(
            f"example-level privacy budget: one more round would bring this client's epsilon to "
            f"{after:.3f}, above example_dp.epsilon_budget = {settings.epsilon_budget}"
        )
    return accountant


def record_example_steps(context: Context, accountant: ExampleAccountant, steps: int) -> float:
    """Count ``steps`` more DP-SGD steps in the node's state; returns the client's ε after them."""
    accountant.steps += steps
    context.state[EXAMPLE_DP_STEPS] = ConfigRecord({"steps": accountant.steps})
    return accountant.epsilon()


@lru_cache(maxsize=8)
def _encoded_file(data: DataSection, model: ModelSection, path: str) -> Batches:
    return _encode(get_task(model.task).client_file(path, data), model)


@lru_cache(maxsize=8)
def _encoded_partition(data: DataSection, model: ModelSection, seed: int, partition_id: int) -> Batches:
    rows = partition(_splits(data, model.task, seed).train, data, partition_id, seed)
    return _encode(rows, model)


@lru_cache(maxsize=1)
def _splits(data: DataSection, task: str, seed: int) -> Splits:
    """The dataset, loaded once per process and configuration, not once per partition."""
    return get_task(task).splits(data, seed)


def _encode(rows: Dataset, model: ModelSection) -> Batches:
    return get_task(model.task).encode_rows(rows, tokenizer(model.name), model.max_length)
