"""CCVR (fedpeft/calibration.py, server/calibration.py): pooled per-class moments, the head's
retraining on virtual features, and a federation that calibrates after its last round."""

from __future__ import annotations

import pytest
import torch

from fedpeft.calibration import ClassMoments, calibrated_head, head_of
from fedpeft.config import CalibrationSection, ConfigError, LoraSection, ModelSection, load_config
from fedpeft.models import CausalLMSpec, load_causal_lm
from fedpeft.testing import LocalGrid
from server.checkpoint import load_checkpoint
from server.loop import FederatedRun
from strategies import StrategyError
from tests.factories import metrics_rows, small_config


def moments_of(x: torch.Tensor, y: torch.Tensor, classes: int) -> ClassMoments:
    moments = ClassMoments.zeros(classes, x.shape[1])
    moments.add(x, y)
    return moments


def test_pooled_moments_give_the_mean_and_covariance_of_all_rows():
    """Three clients' sums pool to the moments of all their rows: the mean and unbiased covariance
    torch computes on the rows, and the paper's Eq. 3-4 from per-client means and covariances."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64) * 3 + 1
    y = torch.arange(60) % 2
    parts = [slice(0, 13), slice(13, 40), slice(40, 60)]
    pooled = moments_of(x[parts[0]], y[parts[0]], 2) + moments_of(x[parts[1]], y[parts[1]], 2)
    pooled = pooled + moments_of(x[parts[2]], y[parts[2]], 2)
    for c, (mean, cov) in pooled.gaussians().items():
        rows = x[y == c]
        torch.testing.assert_close(mean, rows.mean(0))
        torch.testing.assert_close(cov, torch.cov(rows.T))
        n = len(rows)  # Eq. 4: sum (n_k - 1)/(n - 1) S_k + n_k/(n - 1) m_k m_k^T - n/(n - 1) m m^T
        eq4 = -n / (n - 1) * torch.outer(mean, mean)
        for part in parts:
            local = x[part][y[part] == c]
            m_k, n_k = local.mean(0), len(local)
            eq4 = eq4 + (n_k - 1) / (n - 1) * torch.cov(local.T) + n_k / (n - 1) * torch.outer(m_k, m_k)
        torch.testing.assert_close(cov, eq4)


def test_a_class_seen_once_has_no_spread_and_an_absent_class_no_gaussian():
    moments = moments_of(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 8.0]]), torch.tensor([0, 0, 2]), 3)
    gaussians = moments.gaussians()
    assert set(gaussians) == {0, 2}
    assert torch.equal(gaussians[2][0], torch.tensor([5.0, 8.0], dtype=torch.float64))
    assert torch.equal(gaussians[2][1], torch.zeros(2, 2, dtype=torch.float64))


def test_moments_that_do_not_fit_the_head_are_refused():
    moments = moments_of(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 2)
    moments.check(2, 3)
    with pytest.raises(ValueError, match="shapes"):
        moments.check(3, 3)
    moments.counts[0] = 1.5
    with pytest.raises(ValueError, match="whole and non-negative"):
        moments.check(2, 3)


def test_calibration_repairs_a_head_that_never_predicts_one_class():
    """Three separable classes; the aggregated head's bias rules class 0 out. Retrained on virtual
    features from the pooled moments, the head recalls every class on fresh rows."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(3, 8) * 4

    def rows(n):
        y = torch.arange(n) % 3
        return centres[y] + torch.randn(n, 8, generator=gen), y

    x, y = rows(300)
    weight, bias = centres.clone(), torch.tensor([-100.0, 0.0, 0.0])
    test_x, test_y = rows(600)
    assert ((test_x @ weight.T + bias).argmax(-1) == 0).sum() == 0
    settings = CalibrationSection(virtual_per_class=500, epochs=5)
    new_weight, new_bias = calibrated_head(moments_of(x, y, 3), weight, bias, settings, seed=0)
    predicted = (test_x @ new_weight.T + new_bias).argmax(-1)
    for c in range(3):
        assert (predicted[test_y == c] == c).float().mean() > 0.9
    again = calibrated_head(moments_of(x, y, 3), weight, bias, settings, seed=0)
    assert torch.equal(again[0], new_weight) and torch.equal(again[1], new_bias)


def test_a_model_without_one_linear_head_is_refused(tiny_llama_dir):
    model = load_causal_lm(
        CausalLMSpec.from_config(ModelSection(name=str(tiny_llama_dir), task="causal_lm"), LoraSection(), 0)
    )
    with pytest.raises(ValueError, match="one linear classifier head; this model's trained heads: none"):
        head_of(model)


def test_a_federation_calibrates_its_head_after_the_last_round(tiny_bert_dir, tmp_path):
    """The calibration row follows the last round's, scored; only the head changed."""
    plain = FederatedRun(small_config(tiny_bert_dir), tmp_path / "plain")
    plain.run(LocalGrid(3))
    extra = {"calibration.method": "'ccvr'", "calibration.virtual_per_class": 50, "calibration.epochs": 2}
    FederatedRun(small_config(tiny_bert_dir, **extra), tmp_path / "ccvr").run(LocalGrid(3))
    rows = metrics_rows(tmp_path / "ccvr")
    assert [r["round"] for r in rows] == [0, 1, 2, 2]
    assert rows[-1]["calibration"] == "ccvr" and rows[-1]["calibration_clients"] == 3
    assert rows[-1]["dropped"] == [] and "eval_accuracy" in rows[-1]
    before, after = plain.state, load_checkpoint(tmp_path / "ccvr").state
    for name, f in before.adapter.items():
        assert torch.equal(after.adapter[name].A, f.A) and torch.equal(after.adapter[name].B, f.B)
    assert not torch.equal(after.extras["classifier.weight"], before.extras["classifier.weight"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.task='causal_lm'"], "calibrates a classifier head"),
        (["server.secure_aggregation=true", "server.min_clients=3"], "unprotected"),
        (["example_dp.enabled=true"], "unprotected"),
    ],
)
def test_calibration_is_refused_where_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["calibration.method='ccvr'", *overrides])


@pytest.mark.parametrize(("strategy", "message"), [("dp", "is private"), ("fedsa", "keeps B on each client")])
def test_calibration_is_refused_under_a_private_or_personal_strategy(
    tiny_bert_dir, tmp_path, strategy, message
):
    config = small_config(tiny_bert_dir, **{"calibration.method": "'ccvr'", "strategy.name": f"'{strategy}'"})
    with pytest.raises(StrategyError, match=message):
        FederatedRun(config, tmp_path)
