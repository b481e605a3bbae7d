"""Secure aggregation end to end through the server loop and the real client code (in-process
``LocalGrid``, tiny BERT): dropout recovery, failed attempts retried, dp, refusals."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace

import pytest
import torch
from flwr.app import Message

import client.app
from client.app import train
from fedpeft.config import ConfigError
from fedpeft.secagg.messages import UNMASK, UnmaskRequest
from fedpeft.secagg.ring import FixedPoint
from fedpeft.state import ClientUpdate, GlobalState
from fedpeft.testing import LocalGrid
from server.loop import FederatedRun, RoundFailed
from server.secure import SecureModeError
from strategies import DifferentialPrivacy, FedAvg
from strategies.clip import DeltaClipper
from tests.factories import simulate_cli, small_config

CLIENTS = 5
CLIP = 0.01  # below the median update norm (about 0.015 here): clipping is active


def secure_config(model_dir, **extra):
    settings = {
        "data.num_clients": CLIENTS,
        "server.min_clients": CLIENTS,
        "server.min_replies": 2,
        "server.evaluate": "false",
        "server.secure_aggregation": "true",
        "run.rounds": 1,
        "server.round_timeout": 0.3,  # LocalGrid answers at once: a missing reply is a dropout
    }
    return small_config(model_dir, **(settings | extra))


def withholding(msg: Message, context) -> None:
    """A client that trains and masks its update, then drops before the server gets it."""
    train(msg, context)
    return None


def withholding_once(calls: list[int]):
    """Withholds its masked reply the first time only (a flaky network on one attempt)."""

    def handler(msg: Message, context) -> Message | None:
        reply = train(msg, context)
        calls.append(context.node_id)
        return None if calls.count(context.node_id) == 1 else reply

    return handler


@dataclass
class Masked:
    """What the clients masked, by node id, and the global state they started from."""

    updates: dict[int, ClientUpdate] = field(default_factory=dict)
    received: GlobalState | None = None


@pytest.fixture
def masked(monkeypatch) -> Masked:
    """A test's view of every update before it is masked (the server never sees them)."""
    seen = Masked()
    masked_reply = client.app.secure.masked_reply

    def recording(content, update, received, send_A, context):
        seen.updates[context.node_id] = copy.deepcopy(update)
        seen.received = copy.deepcopy(received)
        return masked_reply(content, update, received, send_A, context)

    monkeypatch.setattr(client.app.secure, "masked_reply", recording)
    return seen


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_difference(state_a, state_b) -> float:
    diffs = [
        (getattr(state_a.adapter[m], part) - getattr(state_b.adapter[m], part)).abs().max()
        for m in state_a.adapter
        for part in ("A", "B")
    ]
    diffs += [(state_a.extras[k] - state_b.extras[k]).abs().max() for k in state_a.extras]
    return float(torch.stack(diffs).max())


def test_a_client_dropping_after_masking_is_recovered_and_the_sum_is_exact(tiny_bert_dir, tmp_path, masked):
    config = secure_config(tiny_bert_dir)
    grid = LocalGrid(CLIENTS, {2: withholding})
    run = FederatedRun(config, tmp_path)
    run.run(grid)
    row = rows(tmp_path)[-1]
    dropped = grid.nodes[2]
    assert row["clients_aggregated"] == CLIENTS - 1 and row["attempts"] == 1
    assert [d["node"] for d in row["dropped"]] == [str(dropped)]
    assert "no train reply" in row["dropped"][0]["reason"]
    assert all(reply["train_loss"] is None for reply in row["replies"])  # only the mean reaches the server
    survivors = [u for node, u in masked.updates.items() if node != dropped]
    assert len(survivors) == CLIENTS - 1 and dropped in masked.updates
    plain = FedAvg().aggregate(1, run.state, survivors)
    bound = FixedPoint().max_error + 1e-6  # quantization + float32 rounding of the plain average
    assert max_difference(run.state, plain) <= bound
    examples = [u.num_examples for u in survivors]
    loss = sum(u.metrics["train_loss"] * n for u, n in zip(survivors, examples, strict=True)) / sum(examples)
    assert row["train_loss"] == pytest.approx(loss, abs=1e-5)


def test_a_frozen_head_is_not_masked_and_stays_the_global_one_bit_for_bit(tiny_bert_dir, tmp_path):
    """Under train.freeze_head nobody trains or sends the head: the sum carries none of it (a head
    in the ring would be clipped to clip_range and re-quantised), and the result keeps the global."""
    run = FederatedRun(secure_config(tiny_bert_dir, **{"train.freeze_head": "true"}), tmp_path)
    initial = {}
    fetch = run._fetch_initial_adapter

    def keep_initial(grid):
        fetch(grid)
        initial.update({k: t.clone() for k, t in run.state.extras.items()})

    run._fetch_initial_adapter = keep_initial
    run.run(LocalGrid(CLIENTS))
    assert initial and all(torch.equal(run.state.extras[k], t) for k, t in initial.items())
    assert run.state.extras and any(f.B.any() for f in run.state.adapter.values())  # the adapter trained


def test_clients_weigh_their_masked_update_by_the_strategys_weighting(tiny_bert_dir, tmp_path, masked):
    config = secure_config(tiny_bert_dir, **{"strategy.weighting": "uniform", "data.partition": "dirichlet"})
    run = FederatedRun(config, tmp_path)
    run.run(LocalGrid(CLIENTS))
    updates = list(masked.updates.values())
    assert len({u.num_examples for u in updates}) > 1  # example weights would differ from uniform ones
    plain = FedAvg(weighting="uniform").aggregate(1, masked.received, updates)
    assert max_difference(run.state, plain) <= FixedPoint().max_error + 1e-6


