"""Example-level DP (DP-SGD on each client): the private gradient against a hand computation, the
Poisson batches, the client's accountant and budget, and what a client sends under it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

from fedpeft.config import ConfigError, LoraSection, load_config
from fedpeft.dp_sgd import ExampleAccountant, ExampleDP, PrivateGradients, per_example_loss, poisson_batches
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.privacy import SecureRandom
from fedpeft.testing import LocalGrid
from fedpeft.training import Encoded, train
from server.loop import FederatedRun
from tests.factories import small_config


def tiny(tiny_bert_dir):
    lora = LoraSection(rank=2, alpha=4.0, target_modules=["query", "value"])
    model = load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), 3, lora, 0))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # one deterministic forward per example
    return model


def rows(n):
    return Encoded(
        input_ids=[[101, 2000 + 11 * i, 2003 + i % 7, 102][: 2 + i % 3] for i in range(n)],
        labels=[i % 3 for i in range(n)],
    )


def test_the_private_gradient_is_the_sum_of_clipped_example_gradients_over_the_expected_batch(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    data, C, expected = rows(6), 0.995, 4.0  # the example norms are about 0.98 to 1.0
    model = tiny(tiny_bert_dir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    hand = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(6):  # one backward per example
        batch = data.collate([i], tokenizer)
        labels = batch.pop("labels")
        grads = torch.autograd.grad(F.cross_entropy(model(**batch).logits, labels), params)
        norm = float(torch.cat([g.flatten() for g in grads]).norm())
        norms.append(norm)
        for h, g in zip(hand, grads, strict=True):
            h.add_(g * min(1.0, C / norm))
    assert max(norms) > C > min(norms)  # some clipped, some not
    private = PrivateGradients(model, params, ExampleDP(noise_multiplier=0.0, max_grad_norm=C), expected)
    private.backward(data.collate(list(range(6)), tokenizer))
    private.close()
    for p, h in zip(params, hand, strict=True):
        torch.testing.assert_close(p.grad, h / expected, rtol=1e-4, atol=1e-7)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params)


def test_the_noise_has_std_z_c_over_the_expected_batch(tiny_bert_dir):
    model = tiny(tiny_bert_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    private = PrivateGradients(model, params, ExampleDP(noise_multiplier=2.0, max_grad_norm=0.5), 8.0)
    private.backward(None)  # an empty Poisson batch: noise only
    private.close()
    noise = torch.cat([p.grad.flatten() for p in params])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 8.0, rel=0.1)


def test_poisson_batches_take_each_row_with_probability_q():
    batches = list(poisson_batches(50, 0.2, 2000, SecureRandom()))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(10.0, rel=0.03)
    assert float(sizes.var()) == pytest.approx(50 * 0.2 * 0.8, rel=0.1)


def test_causal_lm_per_example_loss_averages_each_examples_scored_tokens():
    class Logits(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids, 5).float() * 3.0})()

    ids = torch.tensor([[1, 2, 3, 4], [2, 2, 0, 0]])
    labels = torch.tensor([[-100, 2, 3, 4], [-100, 2, -100, -100]])
    losses = per_example_loss(Logits(), {"input_ids": ids, "labels": labels})
    logits = torch.nn.functional.one_hot(ids, 5).float() * 3.0
    first = F.cross_entropy(logits[0, :3], labels[0, 1:])
    second = F.cross_entropy(logits[1, :1], labels[1, 1:2])
    torch.testing.assert_close(losses, torch.stack([first, second]))


def test_the_example_accountant_is_opacus_rdp_over_all_steps():
    dp = ExampleDP(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    accountant = ExampleAccountant(dp, sample_rate=0.05, steps=300)
    reference = RDPAccountant()
    for _ in range(300):
        reference.step(noise_multiplier=1.1, sample_rate=0.05)
    assert accountant.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert accountant.epsilon(600) > accountant.epsilon()


def test_dp_sgd_training_moves_the_model_and_counts_its_steps(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    model = tiny(tiny_bert_dir)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    dp = ExampleDP(noise_multiplier=1.0, max_grad_norm=1.0)
    result = train(
        model, tokenizer, rows(40), steps=4, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0, example_dp=dp
    )
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert 0 <= result.examples <= 40 * 4
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())


def test_a_federation_under_example_dp_reports_epsilon_and_no_losses_and_stops_at_the_budget(
    tiny_bert_dir, tmp_path
):
    settings = {
        "example_dp.enabled": "true",
        "example_dp.noise_multiplier": 1.0,
        "run.rounds": 3,
        "server.evaluate": "false",
    }
    FederatedRun(small_config(tiny_bert_dir, **settings), tmp_path / "free").run(LocalGrid(3))
    rounds = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rounds[0]["example_epsilon"] < rounds[1]["example_epsilon"] < rounds[2]["example_epsilon"]
    assert all(reply["train_loss"] is None for r in rounds for reply in r["replies"])
    budget = (rounds[0]["example_epsilon"] + rounds[1]["example_epsilon"]) / 2  # one round fits
    config = small_config(
        tiny_bert_dir, **settings, **{"example_dp.epsilon_budget": budget, "server.max_retries": 0}
    )
    with pytest.raises(Exception, match="round 2 got fewer than"):
        FederatedRun(config, tmp_path / "capped").run(LocalGrid(3))
    log = (tmp_path / "capped" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 1


def test_label_skew_is_refused_with_example_dp():
    with pytest.raises(ConfigError, match="set train.label_skew = 'none' with example_dp.enabled"):
        load_config(None, ["example_dp.enabled=true", "train.label_skew=fedlc"])
