"""The wire codec: bitwise fp32 round trips, bf16 models, byte counts, malformed records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedpeft.config import LoraSection
from fedpeft.lora import extract_adapter
from fedpeft.models import ClassifierSpec, load_classifier
from fedpeft.state import ClientPlan, ClientUpdate, trained_tensors
from fedpeft.wire import (
    DecodeBuffer,
    RoundInstructions,
    WireError,
    decode_instructions,
    decode_state,
    decode_update,
    encode_state,
    encode_train_message,
    encode_update,
    pack_tensors,
    record_nbytes,
    unpack_tensors,
)
from tests import factories


def assert_same_factors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
        assert a[name].scale == b[name].scale


def test_state_round_trip_is_bitwise():
    state = factories.state()
    back = decode_state(encode_state(state))
    assert back.round == state.round
    assert_same_factors(back.adapter, state.adapter)
    for name, d in state.merged.items():
        assert torch.equal(back.merged[name].U, d.U) and torch.equal(back.merged[name].V, d.V)
    for name, t in state.extras.items():
        assert torch.equal(back.extras[name], t)


def test_fresh_state_has_no_adapter():
    assert decode_state(encode_state(factories.GlobalState())).adapter is None


def test_update_round_trip_is_bitwise():
    update = factories.update(rank=4, seed=1, num_examples=37, rnd=2)
    update.num_trained = 640
    back = decode_update(encode_update(update), client_id="node-9")
    assert_same_factors(back.factors, update.factors)
    assert (back.num_examples, back.num_trained, back.round, back.rank, back.alpha) == (37, 640, 2, 4, 16.0)
    assert back.metrics == update.metrics and back.client_id == "node-9"
    for name, t in update.extras.items():
        assert torch.equal(back.extras[name], t)


def test_bytes_are_the_tensor_payload():
    update = factories.update(rank=4, seed=1, num_examples=3)
    floats = sum(f.A.numel() + f.B.numel() for f in update.factors.values())
    floats += sum(t.numel() for t in update.extras.values())
    names = [f"lora/{m}/{p}" for m in update.factors for p in "AB"] + [f"extra/{n}" for n in update.extras]
    payload = record_nbytes(encode_update(update))
    # one manifest per message: per tensor its name, dtype, shape and scale axis (about 30 bytes)
    assert floats * 4 < payload < floats * 4 + sum(len(n) + 30 for n in names) + 16


def test_bf16_model_update_survives_the_wire(tiny_bert_dir):
    lora = LoraSection(rank=4, alpha=8.0, target_modules=["query", "value"])
    model = load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), 2, lora, 0)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    factors, extras = extract_adapter(model)
    assert all(f.A.dtype == torch.bfloat16 for f in factors.values())
    update = ClientUpdate(factors, extras, num_examples=5, round=1, rank=4, alpha=8.0)
    back = decode_update(encode_update(update))
    for name, f in factors.items():
        assert back.factors[name].A.dtype == torch.float32
        assert torch.equal(back.factors[name].A, f.A.float()) and torch.equal(
            back.factors[name].B, f.B.float()
        )
    for name, t in extras.items():
        assert torch.equal(back.extras[name], t.float())


def test_instructions_round_trip():
    from fedpeft.config import RunConfig

    base = RunConfig()
    config = base.client_config(data=base.data.replace(labels=["a", "b"]))
    content = encode_train_message(
        factories.GlobalState(),
        RoundInstructions(
            4,
            99,
            ClientPlan(False, False, weighting="uniform", train_extras=False, options={"mu": 0.1}),
            config,
        ),
    )
    back = decode_instructions(content)
    assert (back.round, back.init_seed, back.plan) == (
        4,
        99,
        ClientPlan(
            train_lora_A=False,
            send_lora_A=False,
            weighting="uniform",
            train_extras=False,
            options={"mu": 0.1},
        ),
    )
    assert not back.plan.send_extras
    assert back.client_config == config


@pytest.mark.parametrize("drop", ["update", "update-meta", "metrics"])
def test_missing_record_is_a_wire_error(drop):
    content = encode_update(factories.update(rank=2, seed=0, num_examples=3))
    del content[drop]
    with pytest.raises(WireError, match=drop):
        decode_update(content)


def test_half_a_factor_pair_is_a_wire_error():
    content = encode_update(factories.update(rank=2, seed=0, num_examples=3))
    tensors = unpack_tensors(content["update"], writable=True)
    del tensors["lora/layer.0.q/B"]
    content["update"] = pack_tensors(tensors)
    with pytest.raises(WireError, match="lacks"):
        decode_update(content)


def test_negative_example_count_is_a_wire_error():
    content = encode_update(factories.update(rank=2, seed=0, num_examples=3))
    content["metrics"]["num-examples"] = -1
    with pytest.raises(WireError, match="num-examples"):
        decode_update(content)


def test_empty_record_is_a_wire_error():
    with pytest.raises(WireError):
        decode_state(RecordDict())


def test_a_float32_reply_decodes_to_views_of_its_payload():
    update = factories.update(rank=4, seed=1, num_examples=3)
    content = encode_update(update)
    payload = content["update"]["tensors"].data
    start = np.frombuffer(payload, dtype=np.uint8).ctypes.data
    back = decode_update(content, into=DecodeBuffer())
    tensors = [t for f in back.factors.values() for t in (f.A, f.B)] + list(back.extras.values())
    assert all(start < t.data_ptr() < start + len(payload) for t in tensors)  # no copy
    assert_same_factors(back.factors, update.factors)


def test_a_decode_buffer_is_reused_and_decodes_bitwise():
    buffer = DecodeBuffer()
    reference = factories.factors(rank=4, seed=0)
    first = encode_update(factories.update(4, 1, 3), compression="fp16", reference=reference)
    pointer = decode_update(first, frozen=reference, into=buffer).factors["layer.0.q"].A.data_ptr()
    update = factories.update(rank=4, seed=2, num_examples=3)
    second = encode_update(update, compression="fp16", reference=reference)
    back = decode_update(second, frozen=reference, into=buffer)
    assert back.factors["layer.0.q"].A.data_ptr() == pointer  # same memory, no new allocation
    for name, f in update.factors.items():
        delta = (f.A - reference[name].A).to(torch.float16).float()
        assert torch.equal(back.factors[name].A, delta + reference[name].A)


@pytest.mark.parametrize("send_A", [True, False])
def test_a_float32_reply_decodes_whole_in_trained_tensor_order(send_A):
    update = factories.update(rank=4, seed=1, num_examples=3)
    back = decode_update(encode_update(update, send_A=send_A), frozen=update.factors)
    sent = trained_tensors(back.factors, back.extras, trains_A=send_A)
    assert back.flat is not None and back.flat.layout.names == tuple(sent)
    assert torch.equal(back.flat.span, torch.cat([t.reshape(-1) for t in sent.values()]))
    assert_same_factors(back.factors, update.factors)
    assert back.extras.keys() == update.extras.keys() != set()
    assert all(torch.equal(t, update.extras[n]) for n, t in back.extras.items())
    assert decode_update(encode_update(update, compression="fp16")).flat is None  # decoded into a buffer


def test_replies_in_one_layout_share_one_layout_object():
    first, second = (decode_update(encode_update(factories.update(4, seed, 3))) for seed in (1, 2))
    assert first.flat.layout is second.flat.layout  # what a fold compares, by identity


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), "2"])
def test_a_reply_whose_scale_is_not_a_positive_number_is_a_wire_error(scale):
    content = encode_update(factories.update(rank=2, seed=0, num_examples=3))
    modules = len(content["update-meta"]["scales"])
    content["update-meta"]["scales"] = [scale] * modules  # a list holds values of one type
    with pytest.raises(WireError, match="scale of layer.0.q in 'scales'"):
        decode_update(content)


def test_scales_equal_as_numbers_to_ones_checked_before_are_still_checked_for_type():
    content = encode_update(factories.update(rank=2, seed=0, num_examples=3))
    modules = len(content["update-meta"]["scales"])
    content["update-meta"]["scales"] = [1] * modules
    assert set(decode_update(content).scales().values()) == {1.0}  # checked once, then remembered
    content["update-meta"]["scales"] = [True] * modules  # == [1] * modules, and the same hash
    with pytest.raises(WireError, match="scale of layer.0.q in 'scales'"):
        decode_update(content)


@pytest.mark.parametrize("scales", [None, 2.0, [2.0]])
def test_a_reply_without_one_scale_per_module_is_a_wire_error(scales):
    content = encode_update(factories.update(rank=2, seed=0, num_examples=3))
    if scales is None:
        del content["update-meta"]["scales"]
    else:
        content["update-meta"]["scales"] = scales
    with pytest.raises(WireError, match="one LoRA scale per module"):
        decode_update(content)
