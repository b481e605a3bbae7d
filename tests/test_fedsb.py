"""Fed-SB: the two initialisation rounds (a randomized SVD of the clients' mean gradient), the exact
average of the LoRA-SB cores, the core on peft's layers, and what travels."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedpeft.cli import main as cli_main
from fedpeft.demo_data import LABELS, generate
from fedpeft.export import combined_factors
from fedpeft.lora import AdapterHost
from fedpeft.lora_sb import first_step_frame, gradient_sketch
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from fedpeft.testing import LocalGrid
from fedpeft.training import Encoded, train
from fedpeft.wire import decode_state, decode_update, encode_state, encode_update, unpack_tensors
from server.checkpoint import load_checkpoint, save_checkpoint
from server.loop import FederatedRun, RoundFailed
from strategies import FedSB, StrategyError, create_strategy
from strategies.fedsb import CORE, PROJECT, RANGE, fedsb_stage, load_frame, save_frame
from tests.factories import SHAPES, extras, factors, metrics_rows, small_config
from tests.test_secagg_rounds import CLIENTS, secure_config

RANK = 3


def reply(factors: dict[str, AdapterFactors], n: int, seed: int) -> ClientUpdate:
    return ClientUpdate(factors, extras(0), n, round=1, rank=RANK, alpha=6.0, client_id=str(seed))


def low_rank_gradients(seed: int) -> dict[str, torch.Tensor]:
    """A gradient of rank ``RANK`` per module, so a rank-RANK sketch captures it whole."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(d_out, RANK, generator=gen) @ torch.randn(RANK, d_in, generator=gen)
        for name, (d_out, d_in) in SHAPES.items()
    }


def initialise(gradients: list[dict[str, torch.Tensor]], sizes: list[int]) -> GlobalState:
    """Run the range and project rounds of ``FedSB`` over clients with these gradients."""
    strategy = FedSB()
    state = GlobalState(adapter=factors(RANK, 7, scale=2.0), extras=extras(0))
    for stage in (RANGE, PROJECT):
        assert fedsb_stage(state) == stage and strategy.client_instructions(1, state).init_gradient == stage
        replies = [
            reply(gradient_sketch(state.adapter, g, stage), n, k)
            for k, (g, n) in enumerate(zip(gradients, sizes, strict=True))
        ]
        state = strategy.aggregate(1, state, replies)
    return state


def test_the_two_initialisation_rounds_find_the_top_singular_subspace_of_the_mean_gradient():
    sizes = [10, 30]
    # two clients whose gradients share a rank-RANK mean: the weighted mean is what must be found
    common = low_rank_gradients(1)
    own = [{n: g * (1 + k) for n, g in common.items()} for k in range(2)]
    state = initialise(own, sizes)
    assert fedsb_stage(state) == CORE
    mean = {n: sum(g[n] * s for g, s in zip(own, sizes, strict=True)) / sum(sizes) for n in common}
    for name, f in state.adapter.items():
        assert torch.allclose(f.B.T @ f.B, torch.eye(RANK), atol=1e-5)  # orthonormal columns
        assert torch.allclose(f.A @ f.A.T, torch.eye(RANK), atol=1e-5)  # orthonormal rows
        assert torch.equal(f.R, torch.zeros(RANK, RANK))  # training starts at the base model
        projected = f.B @ (f.B.T @ mean[name] @ f.A.T) @ f.A
        assert torch.allclose(projected, mean[name], atol=1e-4)  # B and A span the mean gradient


def test_averaging_the_cores_is_exact_and_sends_only_the_cores_and_extras():
    state = initialise([low_rank_gradients(2)], [5])
    gen = torch.Generator().manual_seed(3)
    updates = []
    for k, n in enumerate((4, 12, 20)):
        trained = {
            name: AdapterFactors(A=f.A, B=f.B, scale=f.scale, R=torch.randn(RANK, RANK, generator=gen))
            for name, f in state.adapter.items()
        }
        updates.append(reply(trained, n, k))
    plan = FedSB().client_instructions(3, state)
    assert not (plan.train_lora_A or plan.send_lora_A or plan.train_lora_B or plan.init_gradient)
    result = FedSB().aggregate(3, state, updates)
    total = sum(u.num_examples for u in updates)
    for name, f in result.adapter.items():
        expected = sum(u.factors[name].delta() * u.num_examples for u in updates) / total
        assert torch.allclose(f.delta(), expected, atol=1e-5)
        assert torch.equal(f.A, state.adapter[name].A) and torch.equal(f.B, state.adapter[name].B)


