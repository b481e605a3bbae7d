"""Clients at ranks below the global adapter's: truncation, hetlora's zero-padding, flexlora's
SVD redistribution, and the validator, wire, client and server loop that carry them."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.lora import AdapterHost
from fedpeft.models import ClassifierSpec, load_classifier
from fedpeft.state import AdapterFactors, GlobalState, started_from
from fedpeft.testing import LocalGrid
from fedpeft.wire import decode_update, encode_update
from server.loop import FederatedRun
from server.validation import update_norm, validate
from strategies import FedAvg, FlexLoRA, HetLoRA, StrategyError
from strategies.hetlora import padded_to
from tests.factories import SHAPES, extras, factors, small_config, update

R = 4  # the global rank


def global_state(seed: int = 0) -> GlobalState:
    return GlobalState(round=0, adapter=factors(R, 100 + seed, scale=4.0), extras=extras(100 + seed))


def client(rank: int, seed: int, num_examples: int = 10):
    """A client update at ``rank`` with alpha 16 (scale 16 / rank), for round 1."""
    return update(rank, seed, num_examples, rnd=1, alpha=16.0)


def test_truncation_keeps_the_leading_components_of_the_product():
    f = factors(R, 1, scale=4.0)["layer.0.q"]
    t = f.truncated(2, scale=8.0)
    assert t.rank == 2 and t.scale == 8.0
    torch.testing.assert_close(t.delta(), f.scale * f.B[:, :2] @ f.A[:2])
    assert f.truncated(R, f.scale) is f
    with pytest.raises(ValueError, match="truncate"):
        f.truncated(R + 1, 1.0)


def test_hetlora_with_every_client_at_full_rank_and_data_weights_is_fedavg():
    state = global_state()
    updates = [client(R, seed, n) for seed, n in ((1, 10), (2, 30), (3, 60))]
    het = HetLoRA(weighting="examples").aggregate(1, state, updates)
    avg = FedAvg().aggregate(1, state, updates)
    for module, f in avg.adapter.items():
        torch.testing.assert_close(het.adapter[module].A, f.A)
        torch.testing.assert_close(het.adapter[module].B, f.B)
    for name, t in avg.extras.items():
        torch.testing.assert_close(het.extras[name], t)


def test_hetlora_zero_pads_and_weighs_by_update_norm():
    state = global_state()
    small, full = client(2, 1), client(R, 2)
    out = HetLoRA().aggregate(1, state, [small, full])
    for module, glob in state.adapter.items():
        norms = [float(u.factors[module].delta().norm()) for u in (small, full)]
        p = [n / sum(norms) for n in norms]
        pad_small, f = padded_to(small.factors[module], glob), full.factors[module]
        assert torch.equal(pad_small.A[2:], torch.zeros(R - 2, pad_small.A.shape[1]))
        torch.testing.assert_close(pad_small.delta(), small.factors[module].delta())  # padding is exact
        torch.testing.assert_close(out.adapter[module].A, p[0] * pad_small.A + p[1] * f.A)
        torch.testing.assert_close(
            out.adapter[module].B, p[0] * pad_small.B + p[1] * f.B * (f.scale / glob.scale)
        )


def test_one_client_of_full_rank_returns_its_model():
    state = global_state()
    only = client(R, 1)
    for strategy in (HetLoRA(), FlexLoRA()):
        out = strategy.aggregate(1, state, [only])
        for module, f in only.factors.items():
            torch.testing.assert_close(out.adapter[module].delta(), f.delta(), rtol=1e-4, atol=1e-5)


def dense_best(deltas: list[torch.Tensor], weights: list[float], rank: int) -> torch.Tensor:
    total = sum(w * d.double() for d, w in zip(deltas, weights, strict=True))
    u, s, vh = torch.linalg.svd(total)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_flexlora_keeps_the_best_rank_R_approximation_and_clients_get_the_best_of_theirs():
    state = global_state()
    updates = [client(2, 1, 10), client(R, 2, 30), client(R, 3, 60)]
    strategy = FlexLoRA()
    out = strategy.aggregate(1, state, updates)
    p = [0.1, 0.3, 0.6]
    for module in SHAPES:
        deltas = [u.factors[module].delta() for u in updates]
        glob = out.adapter[module]
        assert glob.rank == R and glob.scale == state.adapter[module].scale
        torch.testing.assert_close(glob.delta().double(), dense_best(deltas, p, R), rtol=1e-4, atol=1e-4)
        small = glob.truncated(2, scale=8.0)  # what a rank-2 client starts from
        torch.testing.assert_close(small.delta().double(), dense_best(deltas, p, 2), rtol=1e-4, atol=1e-4)
    assert 0 < strategy.last_metrics["discarded_energy"] < 1  # a rank-10 sum kept at rank 4 (5 x 9 module)


def test_hetlora_keeps_the_global_components_no_reply_trained():
    state = global_state()
    out = HetLoRA().aggregate(1, state, [client(1, 1), client(2, 2)])
    for module, glob in out.adapter.items():
        start = state.adapter[module]
        assert torch.equal(glob.A[2:], start.A[2:]) and torch.equal(glob.B[:, 2:], start.B[:, 2:])
        assert not torch.equal(glob.A[:2], start.A[:2])


def test_flexlora_below_full_rank_keeps_every_component_trainable():
    """One rank-1 reply: ΔW has rank 1 < R. Components beyond it get zero B columns and A rows that
    complete an orthonormal set (a component with zero A and zero B gets no gradient, ever)."""
    state = global_state()
    out = FlexLoRA().aggregate(1, state, [client(1, 1)])
    for module, glob in out.adapter.items():
        torch.testing.assert_close(glob.A @ glob.A.T, torch.eye(R), rtol=0, atol=1e-5)
        assert glob.B[:, 1:].abs().max() == 0 and glob.B[:, 0].abs().max() > 0
        torch.testing.assert_close(glob.delta(), client(1, 1).factors[module].delta(), rtol=1e-4, atol=1e-5)
        B = glob.B.clone().requires_grad_()
        (glob.scale * B @ glob.A).sum().backward()  # any loss: B's new columns get a gradient
        assert (B.grad[:, 1:].norm(dim=0) > 0).all()


def test_the_validator_and_the_norm_screen_take_smaller_ranks_only_when_the_strategy_does():
    state = global_state()
    small = client(2, 1)
    assert validate(small, 1, None, state, mixed_ranks=True) is None
    assert "rank" in validate(small, 1, None, state)
    assert "rank" in validate(client(R + 2, 1), 1, None, state, mixed_ranks=True)
    start = started_from(small, state.adapter)
    moved = sum(
        float((f.A - start[m].A).norm() ** 2 + (f.B - start[m].B).norm() ** 2)
        for m, f in small.factors.items()
    )
    moved += sum(float((t - state.extras[n]).norm() ** 2) for n, t in small.extras.items())
    assert update_norm(small, state) == pytest.approx(moved**0.5, rel=1e-5)


def test_a_delta_coded_reply_from_a_smaller_rank_decodes_against_the_truncated_adapter():
    state = global_state()
    small = client(2, 1)
    start = started_from(small, state.adapter)
    content = encode_update(small, compression="fp16", reference=start)
    back = decode_update(content, frozen=state.adapter)
    for module, f in small.factors.items():
        torch.testing.assert_close(back.factors[module].A, f.A, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(back.factors[module].B, f.B, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_mixed_rank_clients_federate_around_one_global_adapter(tiny_bert_dir, tmp_path, strategy):
    options = {"strategy.name": strategy, "lora.rank": 4, "lora.client_ranks": "[2, 4, 1]"}
    run = FederatedRun(small_config(tiny_bert_dir, **options), tmp_path)
    run.run(LocalGrid(3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients_aggregated"] == 3 for r in rows[1:])
    assert all(f.rank == 4 for f in run.state.adapter.values())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_client_rank_above_the_global_adapter_is_refused_before_any_round(tiny_bert_dir, tmp_path):
    options = {"strategy.name": "hetlora", "lora.rank": 2, "lora.client_ranks": "[2, 4]"}
    with pytest.raises(StrategyError, match="set lora.rank to the largest client rank, 4"):
        FederatedRun(small_config(tiny_bert_dir, **options), tmp_path)


def test_a_client_truncates_the_global_adapter_it_receives(tiny_bert_dir):
    config = small_config(tiny_bert_dir, **{"lora.rank": 4})

    def model(rank: int):
        return load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), 2, config.lora, 0, rank))

    big = model(4)
    glob, head = AdapterHost(big).read_update()
    glob = {m: AdapterFactors(A=f.A, B=torch.randn_like(f.B), scale=f.scale) for m, f in glob.items()}
    host = AdapterHost(model(2))
    loaded = host.load_state(GlobalState(adapter=glob, extras=head), init_seed=0)
    own, _ = host.read_update()
    for module, f in own.items():
        torch.testing.assert_close(f.delta(), glob[module].scale * glob[module].B[:, :2] @ glob[module].A[:2])
        torch.testing.assert_close(loaded[module].delta(), f.delta())
    with pytest.raises(ValueError, match="exceeds the global adapter's 2"):
        AdapterHost(big).load_state(GlobalState(adapter=loaded, extras=head), init_seed=0)
