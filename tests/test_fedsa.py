"""FedSA-LoRA: A shared and averaged, B personal (kept by each client), and the per-client
evaluation on each client's own held-out rows."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import RecordDict

from client import personal
from fedpeft.lora import AdapterHost
from fedpeft.models import ClassifierSpec, load_classifier
from fedpeft.state import AdapterFactors, GlobalState
from fedpeft.testing import LocalGrid
from fedpeft.training import Encoded
from fedpeft.wire import decode_update, encode_update, unpack_tensors
from server.loop import FederatedRun
from server.secure import SecureModeError, check_strategy
from strategies import FedAvg, FedSA
from tests.factories import sent_state, small_config, trained


def test_a_reply_without_B_takes_B_from_the_adapter_the_client_started_from():
    state = sent_state()
    update = trained(state, 1)
    content = encode_update(update, send_B=False)
    assert not any(key.endswith("/B") for key in content["update"].keys())
    back = decode_update(content, frozen=state.adapter)
    for module, f in back.factors.items():
        assert torch.equal(f.A, update.factors[module].A) and torch.equal(f.B, state.adapter[module].B)


@pytest.mark.parametrize("personal_head", [True, False])
def test_fedsa_averages_A_as_fedavg_and_keeps_the_global_B_and_head(personal_head):
    state = sent_state()
    updates = [trained(state, seed) for seed in (1, 2, 3)]
    sa = FedSA(personal_head=personal_head).aggregate(1, state, updates)
    avg = FedAvg().aggregate(1, state, updates)
    for module, f in avg.adapter.items():
        assert torch.equal(sa.adapter[module].A, f.A)
        assert torch.equal(sa.adapter[module].B, state.adapter[module].B)
    for name, t in avg.extras.items():  # the head stays the global one, or is averaged as fedavg's
        assert torch.equal(sa.extras[name], state.extras[name] if personal_head else t)
    fresh = FedSA().aggregate(1, GlobalState(), updates)  # clients started from their own inits
    assert all(not f.B.any() for f in fresh.adapter.values())
    plan = FedSA(personal_head=personal_head).client_instructions(1, state)
    assert plan.personal_B and plan.personal_extras == personal_head and plan.send_extras != personal_head


def test_a_reply_without_extras_takes_the_global_ones():
    state = sent_state()
    update = trained(state, 1)
    content = encode_update(update, send_B=False, send_extras=False)
    assert not any(key.startswith("extra/") for key in content["update"].keys())
    back = decode_update(content, frozen=state.adapter, frozen_extras=state.extras)
    assert all(torch.equal(back.extras[k], t) for k, t in state.extras.items())


def test_a_client_keeps_its_B_and_puts_it_back_over_the_global_one(tiny_bert_dir):
    lora = small_config(tiny_bert_dir).lora
    host = AdapterHost(load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), 2, lora, 0, 2)))
    factors, extras = host.read_update()
    mine = {m: AdapterFactors(A=f.A, B=torch.randn_like(f.B), scale=f.scale) for m, f in factors.items()}
    host.load_state(GlobalState(adapter=mine, extras=extras), init_seed=0)
    my_head = {k: torch.randn_like(t) for k, t in extras.items()}
    host.load_state(GlobalState(adapter=mine, extras=my_head), init_seed=0)
    node_state = RecordDict()
    personal.keep(host, node_state, extras=True)
    host.load_state(GlobalState(adapter=factors, extras=extras), init_seed=0)  # the next round's global
    personal.restore(host, node_state, extras=True)
    restored, head = host.read_update()
    for module, f in restored.items():
        assert torch.equal(f.B, mine[module].B) and torch.equal(f.A, factors[module].A)
    assert all(torch.equal(head[k], t) for k, t in my_head.items())
    host.load_state(GlobalState(adapter=factors, extras=extras), init_seed=0)
    personal.restore(host, node_state)  # without a personal head: the global head stays
    assert all(torch.equal(host.read_update()[1][k], t) for k, t in extras.items())


def test_held_out_rows_are_a_seeded_disjoint_share():
    data = Encoded([[i] for i in range(20)], list(range(20)))
    kept, held = data.split(0.25, seed=3)
    assert len(held) == 5 and sorted(kept.labels + held.labels) == list(range(20))
    assert held.labels == data.split(0.25, seed=3)[1].labels != data.split(0.25, seed=4)[1].labels
    assert len(Encoded([[0], [1]], [0, 1]).split(0.01, 0)[1]) == 1  # at least one row, never all


def test_a_fedsa_run_keeps_a_B_per_client_and_logs_each_clients_accuracy(tiny_bert_dir, tmp_path):
    config = small_config(
        tiny_bert_dir, **{"strategy.name": "fedsa", "data.client_eval_fraction": 0.25, "run.rounds": 3}
    )
    grid = LocalGrid(3)
    run = FederatedRun(config, tmp_path)
    run.run(grid)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    for row in rows:
        accuracies = [r["client_eval_accuracy"] for r in row["replies"]]
        assert len(accuracies) == 3 and row["client_eval_accuracy"] == pytest.approx(sum(accuracies) / 3)
    first = [unpack_tensors(context.state[personal.PERSONAL_B]) for context in grid.contexts.values()]
    assert len(first) == 3 and all(b.keys() == run.state.adapter.keys() for b in first)
    module = next(iter(run.state.adapter))
    assert not torch.equal(first[0][module], first[1][module])  # each client's own B
    assert all(not f.B.any() for f in run.state.adapter.values())  # the global B stays the initial zeros
    heads = [unpack_tensors(context.state[personal.PERSONAL_EXTRAS]) for context in grid.contexts.values()]
    name = next(iter(heads[0]))
    assert not torch.equal(heads[0][name], heads[1][name])  # each client's own head
    assert not any(torch.equal(run.state.extras[k], heads[0][k]) for k in heads[0])  # heads stay home


def test_secure_aggregation_refuses_a_personal_B():
    with pytest.raises(SecureModeError, match="keeps each client's B"):
        check_strategy(FedSA())