def test_a_core_reply_carries_only_the_cores_and_decodes_against_the_frozen_factors():
    state = initialise([low_rank_gradients(4)], [5])
    trained = {
        n: AdapterFactors(f.A, f.B, f.scale, R=torch.randn(RANK, RANK)) for n, f in state.adapter.items()
    }
    content = encode_update(reply(trained, 5, 0), send_A=False, send_B=False)
    sent = unpack_tensors(content["update"])
    assert {key.rsplit("/", 1)[-1] for key in sent if key.startswith("lora/")} == {"R"}
    back = decode_update(content, frozen=state.adapter)
    for name, f in back.factors.items():
        assert torch.equal(f.R, trained[name].R) and torch.equal(f.A, state.adapter[name].A)
    again = decode_state(encode_state(state))
    assert all(torch.equal(again.adapter[n].R, f.R) for n, f in state.adapter.items())


def test_the_checkpoint_and_the_export_keep_the_cores(tmp_path):
    state = initialise([low_rank_gradients(5)], [5])
    for f in state.adapter.values():
        f.R = torch.randn(RANK, RANK)
    save_checkpoint(tmp_path, state, rng_state=None)
    loaded = load_checkpoint(tmp_path).state
    for name, f in state.adapter.items():
        assert torch.equal(loaded.adapter[name].R, f.R)
        A, B = combined_factors(state)[name]
        assert torch.allclose(B @ A, f.delta(), atol=1e-5)  # a standard LoRA pair: B' = s B R


def test_the_core_on_peft_layers_computes_s_B_R_A_and_is_all_that_trains_with_the_head(tiny_bert_dir):
    lora = small_config(tiny_bert_dir).lora
    host = AdapterHost(load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), 2, lora, 0, 2)))
    factors_, head = host.read_update()
    gen = torch.Generator().manual_seed(0)
    cored = {
        n: AdapterFactors(
            f.A, torch.randn(f.B.shape, generator=gen), f.scale, R=torch.randn(2, 2, generator=gen)
        )
        for n, f in factors_.items()
    }
    host.load_state(GlobalState(adapter=cored, extras=head), init_seed=0)
    name, layer = next(iter(host.layers.items()))
    x = torch.randn(3, layer.get_base_layer().in_features)
    expected = layer.get_base_layer()(x) + x @ cored[name].delta().T
    assert torch.allclose(layer(x), expected, atol=1e-5)

    data = Encoded([[101, 7 + i, 102] for i in range(16)], [i % 2 for i in range(16)])
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    train(
        host.model,
        tokenizer,
        data,
        steps=3,
        batch_size=4,
        lr=1e-2,
        weight_decay=0.0,
        seed=0,
        train_lora_A=False,
        train_lora_B=False,
    )
    after, head_after = host.read_update()
    for n, f in after.items():
        assert torch.equal(f.A, cored[n].A) and torch.equal(f.B, cored[n].B)
        assert not torch.equal(f.R, cored[n].R)
    assert any(not torch.equal(head_after[k], t) for k, t in head.items())
    host.load_state(GlobalState(adapter=factors_, extras=head), init_seed=0)  # a state without cores
    assert all(f.R is None for f in host.read_update()[0].values())
    assert torch.allclose(layer(x), layer.get_base_layer()(x) + x @ factors_[name].delta().T, atol=1e-5)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_fedsb_run_initialises_in_two_rounds_then_trains_the_cores(tiny_bert_dir, tmp_path, wrapped):
    options = {"strategy.name": "fedsb", "run.rounds": 4}
    if wrapped:  # under client-level DP: every round, the initialisation too, clipped and noised
        options |= {
            "strategy.name": "dp",
            "strategy.inner": "'fedsb'",
            "strategy.clients_per_round": 3,
            "strategy.noise_multiplier": 0.1,
            "strategy.clip_norm": 10.0,
        }
    run = FederatedRun(small_config(tiny_bert_dir, **options), tmp_path)
    run.run(LocalGrid(3))
    rows = metrics_rows(tmp_path)[1:]
    assert len(rows) == 4 and fedsb_stage(run.state) == CORE
    if not wrapped:  # (dp logs nothing per client, bytes included)
        up = [row["bytes_up"] for row in rows]
        assert up[3] < min(up[0], up[1])  # cores (r x r) and the head, against B or A and the head
    for f in run.state.adapter.values():
        assert f.R is not None and f.R.any()  # rounds 3 and 4 trained the cores
        assert torch.allclose(f.B.T @ f.B, torch.eye(f.rank), atol=1e-4)