def test_too_many_dropouts_fail_the_attempt_cleanly_and_it_is_retried(tiny_bert_dir, tmp_path):
    calls: list[int] = []
    config = secure_config(tiny_bert_dir)  # threshold 0.6 of 5: 3 survivors needed to unmask
    grid = LocalGrid(CLIENTS, {i: withholding_once(calls) for i in (0, 1, 2)})
    FederatedRun(config, tmp_path).run(grid)
    row = rows(tmp_path)[-1]
    assert row["attempts"] == 2 and row["clients_aggregated"] == CLIENTS


def test_a_round_that_never_reaches_the_threshold_fails_after_its_retries(tiny_bert_dir, tmp_path):
    config = secure_config(tiny_bert_dir, **{"server.max_retries": 1})
    grid = LocalGrid(CLIENTS, {i: withholding for i in (0, 1, 2)})
    with pytest.raises(RoundFailed, match="in 2 attempts"):
        FederatedRun(config, tmp_path).run(grid)


def test_dp_clips_on_the_clients_and_noises_the_unmasked_sum(tiny_bert_dir, tmp_path, masked):
    """With zero noise, secure dp(ffa) equals plain dp(ffa) over the same updates."""
    options = {"strategy.name": "'dp'", "strategy.inner": "'ffa'", "strategy.clip_norm": CLIP}
    config = secure_config(tiny_bert_dir, **options, **{"strategy.noise_multiplier": 0.0})
    run = FederatedRun(config, tmp_path)
    run.run(LocalGrid(CLIENTS))
    row = rows(tmp_path)[-1]
    assert row["epsilon"] > 0 and "clipped_fraction" not in row  # the server cannot see norms
    reference = DifferentialPrivacy(CLIENTS, CLIENTS, inner="ffa", clip_norm=CLIP, noise_multiplier=0.0)
    plain = reference.aggregate(1, masked.received, list(masked.updates.values()))
    clipper = DeltaClipper("test", masked.received, trains_A=False)
    assert max(clipper.measure(u) for u in masked.updates.values()) > CLIP  # clipping is tested
    assert max_difference(run.state, plain) <= FixedPoint().max_error + 1e-6


def test_strategies_that_need_individual_factors_refuse_secure_mode(tiny_bert_dir, tmp_path):
    for name in ("stacking", "fedex", "vcma", "median", "trimmed_mean", "clip"):
        options = {"strategy.clip_norm": 1.0} if name == "clip" else {}
        config = secure_config(tiny_bert_dir, **{"strategy.name": f"'{name}'"}, **options)
        with pytest.raises(SecureModeError, match=f"strategy '{name}' needs each client's factors"):
            FederatedRun(config, tmp_path / name)


def test_configurations_secure_mode_cannot_run_are_refused(tiny_bert_dir):
    with pytest.raises(ConfigError, match="overflows the 64-bit ring"):
        secure_config(tiny_bert_dir, **{"secure.fraction_bits": 48})
    with pytest.raises(ConfigError, match="unset lora.client_ranks"):
        secure_config(tiny_bert_dir, **{"lora.client_ranks": "[2, 4]"})
    with pytest.raises(ConfigError, match="set train.compression = 'none'"):
        secure_config(tiny_bert_dir, **{"train.compression": "'int8'"})


class ProbingGrid(LocalGrid):
    """Before delivering the first unmask request, sends the same client a forged one (a survivor
    also listed as a dropout: both of its shares would unmask it); after, replays the real one."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes)
        self.refusals: list[str | None] = []

    def _handle(self, msg: Message) -> Message | None:
        if msg.metadata.message_type != UNMASK or self.refusals:
            return super()._handle(msg)
        request = UnmaskRequest.from_content(msg.content)
        forged = replace(request, dropouts=[*request.dropouts, request.survivors[0]])
        self.refusals.append(self._probe(msg, forged))
        reply = super()._handle(msg)
        self.refusals.append(self._probe(msg, request))
        return reply

    def _probe(self, msg: Message, request: UnmaskRequest) -> str | None:
        probe = Message(request.to_content(), dst_node_id=msg.metadata.dst_node_id, message_type=UNMASK)
        reply = super()._handle(probe)
        return reply.error.reason if reply.has_error() else None


def test_a_client_refuses_forged_and_repeated_unmask_requests(tiny_bert_dir, tmp_path):
    grid = ProbingGrid(CLIENTS)
    FederatedRun(secure_config(tiny_bert_dir), tmp_path).run(grid)
    forged, replayed = grid.refusals
    assert forged is not None and "both a survivor and a dropout" in forged
    assert replayed is not None and "no secure aggregation session" in replayed
    assert rows(tmp_path)[-1]["clients_aggregated"] == CLIENTS  # the real request was answered


@pytest.mark.slow
def test_quickstart_simulation_with_secure_aggregation(tmp_path):
    """``fedpeft simulate`` through Flower's Ray engine: the secure stages run between real
    simulated nodes (their Context.state keeps each node's secrets between messages)."""
    run_dir = tmp_path / "run"
    overrides = ["server.secure_aggregation=true", "run.rounds=2", "data.demo_train_size=800"]
    simulate_cli("simulations/quickstart.toml", run_dir, [*overrides, "data.demo_test_size=200"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clients_dropped"] == 0
    assert summary["final_eval_accuracy"] >= summary["initial_eval_accuracy"] + 0.2
    for row in rows(run_dir)[1:]:
        assert row["clients_aggregated"] == 4 and row["attempts"] == 1
        assert all(reply["train_loss"] is None for reply in row["replies"])
