"""Wire compression: codec error bounds, delta coding through the wire, error feedback keeping the
cumulative error bounded over rounds, and a compressed federation through the server loop."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.compression import ErrorFeedback, pack, unpack
from fedpeft.config import ConfigError, load_config
from fedpeft.testing import LocalGrid
from fedpeft.wire import WireError, decode_update, encode_update, record_nbytes
from server.loop import FederatedRun
from tests import factories
from tests.factories import small_config


def test_fp16_round_trip_is_within_half_precision():
    x = torch.randn(16, 300) * 0.01
    assert unpack(pack(x, "fp16", 0)).dtype == torch.float32
    assert ((unpack(pack(x, "fp16", 0)) - x).abs() <= x.abs() * 2**-11 + 2**-24).all()


@pytest.mark.parametrize("rank_dim", [0, 1])
def test_int8_error_is_at_most_half_a_step_of_each_rank_components_scale(rank_dim):
    x = torch.randn(8, 200) if rank_dim == 0 else torch.randn(200, 8)
    x[..., 0] *= 100  # one large value must not coarsen the other rank components
    packed = pack(x, "int8", rank_dim)
    assert packed.values.dtype == torch.int8 and packed.scale.numel() == 8
    step = x.abs().amax(dim=1 - rank_dim, keepdim=True) / 127
    assert ((unpack(packed) - x).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(unpack(pack(torch.zeros(3, 4), "int8", 0)), torch.zeros(3, 4))


def test_error_feedback_keeps_the_cumulative_error_bounded():
    """The same small delta every round: without feedback the int8 error adds up round after
    round; with it, the sum of what was sent stays within one quantization step of the truth."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 64, generator=gen) * 1e-3
    feedback = ErrorFeedback()
    sent_plain, sent_fed = torch.zeros_like(delta), torch.zeros_like(delta)
    step = float(delta.abs().max()) / 127
    for rnd in range(1, 51):
        sent_plain += unpack(pack(delta, "int8", 0))
        sent_fed += unpack(feedback.pack("A", delta, "int8", 0))
        assert float((sent_fed - rnd * delta).abs().max()) <= 1.01 * step  # bounded every round
    assert float((sent_plain - 50 * delta).abs().max()) > 10 * step  # grows without feedback


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_compressed_update_round_trips_as_a_delta_from_the_global_adapter(codec):
    shapes = {"m.q": (384, 384), "m.v": (384, 384)}  # MiniLM's query and value
    update = factories.update(rank=4, seed=1, num_examples=3)
    update.factors = factories.factors(rank=4, seed=2, scale=4.0, shapes=shapes)
    reference = factories.factors(rank=4, seed=1, scale=4.0, shapes=shapes)
    reference_extras = factories.extras(seed=2)
    for name, f in update.factors.items():  # a trained update: the reference plus a small delta
        f.A, f.B = reference[name].A + 1e-3 * f.A, reference[name].B + 1e-3 * f.B
    update.extras = {k: t + 1e-3 * update.extras[k] for k, t in reference_extras.items()}
    plain = record_nbytes(encode_update(update))
    content = encode_update(
        update,
        compression=codec,
        reference=reference,
        feedback=ErrorFeedback(),
        reference_extras=reference_extras,
    )
    back = decode_update(content, frozen=reference, frozen_extras=reference_extras)
    bound = 1e-3 * 5 / 127 if codec == "int8" else 1e-6
    for name, f in update.factors.items():
        for part in ("A", "B"):
            assert float((getattr(back.factors[name], part) - getattr(f, part)).abs().max()) <= bound
    for name, t in update.extras.items():  # the head travels compressed too, as its delta
        assert float((back.extras[name] - t).abs().max()) <= bound
    # one header per message: int8 is a quarter of fp32 but for the scales and the manifest
    assert record_nbytes(content) < plain * (0.26 if codec == "int8" else 0.51)


def test_int8_extras_without_a_reference_travel_as_values():
    update = factories.update(rank=4, seed=1, num_examples=3)
    content = encode_update(update, compression="int8")
    back = decode_update(content)
    for name, t in update.extras.items():
        step = t.abs().amax(dim=-1, keepdim=True) / 127 if t.ndim == 2 else t.abs().max() / 127
        assert ((back.extras[name] - t).abs() <= step / 2 + 1e-7).all()


def test_a_delta_coded_reply_needs_the_global_adapter():
    update = factories.update(rank=4, seed=1, num_examples=3)
    content = encode_update(update, compression="int8", reference=factories.factors(rank=4, seed=2))
    with pytest.raises(WireError, match="relative to a global adapter"):
        decode_update(content, frozen=None)


def test_config_refuses_an_unknown_compression():
    with pytest.raises(ConfigError, match="train.compression must be one of none, fp16, int8"):
        load_config(None, ["train.compression='int4'"])


def test_an_int8_federation_runs_and_sends_fewer_bytes(tiny_bert_dir, tmp_path):
    up = {}
    for codec in ("none", "int8"):
        config = small_config(tiny_bert_dir, **{"train.compression": f"'{codec}'"})
        summary = FederatedRun(config, tmp_path / codec).run(LocalGrid(3))
        up[codec] = summary["bytes_up"]
        rows = [json.loads(line) for line in (tmp_path / codec / "metrics.jsonl").read_text().splitlines()]
        assert all(r["clients_aggregated"] == 3 for r in rows[1:])
    assert up["int8"] < up["none"]