def replied(row: dict) -> set[str]:
    return {reply["client"] for reply in row["replies"]}


def test_the_project_round_goes_to_the_clients_of_the_range_round_across_a_resume(tiny_bert_dir, tmp_path):
    """Q spans the range of the range round's clients' mean gradient: projecting another sample's
    mean onto it would capture that mean only as far as the two agree."""
    options = {
        "strategy.name": "fedsb",
        "data.num_clients": 6,
        "server.fraction": 0.5,
        "server.min_clients": 3,
    }
    FederatedRun(small_config(tiny_bert_dir, **options, **{"run.rounds": 1}), tmp_path).run(LocalGrid(6))
    resumed = FederatedRun(small_config(tiny_bert_dir, **options, **{"run.rounds": 4}), tmp_path, resume=True)
    resumed.run(LocalGrid(6))
    rows = metrics_rows(tmp_path)[1:]
    assert [len(replied(row)) for row in rows] == [3, 3, 3, 3]
    assert replied(rows[1]) == replied(rows[0])  # project, after the resume, to the range round's clients
    assert {frozenset(replied(row)) for row in rows[1:]} != {frozenset(replied(rows[0]))}  # then sampled


def test_a_round_for_the_last_rounds_clients_takes_those_connected_and_fails_without_any(
    tiny_bert_dir, tmp_path
):
    run = FederatedRun(small_config(tiny_bert_dir, **{"server.connect_timeout": 0.1}), tmp_path)
    grid = LocalGrid(3)
    run.last_clients = ["partition-2", "gone", "partition-0"]
    assert [run.identities[n] for n in run._previous_nodes(grid, 2)] == ["partition-2", "partition-0"]
    run.last_clients = ["gone"]
    with pytest.raises(RoundFailed, match="must go to the clients of round 1 .* none is connected"):
        run._previous_nodes(grid, 2)


def test_dp_draws_a_fresh_sample_for_the_project_round():
    state = GlobalState(adapter=factors(RANK, 7, scale=2.0), extras=extras(0))
    for f in state.adapter.values():
        f.A.zero_()  # after the range round
    assert FedSB().client_instructions(2, state).same_clients
    private = create_strategy("dp", {"inner": "fedsb", "noise_multiplier": 1.0, "clip_norm": 1.0},
                              {"clients_per_round": 3, "num_clients": 6})  # fmt: skip
    plan = private.client_instructions(2, state)
    assert plan.init_gradient == PROJECT and not plan.same_clients


def test_fedsb_refuses_clients_without_the_shared_adapter():
    with pytest.raises(Exception, match="shared initial adapter"):
        create_strategy("fedsb").aggregate(1, GlobalState(), [reply(factors(RANK, 0), 5, 0)])


def test_a_fedsb_run_under_secure_aggregation_reaches_the_cores(tiny_bert_dir, tmp_path):
    config = secure_config(tiny_bert_dir, **{"strategy.name": "fedsb", "run.rounds": 3})
    run = FederatedRun(config, tmp_path)
    run.run(LocalGrid(CLIENTS))
    attempts = [row["attempts"] for row in metrics_rows(tmp_path) if "attempts" in row]
    assert fedsb_stage(run.state) == CORE and attempts == [1, 1, 1]
    assert all(f.R.any() for f in run.state.adapter.values())


def test_a_random_frame_trains_the_cores_from_round_one_and_is_seeded(tiny_bert_dir, tmp_path):
    initial = GlobalState(adapter=factors(RANK, 7, scale=2.0), extras=extras(0))
    strategy = FedSB(init="random")
    frame = strategy.initial_state(initial, seed=3)
    assert fedsb_stage(frame) == CORE and strategy.client_instructions(1, frame).init_gradient == ""
    for name, f in frame.adapter.items():
        assert torch.allclose(f.A @ f.A.T, torch.eye(RANK), atol=1e-5)
        assert torch.allclose(f.B.T @ f.B, torch.eye(RANK), atol=1e-5)
        assert not f.R.any() and f.scale == initial.adapter[name].scale
        assert torch.equal(f.B, strategy.initial_state(initial, seed=3).adapter[name].B)
        assert not torch.equal(f.B, strategy.initial_state(initial, seed=4).adapter[name].B)
    assert FedSB().initial_state(initial, seed=3) is initial  # the gradient init changes nothing yet
    with pytest.raises(StrategyError, match="init must be one of gradient, random"):
        FedSB(init="svd")
    private = {
        "strategy.name": "dp",
        "strategy.inner": "'fedsb'",
        "strategy.inner_options": "{init = 'random'}",
    }
    run = FederatedRun(small_config(tiny_bert_dir, **private, **{"strategy.clip_norm": 10.0}), tmp_path)
    run.run(LocalGrid(3))
    assert fedsb_stage(run.state) == CORE and all(f.R.any() for f in run.state.adapter.values())
    assert run.strategy.accountant.rounds == 2  # both rounds trained the cores


