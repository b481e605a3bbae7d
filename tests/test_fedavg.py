"""FedAvg against a hand computation, its (documented) inexactness, and the strategy registry."""

from __future__ import annotations

import pytest
import torch

from strategies import FedAvg, StrategyError, available_strategies, create_strategy
from tests import factories


def test_fedavg_matches_hand_computation_with_unequal_counts():
    counts = [1, 2, 7]
    updates = [factories.update(rank=3, seed=s, num_examples=n) for s, n in enumerate(counts)]
    prior = factories.state()
    out = FedAvg().aggregate(4, prior, updates)

    for name in factories.SHAPES:
        hand_A = (
            1 * updates[0].factors[name].A + 2 * updates[1].factors[name].A + 7 * updates[2].factors[name].A
        ) / 10
        hand_B = (
            1 * updates[0].factors[name].B + 2 * updates[1].factors[name].B + 7 * updates[2].factors[name].B
        ) / 10
        torch.testing.assert_close(out.adapter[name].A, hand_A)
        torch.testing.assert_close(out.adapter[name].B, hand_B)
        assert out.adapter[name].A.shape == updates[0].factors[name].A.shape
        assert out.adapter[name].scale == updates[0].factors[name].scale
    hand_head = sum(n * u.extras["head.weight"] for n, u in zip(counts, updates, strict=True)) / 10
    torch.testing.assert_close(out.extras["head.weight"], hand_head)
    assert out.merged is prior.merged and out.round == 4


def test_fedavg_product_error_is_the_covariance_term():
    """mean(B) mean(A) differs from mean(B A) by exactly sum_k p_k (B_k - B̄)(A_k - Ā)."""
    updates = [factories.update(rank=2, seed=s, num_examples=n) for s, n in enumerate([3, 5])]
    out = FedAvg().aggregate(1, factories.GlobalState(), updates)
    p = [3 / 8, 5 / 8]
    for name in factories.SHAPES:
        A_bar, B_bar = out.adapter[name].A, out.adapter[name].B
        exact = sum(pk * u.factors[name].B @ u.factors[name].A for pk, u in zip(p, updates, strict=True))
        cov = sum(
            pk * (u.factors[name].B - B_bar) @ (u.factors[name].A - A_bar)
            for pk, u in zip(p, updates, strict=True)
        )
        torch.testing.assert_close(exact - B_bar @ A_bar, cov, rtol=1e-4, atol=1e-4)
        assert cov.abs().max() > 1e-3


def test_single_client_is_identity():
    update = factories.update(rank=4, seed=3, num_examples=11)
    out = FedAvg().aggregate(1, factories.GlobalState(), [update])
    for name, f in update.factors.items():
        assert torch.equal(out.adapter[name].A, f.A) and torch.equal(out.adapter[name].B, f.B)


def test_fedavg_refuses_mixed_ranks():
    updates = [
        factories.update(rank=2, seed=0, num_examples=1),
        factories.update(rank=4, seed=1, num_examples=1),
    ]
    with pytest.raises(ValueError, match="stacking"):
        FedAvg().aggregate(1, factories.GlobalState(), updates)


def test_fedavg_refuses_no_updates_and_no_examples():
    with pytest.raises(ValueError, match="no client updates"):
        FedAvg().aggregate(1, factories.GlobalState(), [])
    with pytest.raises(ValueError, match="no training examples"):
        FedAvg().aggregate(1, factories.GlobalState(), [factories.update(rank=2, seed=0, num_examples=0)])


def test_fedavg_state_survives_save_and_load():
    updates = [factories.update(rank=2, seed=s, num_examples=s + 1) for s in range(3)]
    first = FedAvg()
    first.aggregate(1, factories.GlobalState(), updates)
    second = FedAvg()
    second.load_state_dict(first.state_dict())
    a = first.aggregate(2, factories.state(), updates)
    b = second.aggregate(2, factories.state(), updates)
    for name in a.adapter:
        assert torch.equal(a.adapter[name].A, b.adapter[name].A)


class NotAStrategy:
    name = "not-a-strategy"


def test_registry_by_name_and_by_import_path():
    assert "fedavg" in available_strategies()
    assert isinstance(create_strategy("fedavg"), FedAvg)
    assert isinstance(create_strategy("strategies.fedavg:FedAvg"), FedAvg)


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("fedavgg", {}, "unknown strategy 'fedavgg'; choose one of .*fedavg"),
        ("no_such_module:Thing", {}, "cannot load strategy 'no_such_module:Thing'"),
        ("fedavg", {"momentum": 0.9}, "has no option 'momentum'"),
        ("tests.test_fedavg:NotAStrategy", {}, "does not implement the Strategy protocol"),
    ],
)
def test_registry_errors_name_the_fix(spec, options, message):
    with pytest.raises(StrategyError, match=message):
        create_strategy(spec, options)
