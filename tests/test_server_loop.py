"""The server round loop against real ClientApp code in-process: validation, drops, resume."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import train
from fedpeft.testing import LocalGrid
from fedpeft.wire import decode_update, encode_update
from server.loop import FederatedRun, RoundFailed, RunDirError
from tests.factories import small_config


def tampered(edit):
    """A client that trains honestly, then edits its reply's decoded update."""

    def handler(msg: Message, context) -> Message:
        reply = train(msg, context)
        update = decode_update(reply.content)
        edit(update)
        return Message(encode_update(update), reply_to=msg)

    return handler


def nan_factors(update):
    first = next(iter(update.factors.values()))
    first.A[0, 0] = float("nan")


def wrong_shape(update):
    first = next(iter(update.factors.values()))
    first.B = torch.zeros(first.B.shape[0] + 1, first.B.shape[1])


def failing(msg, context):
    raise RuntimeError("disk full")


def test_invalid_replies_are_dropped_with_reasons(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"server.min_replies": 1})
    grid = LocalGrid(3, {1: tampered(nan_factors), 2: tampered(wrong_shape)})
    summary = FederatedRun(config, tmp_path).run(grid)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        reasons = {d["client"]: d["reason"] for d in row["dropped"]}
        assert row["clients_aggregated"] == 1
        assert "NaN or Inf" in reasons["partition-1"]
        assert "shapes" in reasons["partition-2"] or "differ" in reasons["partition-2"]
        assert row["bytes_up"] > 0 and row["train_loss"] > 0
    assert summary["clients_dropped"] == 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "metrics.png").is_file()


def test_a_new_run_refuses_a_used_run_directory(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"run.rounds": 1})
    FederatedRun(config, tmp_path).run(LocalGrid(3))
    with pytest.raises(RunDirError, match="already holds a run; resume it with --resume"):
        FederatedRun(config, tmp_path)


def test_round_is_retried_then_fails_clearly(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"server.max_retries": 1, "run.rounds": 1})
    grid = LocalGrid(3, {0: failing})
    with pytest.raises(RoundFailed, match="round 1 got fewer than 3 valid replies in 2 attempts"):
        FederatedRun(config, tmp_path).run(grid)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"server.fraction": 0.5, "server.min_clients": 2, "run.rounds": 3})
    straight = FederatedRun(config, tmp_path / "straight")
    straight.run(LocalGrid(3))

    short = small_config(tiny_bert_dir, **{"server.fraction": 0.5, "server.min_clients": 2, "run.rounds": 1})
    FederatedRun(short, tmp_path / "resumed").run(LocalGrid(3))
    resumed = FederatedRun(config, tmp_path / "resumed", resume=True)
    resumed.run(LocalGrid(3))

    for name, f in straight.state.adapter.items():
        assert torch.equal(resumed.state.adapter[name].A, f.A)
        assert torch.equal(resumed.state.adapter[name].B, f.B)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]


def test_sampling_does_not_depend_on_flower_node_ids(tiny_bert_dir, tmp_path):
    """Flower numbers nodes differently each run; clients are sampled by their stable identity."""
    config = small_config(
        tiny_bert_dir, **{"server.fraction": 0.34, "server.min_clients": 1, "run.rounds": 2}
    )
    runs = []
    for node_ids in ([5, 12, 19], [900, 31, 4]):  # partition 0 first, then last, in node-id order
        run = FederatedRun(config, tmp_path / str(node_ids[0]))
        run.run(LocalGrid(3, node_ids=node_ids))
        runs.append(run)
    for name, f in runs[0].state.adapter.items():
        assert torch.equal(runs[1].state.adapter[name].B, f.B)


