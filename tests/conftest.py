"""Shared fixtures: tiny models built from configs in-process (the in-process Flower grid is
``fedpeft.testing.LocalGrid``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedpeft.testing import save_tiny_bert  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32, intermediate 48) with MiniLM's tokenizer, saved as a model dir."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


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
