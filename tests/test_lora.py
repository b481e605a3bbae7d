"""LoRA factors <-> peft models: bitwise round trips, seeded init, merged-delta orientation."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from fedpeft.config import LoraSection
from fedpeft.lora import AdapterHost, extract_adapter, fresh_init, load_adapter, lora_layers
from fedpeft.models import ClassifierSpec, load_classifier
from fedpeft.state import GlobalState, LowRankDelta

TARGETS = ["query", "value", "intermediate.dense"]  # intermediate.dense is 32 -> 48: rectangular


def tiny_classifier(path, seed=0, rank=4):
    lora = LoraSection(rank=rank, alpha=8.0, target_modules=TARGETS)
    return load_classifier(ClassifierSpec.from_config(str(path), 3, lora, seed))


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))


def tiny_gpt2(rank=4):
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    lora = LoraConfig(r=rank, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    return get_peft_model(base, lora)


def test_extract_then_load_is_bitwise(tiny_bert_dir):
    source = tiny_classifier(tiny_bert_dir, seed=0)
    randomize(source, seed=1)
    factors, extras = extract_adapter(source)
    assert set(extras) == {"classifier.weight", "classifier.bias"}
    assert any(name.endswith("intermediate.dense") for name in factors)

    target = tiny_classifier(tiny_bert_dir, seed=5)
    load_adapter(target, factors, extras)
    again, again_extras = extract_adapter(target)
    for name, f in factors.items():
        assert torch.equal(again[name].A, f.A) and torch.equal(again[name].B, f.B)
        assert again[name].scale == f.scale == 2.0
        assert f.A.shape == (4, f.A.shape[1]) and f.B.shape == (f.B.shape[0], 4)
    for name, t in extras.items():
        assert torch.equal(again_extras[name], t)
    ids = torch.tensor([[101, 2000, 2001, 102]])
    source.eval(), target.eval()
    assert torch.equal(source(input_ids=ids).logits, target(input_ids=ids).logits)


def test_load_rejects_rank_mismatch(tiny_bert_dir):
    factors, extras = extract_adapter(tiny_classifier(tiny_bert_dir, rank=4))
    with pytest.raises(ValueError, match="rank mismatch"):
        load_adapter(tiny_classifier(tiny_bert_dir, rank=2), factors, extras)


def test_fresh_init_is_reproducible_from_seed(tiny_bert_dir):
    a, b = tiny_classifier(tiny_bert_dir), tiny_classifier(tiny_bert_dir)
    randomize(a, 1)
    fresh_init(a, seed=7)
    fresh_init(b, seed=7)
    fa, fb = extract_adapter(a)[0], extract_adapter(b)[0]
    for name in fa:
        assert torch.equal(fa[name].A, fb[name].A)
        assert not fa[name].B.any()
    fresh_init(b, seed=8)
    assert not all(torch.equal(fa[n].A, extract_adapter(b)[0][n].A) for n in fa)


def _random_delta(layer, rank, seed):
    d_out, d_in = layer.out_features, layer.in_features
    gen = torch.Generator().manual_seed(seed)
    return LowRankDelta(U=torch.randn(d_out, rank, generator=gen), V=torch.randn(rank, d_in, generator=gen))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merged_delta_acts_as_d_out_by_d_in_map(kind, tiny_bert_dir):
    """W0 + U V must act on inputs x as y = base(x) + x V^T U^T, whatever the weight layout."""
    model = tiny_classifier(tiny_bert_dir) if kind == "linear" else tiny_gpt2()
    host = AdapterHost(model)
    layers = host.layers
    assert any(layer.in_features != layer.out_features for layer in layers.values()), (
        "the test needs non-square layers to catch transposes"
    )
    if kind == "conv1d":
        assert all(layer.fan_in_fan_out for layer in layers.values())
    merged = {n: _random_delta(l, rank=3, seed=i) for i, (n, l) in enumerate(sorted(layers.items()))}

    x = {n: torch.randn(5, layer.in_features) for n, layer in layers.items()}
    before = {n: l.get_base_layer()(x[n]) for n, l in layers.items()}
    host.load_state(GlobalState(merged=merged), init_seed=0)
    for name, layer in layers.items():
        after = layer.get_base_layer()(x[name])
        expected = before[name] + x[name] @ merged[name].V.T @ merged[name].U.T
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_merged_delta_never_touches_base_weights_nor_accumulates(tiny_bert_dir):
    host = AdapterHost(tiny_classifier(tiny_bert_dir))
    pristine = {n: l.get_base_layer().weight.clone() for n, l in host.layers.items()}
    x = {n: torch.randn(3, l.in_features) for n, l in host.layers.items()}
    plain = {n: l.get_base_layer()(x[n]) for n, l in host.layers.items()}
    merged = {n: _random_delta(l, 2, i) for i, (n, l) in enumerate(host.layers.items())}
    host.load_state(GlobalState(merged=merged), init_seed=0)
    host.load_state(GlobalState(merged=merged), init_seed=0)  # twice: must not accumulate
    for name, layer in host.layers.items():
        assert torch.equal(layer.get_base_layer().weight, pristine[name])
        expected = plain[name] + x[name] @ merged[name].delta().T
        torch.testing.assert_close(layer.get_base_layer()(x[name]), expected, rtol=1e-5, atol=1e-5)
    host.load_state(GlobalState(), init_seed=0)
    assert host.merged_paths == {}
    for name, layer in host.layers.items():
        assert torch.equal(layer.get_base_layer()(x[name]), plain[name])


def test_fresh_state_restores_initial_head(tiny_bert_dir):
    host = AdapterHost(tiny_classifier(tiny_bert_dir))
    initial = extract_adapter(host.model)[1]
    randomize(host.model, 3)
    host.load_state(GlobalState(), init_seed=0)
    for name, t in extract_adapter(host.model)[1].items():
        assert torch.equal(t, initial[name])
    assert len(lora_layers(host.model)) == 6


def test_client_rank_comes_from_node_setting_then_list_then_default():
    from flwr.app import Context, RecordDict

    from client.runtime import client_rank
    from fedpeft.config import RunConfig

    config = RunConfig().client_config()

    def ctx(**node):
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    assert client_rank(config, ctx(**{"partition-id": 4})) == 8
    config = config.replace(lora=config.lora.replace(client_ranks=[4, 8, 16]))
    assert [client_rank(config, ctx(**{"partition-id": i})) for i in range(4)] == [4, 8, 16, 4]
    assert client_rank(config, ctx(**{"partition-id": 0, "rank": 2})) == 2
