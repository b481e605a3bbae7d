"""Local training options: FedProx's proximal term, the FedLC logit calibration, the examples
trained, the per-round learning-rate decay, and how a client reports them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from fedpeft.config import ConfigError, LoraSection, TrainSection, load_config
from fedpeft.label_skew import logit_adjustment
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.testing import LocalGrid
from fedpeft.training import Encoded, TokenBudget, sample_batches, train
from server.loop import FederatedRun
from tests.factories import small_config

HEAD = "base_model.model.classifier.modules_to_save.default"


def tiny(tiny_bert_dir, num_labels=3):
    lora = LoraSection(rank=2, alpha=4.0, target_modules=["query", "value"])
    return load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), num_labels, lora, 0))


def toy_data(labels):
    return Encoded(
        input_ids=[[101, 2000 + 7 * i, 2001 + i % 5, 102] for i in range(len(labels))], labels=labels
    )


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fedlc_adjustment_is_minus_tau_over_the_fourth_root_of_the_counts_and_masks_absent_classes():
    adjustment = logit_adjustment([0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 3, "fedlc", tau=2.0)
    torch.testing.assert_close(adjustment[[0, 2]], torch.tensor([-2.0 * 15**-0.25, -2.0]))
    assert adjustment[1] == float("-inf")
    assert logit_adjustment([0, 1], 2, "none", tau=1.0) is None


def test_balanced_softmax_adds_tau_times_the_log_prior_and_masks_absent_classes():
    adjustment = logit_adjustment([0, 0, 0, 2], 3, "balanced_softmax", tau=0.5)
    torch.testing.assert_close(adjustment[[0, 2]], 0.5 * torch.tensor([0.75, 0.25]).log())
    assert adjustment[1] == float("-inf")


def test_under_fedlc_a_client_leaves_the_head_rows_of_classes_it_lacks_untouched(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    data = toy_data([0, 2] * 8)  # no class 1
    kwargs = dict(steps=5, batch_size=4, lr=1e-2, weight_decay=0.0, seed=0)
    for method, untouched in (("fedlc", True), ("balanced_softmax", True), ("none", False)):
        model = tiny(tiny_bert_dir)
        before = trainable(model)
        adjustment = logit_adjustment(data.labels, 3, method, tau=1.0)
        train(model, tokenizer, data, logit_adjustment=adjustment, **kwargs)
        after = trainable(model)
        for part in ("weight", "bias"):
            key = f"{HEAD}.{part}"
            assert torch.equal(after[key][1], before[key][1]) is untouched
            assert not torch.equal(after[key][0], before[key][0])


def test_a_frozen_head_stays_at_its_init_while_lora_trains(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    model = tiny(tiny_bert_dir)
    before = trainable(model)
    train(
        model,
        tokenizer,
        toy_data([0, 1, 2] * 4),
        steps=3,
        batch_size=4,
        lr=1e-2,
        weight_decay=0.0,
        seed=0,
        train_extras=False,
    )
    after = trainable(model)
    assert all(torch.equal(after[k], t) for k, t in before.items() if k.startswith(HEAD))
    assert any(not torch.equal(after[k], t) for k, t in before.items() if "lora_B" in k)
    assert all(p.requires_grad for n, p in model.named_parameters() if "modules_to_save" in n)  # restored


def test_the_calibrated_loss_is_cross_entropy_over_adjusted_logits(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    data = toy_data([0, 1, 1, 1, 2, 2])
    model = tiny(tiny_bert_dir)
    model.eval()  # no dropout: one deterministic forward
    adjustment = logit_adjustment(data.labels, 3, "fedlc", tau=0.5)
    batch = data.collate(list(range(6)), tokenizer)
    labels = batch.pop("labels")
    expected = F.cross_entropy(model(**batch).logits + adjustment, labels)
    from fedpeft.training import _loss

    torch.testing.assert_close(_loss(model, {**batch, "labels": labels}, adjustment), expected)


def test_proximal_term_adds_mu_times_the_distance_from_the_start_to_the_gradient(tiny_bert_dir):
    """train(proximal_mu=mu) takes exactly the AdamW steps of the loss + mu/2 ||w - w_start||^2."""
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    data = toy_data([0, 1, 2, 1] * 4)
    mu, steps, lr = 0.5, 4, 5e-2
    model = tiny(tiny_bert_dir)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(model)
    train(model, tokenizer, data, steps=steps, batch_size=4, lr=lr, weight_decay=0.0, seed=3, proximal_mu=mu)

    params = [p for p in reference.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    reference.train()
    for indices in sample_batches(len(data), 4, steps, 3):
        loss = reference(**data.collate(indices, tokenizer)).loss
        loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(model)[name], value, rtol=1e-5, atol=1e-6)
    untouched = trainable(tiny(tiny_bert_dir))
    assert any(not torch.equal(untouched[n], v) for n, v in trainable(model).items())


def test_examples_trained_count_every_batch_row(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    kwargs = dict(lr=1e-3, weight_decay=0.0, seed=0)
    assert (
        train(tiny(tiny_bert_dir), tokenizer, toy_data([0, 1] * 10), steps=3, batch_size=8, **kwargs).examples
        == 24
    )
    small = train(tiny(tiny_bert_dir), tokenizer, toy_data([0, 1, 2]), steps=3, batch_size=8, **kwargs)
    assert small.examples == 9  # a client with fewer rows than a batch trains on all of them


def test_round_lr_decays_geometrically():
    section = TrainSection(lr=1e-2, lr_decay=0.5)
    assert [section.round_lr(r) for r in (1, 2, 3)] == [1e-2, 5e-3, 2.5e-3]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_decay=0", r"train\.lr_decay must be in \(0, 1\]"),
        ("train.lr_decay=1.5", r"train\.lr_decay must be in \(0, 1\]"),
        ("train.proximal_mu=-1", r"train\.proximal_mu must be at least 0"),
        ("train.label_skew=balanced", "train.label_skew must be one of none, fedlc, balanced_softmax, got"),
        ("train.label_skew_tau=0", "train.label_skew_tau must be positive"),
    ],
)
def test_bad_training_options_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_label_skew_is_refused_for_a_causal_lm():
    with pytest.raises(ConfigError, match="classification only"):
        load_config(None, ["model.task=causal_lm", "train.label_skew=fedlc"])


def test_clients_report_examples_trained_and_apply_the_round_lr_and_options(
    tiny_bert_dir, tmp_path, monkeypatch
):
    """Through the real client: each round trains at its decayed lr with the configured proximal
    term and FedLC adjustment, and the examples trained reach the server (weighting 'steps'
    refuses updates without them)."""
    import client.app

    seen = []

    def recording(*args, **kwargs):
        result = train(*args, **kwargs)
        adjusted = kwargs["logit_adjustment"] is not None
        seen.append(
            {k: kwargs[k] for k in ("lr", "proximal_mu")}
            | {"adjusted": adjusted, "examples": result.examples}
        )
        return result

    monkeypatch.setattr(client.app, "train_locally", recording)
    config = small_config(
        tiny_bert_dir,
        **{
            "train.lr": 0.01,
            "train.lr_decay": 0.5,
            "train.proximal_mu": 0.1,
            "train.label_skew": "fedlc",
            "strategy.weighting": "steps",
            "server.evaluate": "false",
        },
    )
    FederatedRun(config, tmp_path).run(LocalGrid(3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted({s["lr"] for s in seen}) == [0.005, 0.01]
    assert all(s["proximal_mu"] == 0.1 and s["adjusted"] and s["examples"] == 2 * 8 for s in seen)
    assert all(r["clients_aggregated"] == 3 for r in rows)


def test_a_token_budget_caps_every_batch_and_visits_every_row():
    """Rows of 2 to 40 tokens, batches of up to 8 rows, at most 64 padded tokens: no batch passes
    the budget unless it is one row, and two epochs' worth of steps still reach every row."""
    lengths = [2 + (7 * i) % 39 for i in range(30)]
    budget = TokenBudget(lengths, max_tokens=64)
    batches = list(sample_batches(len(lengths), 8, 40, seed=1, token_budget=budget))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1 for b in batches)
    assert {i for b in batches for i in b} == set(range(30))
    assert max(len(b) for b in batches) > 1  # short rows still share a batch
    unbounded = list(sample_batches(len(lengths), 8, 40, seed=1))
    assert unbounded == list(sample_batches(len(lengths), 8, 40, seed=1, token_budget=None))
    assert all(len(b) == 8 for b in unbounded)