def test_the_first_step_frame_holds_the_top_singular_subspace_of_minus_sign_g():
    gradients = low_rank_gradients(5)
    frame = first_step_frame(gradients, RANK)
    for name, g in gradients.items():
        A, B = frame[name]
        assert torch.allclose(A @ A.T, torch.eye(RANK), atol=1e-5)
        assert torch.allclose(B.T @ B, torch.eye(RANK), atol=1e-5)
        step = -torch.sign(g.double())
        top = torch.linalg.svdvals(step)[:RANK]
        captured = torch.linalg.svdvals(B.double().T @ step @ A.double().T)  # no other frame holds more
        assert torch.allclose(captured, top, rtol=1e-5)


def test_a_public_frame_is_read_from_its_file_and_checked_against_the_run(tmp_path):
    initial = GlobalState(adapter=factors(RANK, 7, scale=2.0), extras=extras(0))
    path = tmp_path / "frame.safetensors"
    save_frame(path, first_step_frame(low_rank_gradients(5), RANK), {"rows": "3"})
    state = FedSB(init="public", frame=str(path)).initial_state(initial, seed=3)
    assert fedsb_stage(state) == CORE
    for name, (A, B) in load_frame(path).items():
        f = state.adapter[name]
        assert torch.equal(f.A, A) and torch.equal(f.B, B) and not f.R.any()
        assert f.scale == initial.adapter[name].scale
    with pytest.raises(StrategyError, match="goes with init = 'public'"):
        FedSB(init="public")
    with pytest.raises(StrategyError, match="goes with init = 'public'"):
        FedSB(frame=str(path))
    with pytest.raises(StrategyError, match="does not exist; write it with `fedpeft frame`"):
        FedSB(init="public", frame=str(tmp_path / "none.safetensors"))
    other = tmp_path / "rank1.safetensors"
    save_frame(other, first_step_frame(low_rank_gradients(5), 1), {})
    with pytest.raises(StrategyError, match="at rank 1"):
        FedSB(init="public", frame=str(other)).initial_state(initial, seed=3)
    (tmp_path / "junk.safetensors").write_text("not a frame")
    with pytest.raises(StrategyError, match="is not a frame `fedpeft frame` wrote"):
        FedSB(init="public", frame=str(tmp_path / "junk.safetensors")).initial_state(initial, seed=3)


def test_fedpeft_frame_writes_a_frame_a_private_run_trains_its_cores_in(tiny_bert_dir, tmp_path, capsys):
    rows = generate(40, seed=11)
    public = tmp_path / "public.csv"
    labels = [LABELS[y] for y in rows["label"]]
    pd.DataFrame({"text": rows["text"], "label": labels}).to_csv(public, index=False)
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f'[model]\nname = "{tiny_bert_dir}"\n[lora]\nrank = 2\nalpha = 4.0\n'
        "[data]\nnum_clients = 3\ndemo_train_size = 120\ndemo_test_size = 40\nmin_partition_size = 5\n"
    )
    out = tmp_path / "frame.safetensors"
    assert cli_main(["frame", str(config_file), "--data", str(public), "--out", str(out)]) == 0
    assert "from 40 public rows" in capsys.readouterr().out
    frame = load_frame(out)
    private = {
        "strategy.name": "dp",
        "strategy.inner": "'fedsb'",
        "strategy.inner_options": f"{{init = 'public', frame = '{out}'}}",
        "strategy.clip_norm": 10.0,
    }
    run = FederatedRun(small_config(tiny_bert_dir, **private), tmp_path / "run")
    run.run(LocalGrid(3))
    assert run.strategy.accountant.rounds == run.config.run.rounds  # the frame cost no round
    for name, (A, B) in frame.items():
        f = run.state.adapter[name]
        assert torch.equal(f.A, A) and torch.equal(f.B, B) and f.R.any()  # frozen frame, trained core
