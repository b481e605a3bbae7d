"""Builders shared by the tests: random value types on rectangular layers, small run
configurations on the tiny models, the rows of a run's metrics.jsonl, a tiny chat tokenizer and
``fedpeft simulate`` as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from fedpeft.config import RunConfig, load_config
from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState, LowRankDelta
from tests.llm_data import arithmetic_rows, write_json

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (d_out, d_in) per module: all rectangular, so a transposed factor cannot pass silently.
SHAPES = {"layer.0.q": (6, 4), "layer.0.v": (5, 7), "layer.1.fc": (9, 5)}


def factors(rank: int, seed: int, scale: float = 2.0, shapes=SHAPES) -> dict[str, AdapterFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: AdapterFactors(
            A=torch.randn(rank, d_in, generator=gen), B=torch.randn(d_out, rank, generator=gen), scale=scale
        )
        for name, (d_out, d_in) in shapes.items()
    }


def extras(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    return {"head.weight": torch.randn(3, 4, generator=gen), "head.bias": torch.randn(3, generator=gen)}


def update(rank: int, seed: int, num_examples: int, rnd: int = 1, alpha: float = 16.0) -> ClientUpdate:
    return ClientUpdate(
        factors=factors(rank, seed, scale=alpha / rank),
        extras=extras(seed),
        num_examples=num_examples,
        round=rnd,
        rank=rank,
        alpha=alpha,
        metrics={"train_loss": 0.5 + seed},
        client_id=str(seed),
    )


def merged(rank: int, seed: int) -> dict[str, LowRankDelta]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: LowRankDelta(
            U=torch.randn(d_out, rank, generator=gen), V=torch.randn(rank, d_in, generator=gen)
        )
        for name, (d_out, d_in) in SHAPES.items()
    }


def state(seed: int = 0) -> GlobalState:
    return GlobalState(round=3, merged=merged(2, seed), adapter=factors(4, seed + 1), extras=extras(seed))


def sent_state() -> GlobalState:
    """What a server sends in round 1 of a rank-4 federation: an adapter and a head."""
    return GlobalState(adapter=factors(4, 100, scale=4.0), extras=extras(100))


def trained(state: GlobalState, seed: int, boost: float = 1.0) -> ClientUpdate:
    """What a client replies after training from ``state``: its adapter and head plus a small
    random step (``boost`` x it), for round 1."""
    gen = torch.Generator().manual_seed(seed)

    def step(t: torch.Tensor) -> torch.Tensor:
        return t + boost * 0.01 * torch.randn(t.shape, generator=gen)

    adapter = state.adapter or {}
    new = {n: AdapterFactors(A=step(f.A), B=step(f.B), scale=f.scale) for n, f in adapter.items()}
    extras = {k: step(t) for k, t in state.extras.items()}
    return ClientUpdate(new, extras, 10, round=1, rank=4, alpha=16.0, metrics={}, client_id=str(seed))


def total_delta(state: GlobalState, name: str) -> torch.Tensor:
    """The full weight delta ``state`` adds to module ``name``: merged U V plus scale B A."""
    parts = []
    if name in state.merged:
        parts.append(state.merged[name].delta())
    if state.adapter and name in state.adapter:
        parts.append(state.adapter[name].delta())
    if not parts:
        raise KeyError(f"module {name!r} is in neither the merged delta nor the adapter")
    return torch.stack(parts).sum(0)


def global_norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all ``tensors`` taken together as one vector (float64)."""
    return float(torch.cat([t.double().reshape(-1) for t in tensors.values()]).norm())


def small_config(model_dir: Path, **extra: object) -> RunConfig:
    """3 clients on the generated data, 2 rounds of 2 steps, rank 2: a federation of ``model_dir``
    (a tiny BERT) that runs in seconds; ``extra`` are more ``section.key`` overrides."""
    overrides = {
        "model.name": f"'{model_dir}'",
        "data.num_clients": 3,
        "data.demo_train_size": 120,
        "data.demo_test_size": 40,
        "data.min_partition_size": 5,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "server.fraction": 1.0,
        "server.min_clients": 3,
        "run.rounds": 2,
        "lora.rank": 2,
        "lora.alpha": 4.0,
    }
    overrides.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def causal_config(tmp_path: Path, model_dir: Path, strategy: str, **extra: object) -> RunConfig:
    """2 clients of tiny arithmetic chats (split by category) for the tiny Llama in ``model_dir``."""
    rows = arithmetic_rows()
    train_file = write_json(tmp_path / "train.json", rows)
    test_file = write_json(tmp_path / "test.json", rows[::4])
    overrides = {
        "model.name": str(model_dir),
        "model.task": "causal_lm",
        "model.max_length": 48,
        "data.source": str(train_file),
        "data.test_source": str(test_file),
        "data.num_clients": 2,
        "data.partition": "field",
        "data.partition_field": "category",
        "train.local_steps": 8,
        "train.batch_size": 4,
        "train.lr": 1e-2,
        "server.fraction": 1.0,
        "server.min_clients": 2,
        "run.rounds": 2,
        "lora.rank": 4,
        "lora.alpha": 8.0,
        "lora.target_modules": ["q_proj", "v_proj", "up_proj"],
        "strategy.name": strategy,
        "eval.generate": True,
        "eval.max_new_tokens": 8,
        **extra,
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (none before the first is written)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def simulate_cli(config: str, run_dir: Path, overrides: list[str]) -> None:
    """Run ``fedpeft simulate`` as a user would (a fresh process, Flower's Ray engine)."""
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", config, "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
