"""Shared fixtures: tiny models built from configs in-process, and an in-process Flower grid."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedpeft.models import resolve_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32, intermediate 48) with MiniLM's tokenizer, saved as a model dir."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def save_tiny_bert(path: Path) -> Path:
    """Write the ``tiny_bert_dir`` model to ``path`` (also used by benchmarks/soak.py)."""
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


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_WORDS = (
    "user assistant system what is the answer to plus minus times of and a an name colour city "
    "capital france paris red blue green sky sea grass two three four five six seven eight nine "
    "zero one #### . , ? ! : 0 1 2 3 4 5 6 7 8 9"
).split()


def tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``TINY_WORDS`` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {word: i for i, word in enumerate(["[UNK]", *TINY_WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with a tiny word-level ChatML tokenizer, saved as a model dir."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that a rank-4 adapter can move the outputs in a few steps
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def simulate_cli(config: str, run_dir: Path, overrides: list[str]) -> None:
    """Run ``fedpeft simulate`` as a user would (a fresh process, Flower's Ray engine)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", config, "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


class LocalGrid:
    """Delivers messages to ClientApp functions in this process (no Ray, no network).

    Node ids are unrelated to partition ids, as in Flower. ``handlers`` maps a partition id to a
    callable(message, context) -> reply (or None: never replies) for training messages; by default
    every node runs the real fedpeft client. Queries go to the real query handlers.
    """

    def __init__(
        self,
        num_nodes: int,
        handlers: dict[int, Callable[[Message, Context], Message]] | None = None,
        node_ids: list[int] | None = None,
    ):
        from client.app import identify, initial_adapter, secagg_keys, secagg_shares, secagg_unmask, train

        self.nodes = node_ids or [1000 + 7 * i for i in range(num_nodes)]
        self.handlers = {n: train for n in self.nodes}
        self.handlers |= {self.nodes[i]: h for i, h in (handlers or {}).items()}
        self.queries = {"query.identify": identify, "query.initial_adapter": initial_adapter}
        self.queries |= {
            "query.secagg_keys": secagg_keys,
            "query.secagg_shares": secagg_shares,
            "query.secagg_unmask": secagg_unmask,
        }
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
        """Run the handlers of the requested messages now; a handler returning ``None`` never replies."""
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
        context = self.contexts[node]
        handler = self.queries.get(msg.metadata.message_type, self.handlers[node])
        try:
            reply = handler(msg, context)
        except Exception as exc:  # as Flower's runtime does: an error reply, not a crash
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        TaskIdentity.node_id = 0
        return reply
