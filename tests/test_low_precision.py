"""Exact strategies on low-precision bases: the merged delta runs beside a bf16 or 4-bit base in
float32, so a client's effective weights match a float64 reference over several rounds.

bf16 runs on the CPU; 4-bit needs CUDA and bitsandbytes and skips without them. The file builds
its own model (no conftest fixture), so on a GPU machine without fedpeft's process stack it runs as
``python -m pytest --noconftest tests/test_low_precision.py``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedpeft.config import LoraSection, ModelSection
from fedpeft.lora import AdapterHost
from fedpeft.models import CausalLMSpec, load_causal_lm
from fedpeft.state import ClientUpdate, GlobalState
from fedpeft.training import train
from strategies.fedex import FedEx
from strategies.stacking import Stacking

LORA = LoraSection(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
CLIENTS, ROUNDS = 3, 3
STEP = 1e-4  # B moves by this rms: deltas of rms ~5e-5, below half a bf16 ulp of weights of rms 0.02
GPU_4BIT = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="4-bit bases need a CUDA GPU and bitsandbytes",
)
BASES = [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"dtype": "bfloat16", "quantization": "4bit"}, id="4bit", marks=GPU_4BIT),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer Llama (hidden 64: bitsandbytes' 4-bit blocks) with random weights of rms 0.02."""
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def host_on(path, base: dict[str, str]) -> AdapterHost:
    model = ModelSection(name=str(path), task="causal_lm", **base)
    return AdapterHost(load_causal_lm(CausalLMSpec.from_config(model, LORA, 0)))


def effective_delta(host: AdapterHost, name: str) -> torch.Tensor:
    """W - W0 as the client's model holds it: its merged path plus s B A, in float64 on the CPU."""
    layer = host.layers[name]
    lora = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    merged = host.merged_paths[name].delta() if name in host.merged_paths else 0.0
    return (merged + lora).detach().double().cpu()


def client_round(host: AdapterHost, state: GlobalState, client: int, rnd: int) -> ClientUpdate:
    """Load ``state`` and move every factor by a seeded step, as local training would."""
    host.load_state(state, init_seed=rnd)
    gen = torch.Generator().manual_seed(100 * rnd + client)
    with torch.no_grad():
        for layer in host.layers.values():
            for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                factor.add_(STEP * torch.randn(factor.shape, generator=gen).to(factor.device))
    factors, extras = host.read_update()
    return ClientUpdate(factors, extras, num_examples=10 * (client + 1), round=rnd, rank=4, alpha=8.0)


def base_weights(host: AdapterHost) -> dict[str, torch.Tensor]:
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in host.layers.items()}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("strategy", [Stacking(), FedEx()], ids=["stacking", "fedex"])
def test_exact_strategies_stay_exact_on_a_low_precision_base(llama_dir, base, strategy):
    host = host_on(llama_dir, base)
    pristine = base_weights(host)
    state, reference = GlobalState(), {}
    for rnd in range(1, ROUNDS + 1):
        updates, client_deltas = [], []
        for client in range(CLIENTS):
            updates.append(client_round(host, state, client, rnd))
            client_deltas.append({n: effective_delta(host, n) for n in host.layers})
        p = [u.num_examples / sum(u.num_examples for u in updates) for u in updates]
        reference = {n: sum(pk * d[n] for pk, d in zip(p, client_deltas, strict=True)) for n in host.layers}
        state = strategy.aggregate(rnd, state, updates)
        host.load_state(state, init_seed=rnd + 1)
        for name, weight in base_weights(host).items():
            assert torch.equal(weight, pristine[name])  # never rounded into
            want = reference[name]
            torch.testing.assert_close(
                effective_delta(host, name), want, rtol=0, atol=1e-5 * want.abs().max().item()
            )
    # the test can fail: the same delta added into a bf16 weight loses most of it to rounding
    w0 = next(iter(host_on(llama_dir, {"dtype": "bfloat16"}).layers.values())).get_base_layer().weight.cpu()
    name = next(iter(host.layers))
    kept = (w0.double() + reference[name]).to(torch.bfloat16).double() - w0.double()
    assert (kept - reference[name]).norm() > 0.5 * reference[name].norm()


@pytest.mark.parametrize("base", BASES)
def test_a_client_trains_over_a_merged_path(llama_dir, base):
    """Forward and backward through the base, its merged path and the LoRA: the loss falls and
    only the LoRA factors change."""
    host = host_on(llama_dir, base)
    state = Stacking().aggregate(
        1, GlobalState(), [client_round(host, GlobalState(), c, 1) for c in range(2)]
    )
    host.load_state(state, init_seed=2)
    data = RandomRows(torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(0)))
    before = base_weights(host)
    first = train(host.model, None, data, steps=1, batch_size=8, lr=5e-3, weight_decay=0.0, seed=0)
    later = train(host.model, None, data, steps=30, batch_size=8, lr=5e-3, weight_decay=0.0, seed=1)
    assert later.train_loss < first.train_loss
    assert all(torch.equal(w, before[n]) for n, w in base_weights(host).items())
    assert any(f.B.abs().sum() > 0 for f in host.read_update()[0].values())


class RandomRows:
    """Fixed token rows as ``fedpeft.training.Batches``: next-token loss over every token."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.input_ids = ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: list[int], _tokenizer: object) -> dict[str, torch.Tensor]:
        ids = self.input_ids[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
