"""Test apparatus that tests and benchmarks share: an in-process Flower grid that drives the real
ServerApp round loop and ClientApp (no Ray, no network), and a tiny BERT to run it on."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fedpeft.models import resolve_model

Handler = Callable[[Message, Context], Message | None]


class LocalGrid:
    """A Flower ``Grid`` that delivers each message to a ClientApp in this process.

    Node ids are unrelated to partition ids, as in Flower. Every node runs ``app`` (default:
    fedpeft's ClientApp), which routes by message type; ``handlers`` maps a partition id to a
    callable(message, context) -> reply (or None: it never replies) that takes that node's
    training messages instead, to simulate misbehaving clients.
    """

    def __init__(
        self,
        num_nodes: int,
        handlers: dict[int, Handler] | None = None,
        node_ids: list[int] | None = None,
        app: ClientApp | None = None,
    ) -> None:
        if app is None:
            from client.app import app
        self.app = app
        self.nodes = node_ids or [1000 + 7 * i for i in range(num_nodes)]
        self.handlers = {self.nodes[i]: h for i, h in (handlers or {}).items()}
        self.pushed: dict[str, Message] = {}
        self.contexts = {  # one per node, kept across rounds as Flower keeps a node's Context
            node: Context(
                run_id=1, node_id=node, node_config={"partition-id": i}, state=RecordDict(), run_config={}
            )
            for i, node in enumerate(self.nodes)
        }
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex  # as Flower's grids do
            self.pushed[message_id] = msg
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Run the requested messages now; a handler returning ``None`` never replies."""
        replies = []
        for message_id in list(message_ids):
            msg = self.pushed.pop(message_id, None)
            if msg is not None and (reply := self._handle(msg)) is not None:
                replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _handle(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        TaskIdentity.node_id = node
        handler = self.handlers.get(node) if msg.metadata.message_type == MessageType.TRAIN else None
        try:
            reply = (handler or self.app)(msg, self.contexts[node])
        except Exception as exc:  # as Flower's runtime does: an error reply, not a crash
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        TaskIdentity.node_id = 0
        return reply


def save_tiny_bert(path: Path) -> Path:
    """A 2-layer BERT (hidden 32, intermediate 48) with MiniLM's tokenizer, saved as a model
    directory at ``path``: small enough to train in a test."""
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2")).save_pretrained(path)
    return path
