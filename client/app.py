"""The Flower ClientApp: apply the global state, train locally, reply with the LoRA factors."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import runtime
from fedpeft.state import ClientUpdate
from fedpeft.training import train as train_locally
from fedpeft.wire import decode_instructions, decode_state, encode_identity, encode_update

app = ClientApp()


def client_id(context: Context) -> str:
    """A name for this client that is stable across runs (Flower's node ids are not)."""
    return f"partition-{int(context.node_config['partition-id'])}"


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server who this node is, so that sampling is reproducible."""
    return Message(encode_identity(client_id(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition."""
    instructions = decode_instructions(msg.content)
    config = instructions.client_config
    torch.set_num_threads(config.threads)
    partition_id = int(context.node_config["partition-id"])

    host = runtime.model_host(runtime.classifier_spec(config))
    tokenizer = runtime.tokenizer(config.model.name)
    data = runtime.partition_data(config, partition_id)
    host.load_state(decode_state(msg.content), init_seed=instructions.init_seed)
    metrics = train_locally(
        host.model,
        tokenizer,
        data,
        steps=config.train.local_steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        seed=hash((config.seed, instructions.round, partition_id)) & 0x7FFFFFFF,
        train_lora_A=instructions.plan.train_lora_A,
    )
    factors, extras = host.read_update()
    update = ClientUpdate(
        factors=factors,
        extras=extras,
        num_examples=len(data),
        round=instructions.round,
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        metrics=metrics,
    )
    return Message(encode_update(update), reply_to=msg)