def test_training_under_a_token_budget_counts_the_rows_it_trained(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    data = toy_data([0, 1, 2, 1] * 4)  # rows of 4 tokens
    kwargs = dict(steps=3, batch_size=8, lr=1e-3, weight_decay=0.0, seed=0)
    result = train(tiny(tiny_bert_dir), tokenizer, data, max_batch_tokens=12, **kwargs)
    assert result.examples == 3 * 3  # 3 rows of 4 tokens per step
    assert train(tiny(tiny_bert_dir), tokenizer, data, **kwargs).examples == 3 * 8


def test_bf16_autocast_trains_float32_factors(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    data = toy_data([0, 1, 2, 1] * 4)
    model = tiny(tiny_bert_dir)
    before = trainable(model)
    first = train(model, tokenizer, data, steps=1, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0,
                  bf16_autocast=True)  # fmt: skip
    later = train(model, tokenizer, data, steps=20, batch_size=8, lr=1e-2, weight_decay=0.0, seed=1,
                  bf16_autocast=True)  # fmt: skip
    assert later.train_loss < first.train_loss
    after = trainable(model)
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert any(not torch.equal(before[n], t) for n, t in after.items())


def test_a_token_budget_is_refused_with_example_dp():
    with pytest.raises(ConfigError, match="unset train.max_batch_tokens with example_dp.enabled"):
        load_config(None, ["example_dp.enabled=true", "train.max_batch_tokens=512"])