def test_strategies_see_stable_client_ids_not_node_ids(tiny_bert_dir, tmp_path):
    """A strategy that keeps per-client state (FedAU) needs ids that survive reconnects: the
    updates carry the client's stable id, whatever Flower numbers its node."""
    seen: list[str] = []
    config = small_config(tiny_bert_dir, **{"run.rounds": 1, "strategy.name": "fedex"})  # a batch rule
    run = FederatedRun(config, tmp_path)
    aggregate = run.strategy.aggregate
    run.strategy.aggregate = lambda rnd, state, updates: (
        seen.extend(u.client_id for u in updates) or aggregate(rnd, state, updates)
    )
    run.run(LocalGrid(3, node_ids=[900, 31, 4]))
    assert sorted(seen) == ["partition-0", "partition-1", "partition-2"]
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {r["client"]: r["node"] for r in row["replies"]} == {
        "partition-0": "900",
        "partition-1": "31",
        "partition-2": "4",
    }


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("stacking", {"lora.client_ranks": "[1, 2, 4]"}),
        ("fedex", {}),
        ("vcma", {}),
        ("ffa", {}),
        ("fedau", {}),
        ("dp", {"strategy.inner": "'ffa'", "strategy.clip_norm": 0.5, "strategy.noise_multiplier": 0.1}),
    ],
)
def test_every_strategy_runs_through_the_server_loop(tiny_bert_dir, tmp_path, strategy, extra):
    config = small_config(tiny_bert_dir, **{"strategy.name": f"'{strategy}'", **extra})
    summary = FederatedRun(config, tmp_path).run(LocalGrid(3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2
    assert strategy == "dp" or all(r["clients_aggregated"] == 3 for r in rows[1:])  # dp logs no participation
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if strategy in ("stacking", "fedex"):
        assert rows[-1]["merged_rank"] > 0 and rows[-1]["discarded_energy"] < 1e-6
    if strategy == "dp":
        assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"]
        assert not {"clients_aggregated", "replies", "update_norms", "train_loss"} & set(rows[1])


def test_ffa_uploads_only_B(tiny_bert_dir, tmp_path):
    up = {}
    for strategy in ("fedavg", "ffa"):
        config = small_config(tiny_bert_dir, **{"strategy.name": f"'{strategy}'", "run.rounds": 1})
        FederatedRun(config, tmp_path / strategy).run(LocalGrid(3))
        up[strategy] = json.loads((tmp_path / strategy / "summary.json").read_text())["bytes_up"]
    # tiny BERT query/value are 32 x 32, so A and B are equal in size; the small head and each
    # array's npy header (~128 bytes, large next to these 256-byte factors) keep it above 0.5
    assert 0.45 < up["ffa"] / up["fedavg"] < 0.65


def test_a_frozen_head_is_not_sent_and_dp_leaves_it_unnoised(tiny_bert_dir, tmp_path):
    """train.freeze_head: clients send no head, and dp clips and noises the LoRA tensors only, so the
    released head is the shared init, as in a run without DP."""
    frozen = {"train.freeze_head": "true"}
    dp = {"strategy.name": "'dp'", "strategy.inner": "'ffa'", "strategy.noise_multiplier": 1.0, **frozen}
    states, up = {}, {}
    for name, options in {"plain": {}, "frozen": frozen, "dp": dp}.items():
        run = FederatedRun(small_config(tiny_bert_dir, **options, **{"run.rounds": 1}), tmp_path / name)
        run.run(LocalGrid(3))
        states[name] = run.state
        up[name] = json.loads((tmp_path / name / "summary.json").read_text())["bytes_up"]
    head_values = sum(t.numel() for t in states["plain"].extras.values())
    assert up["plain"] - up["frozen"] >= 3 * 4 * head_values  # three clients, no fp32 head each
    for name, head in states["frozen"].extras.items():
        assert torch.equal(states["dp"].extras[name], head)
        assert not torch.equal(states["plain"].extras[name], head)  # the head trains unless frozen
    assert any(not torch.equal(states["dp"].adapter[n].B, f.B) for n, f in states["frozen"].adapter.items())


def test_fedsb_inside_dp_with_a_frozen_head_trains_only_its_cores(tiny_bert_dir, tmp_path):
    """Fed-SB's two initialisation rounds and a training round under dp with train.freeze_head: the
    head is the shared init after all three, each a private round."""
    options = {
        "strategy.name": "'dp'",
        "strategy.inner": "'fedsb'",
        "strategy.noise_multiplier": 0.5,
        "train.freeze_head": "true",
        "run.rounds": 3,
    }
    run = FederatedRun(small_config(tiny_bert_dir, **options), tmp_path / "dp")
    run.run(LocalGrid(3))
    plain = FederatedRun(
        small_config(tiny_bert_dir, **{"train.freeze_head": "true", "run.rounds": 1}), tmp_path / "a"
    )
    plain.run(LocalGrid(3))
    for name, head in plain.state.extras.items():
        assert torch.equal(run.state.extras[name], head)
    assert all(f.R is not None for f in run.state.adapter.values())
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["epsilon"] for r in rows[1:]]
    assert len(epsilons) == 3 and epsilons == sorted(epsilons) and epsilons[0] > 0


def test_privacy_budget_ends_the_run_cleanly(tiny_bert_dir, tmp_path):
    options = {
        "strategy.name": "'dp'",
        "strategy.inner": "'ffa'",
        "strategy.noise_multiplier": 1.0,
        "strategy.epsilon_budget": 5.0,
        "run.rounds": 50,
    }
    summary = FederatedRun(small_config(tiny_bert_dir, **options), tmp_path).run(LocalGrid(3))
    assert "privacy budget" in summary["stopped"] and 1 <= summary["rounds"] < 50
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epsilon"] <= 5.0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_stacking_reports_energy_discarded_by_a_small_rank_cap(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"strategy.name": "'stacking'", "strategy.rank_cap": 1})
    FederatedRun(config, tmp_path).run(LocalGrid(3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["merged_rank"] == 1 and rows[-1]["discarded_energy"] > 0


def test_a_client_that_never_replies_is_dropped_at_the_timeout(tiny_bert_dir, tmp_path):
    config = small_config(
        tiny_bert_dir, **{"server.min_replies": 2, "server.round_timeout": 0.3, "run.rounds": 1}
    )
    FederatedRun(config, tmp_path).run(LocalGrid(3, {2: lambda msg, context: None}))
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["clients_aggregated"] == 2
    [drop] = row["dropped"]
    assert drop["client"] == "partition-2" and drop["reason"] == "no reply within 0.3s"


def test_a_batch_strategy_sees_replies_in_client_id_order_whatever_their_arrival(tiny_bert_dir, tmp_path):
    """Arrival order varies between runs (and between a run and its resumption); a batch rule's
    result must not, so replies reach it sorted by stable client id."""
    orders = []
    for node_ids in ([31, 900, 4], [4, 31, 900]):  # replies arrive in the sampled order
        config = small_config(tiny_bert_dir, **{"run.rounds": 1, "strategy.name": "fedex"})
        run = FederatedRun(config, tmp_path / str(node_ids[0]))
        aggregate = run.strategy.aggregate
        run.strategy.aggregate = lambda rnd, state, updates, aggregate=aggregate: (
            orders.append([u.client_id for u in updates]) or aggregate(rnd, state, updates)
        )
        run.run(LocalGrid(3, node_ids=node_ids))
    assert orders == [["partition-0", "partition-1", "partition-2"]] * 2


def test_too_few_clients_end_the_run_after_server_connect_timeout(tiny_bert_dir, tmp_path):
    config = small_config(tiny_bert_dir, **{"server.min_clients": 3, "server.connect_timeout": 0.5})
    with pytest.raises(RoundFailed, match=r"only 2 clients connected and identified after 0.5s"):
        FederatedRun(config, tmp_path).run(LocalGrid(2))


def test_the_drops_of_a_retried_attempt_are_recorded(tiny_bert_dir, tmp_path):
    calls = []

    def fails_once(msg, context):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("flaky")
        return train(msg, context)

    config = small_config(tiny_bert_dir, **{"server.max_retries": 1, "run.rounds": 1})
    summary = FederatedRun(config, tmp_path).run(LocalGrid(3, {0: fails_once}))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["attempts"] == 2 and row["clients_aggregated"] == 3
    [drop] = row["dropped"]
    assert drop["client"] == "partition-0" and drop["attempt"] == 1 and "RuntimeError" in drop["reason"]
    assert summary["clients_dropped"] == 1


@pytest.mark.parametrize(
    ("sampled", "so_far"),
    [(4, ["3/4 clients replied", "4/4 clients replied"]), (None, ["running", "running"])],
)
def test_a_round_in_progress_prints_plain_lines_when_not_on_a_terminal(monkeypatch, sampled, so_far):
    """None: a private run, whose sample size and replies are not released."""
    from io import StringIO

    from rich.console import Console

    from server.report import RoundProgress

    out = StringIO()
    console = Console(file=out, force_terminal=False)
    clock = iter([0.0, 5.0, 10.0, 31.0, 70.0])  # the start, then one reading per reply
    monkeypatch.setattr("server.report.time.monotonic", lambda: next(clock))
    with RoundProgress(console, 3, sampled) as progress:
        for _ in range(4):
            progress.reply()
    assert out.getvalue().splitlines() == [f"round 3: {so_far[0]}, 31s", f"round 3: {so_far[1]}, 70s"]


def test_compare_plots_runs_and_tables_their_final_figures(tiny_bert_dir, tmp_path):
    from fedpeft.cli import main

    for strategy in ("fedavg", "ffa"):
        config = small_config(tiny_bert_dir, **{"strategy.name": strategy, "run.rounds": 1})
        FederatedRun(config, tmp_path / strategy).run(LocalGrid(3))
    out = tmp_path / "both.png"
    assert main(["compare", str(tmp_path / "fedavg"), str(tmp_path / "ffa"), "--out", str(out)]) == 0
    assert out.is_file()
    from server.compare import compare

    table = compare([tmp_path / "fedavg", tmp_path / "ffa"], out).splitlines()
    assert table[0].startswith("| run | strategy | rounds | final accuracy |")
    assert [row.split(" | ")[1] for row in table[2:]] == ["fedavg", "ffa"]
    assert main(["compare", str(tmp_path), "--out", str(out)]) == 2  # not a run: one line


RESUMABLE = [
    ("fedavg", {}),
    ("ffa", {}),
    ("fedex", {}),
    ("vcma", {}),
    ("stacking", {"lora.client_ranks": "[1, 2, 2]"}),
    ("fedavgm", {}),
    ("fedadam", {}),
    ("fedau", {}),  # not fedsa: its personal Bs live on the clients, which a restart does not keep
    ("hetlora", {"lora.client_ranks": "[1, 2, 2]"}),
    ("flexlora", {"lora.client_ranks": "[1, 2, 2]"}),
    ("median", {}),
    ("trimmed_mean", {}),
    ("clip", {"strategy.clip_norm": 0.5}),
    (
        "dp",
        {
            "strategy.inner": "'fedavg'",
            "strategy.clip_norm": 0.5,
            "strategy.noise_multiplier": 0.5,
            "strategy.insecure_noise_seed": 3,
        },
    ),
]


@pytest.mark.parametrize(("strategy", "extra"), RESUMABLE, ids=[name for name, _ in RESUMABLE])
def test_every_strategy_resumes_to_the_bit(tiny_bert_dir, tmp_path, strategy, extra):
    """A run stopped after round 1 and resumed ends with the adapter, merged delta and head of an
    uninterrupted run, bit for bit (its state_dict, the sampling RNG and the client seeds carry over)."""
    options = {"strategy.name": f"'{strategy}'", "server.fraction": 0.67, "server.min_clients": 2, **extra}
    straight = FederatedRun(small_config(tiny_bert_dir, **options, **{"run.rounds": 2}), tmp_path / "a")
    straight.run(LocalGrid(3))
    FederatedRun(small_config(tiny_bert_dir, **options, **{"run.rounds": 1}), tmp_path / "b").run(
        LocalGrid(3)
    )
    resumed = FederatedRun(
        small_config(tiny_bert_dir, **options, **{"run.rounds": 2}), tmp_path / "b", resume=True
    )
    resumed.run(LocalGrid(3))
    a, b = straight.state, resumed.state
    assert (a.adapter is None) == (b.adapter is None)
    for name, f in (a.adapter or {}).items():
        assert torch.equal(b.adapter[name].A, f.A) and torch.equal(b.adapter[name].B, f.B)
    for name, d in a.merged.items():
        assert torch.equal(b.merged[name].U, d.U) and torch.equal(b.merged[name].V, d.V)
    for name, t in a.extras.items():
        assert torch.equal(b.extras[name], t)


def test_a_client_says_what_it_trained(tiny_bert_dir, tmp_path, capsys):
    FederatedRun(small_config(tiny_bert_dir, **{"run.rounds": 1}), tmp_path).run(LocalGrid(3))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round 1: trained")]
    assert len(lines) == 3 and all(" 2 steps on " in line and ", loss " in line for line in lines)


def test_tracking_sends_rounds_config_and_adapter_to_tensorboard_and_mlflow(tiny_bert_dir, tmp_path):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = {"run.rounds": 2, "tracking.tensorboard": "true", "tracking.mlflow_uri": "'local'"}
    config = small_config(tiny_bert_dir, **options)
    FederatedRun(config, tmp_path).run(LocalGrid(3))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_accuracy")] == [0, 1, 2]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run((tmp_path / "mlflow-run-id").read_text())
    assert run.data.params["run.rounds"] == "2" and "summary_final_eval_accuracy" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval_accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in artifacts and "adapter/README.md" in artifacts


def test_a_tracking_sink_without_its_library_is_one_line_before_any_round(
    tiny_bert_dir, tmp_path, monkeypatch
):
    import sys

    from server.tracking import TrackingError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    config = small_config(tiny_bert_dir, **{"tracking.mlflow_uri": "'local'"})
    with pytest.raises(TrackingError, match=r"needs MLflow: pip install 'fedpeft\[tracking\]'"):
        FederatedRun(config, tmp_path)


def test_a_client_that_reconnects_under_a_new_node_is_one_client(tiny_bert_dir, tmp_path):
    """A restarted client process is a new Flower node; its old node lingers in the SuperLink until
    Flower expires it. Only the newest node of a client id is sampled: one client, no drop."""
    config = small_config(
        tiny_bert_dir, **{"run.rounds": 2, "server.round_timeout": 0.3, "strategy.name": "fedex"}
    )
    grid = LocalGrid(3)
    run = FederatedRun(config, tmp_path)
    aggregate = run.strategy.aggregate

    def then_reconnect(rnd, state, updates):
        if rnd == 1:  # partition-0 restarts: a new node 2000, the old node silent from now on
            grid.nodes.append(2000)
            grid.contexts[2000] = Context(
                run_id=1, node_id=2000, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
            )
            grid.handlers[grid.nodes[0]] = lambda msg, context: None
        return aggregate(rnd, state, updates)

    run.strategy.aggregate = then_reconnect
    run.run(grid)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["clients_aggregated"] == 3 and row["dropped"] == []
    assert {r["client"]: r["node"] for r in row["replies"]}["partition-0"] == "2000"
