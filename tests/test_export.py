"""The exported adapter is a plain PEFT adapter equal to W0 + merged + adapter."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedpeft.config import LoraSection
from fedpeft.export import combined_factors, export_adapter
from fedpeft.lora import AdapterHost, extract_adapter
from fedpeft.models import ClassifierSpec, load_classifier
from fedpeft.state import GlobalState, LowRankDelta
from tests import factories


def test_combined_factors_equal_the_total_delta():
    state = factories.state()
    for name, (A, B) in combined_factors(state).items():
        assert A.shape[0] == B.shape[1] == 2 + 4
        torch.testing.assert_close(B @ A, factories.total_delta(state, name))


def test_exported_adapter_loads_in_plain_peft_and_matches(tiny_bert_dir, tmp_path):
    lora = LoraSection(rank=4, alpha=8.0, target_modules=["query", "value", "intermediate.dense"])
    host = AdapterHost(load_classifier(ClassifierSpec.from_config(str(tiny_bert_dir), 3, lora, seed=0)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in host.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    adapter, extras = extract_adapter(host.model)
    merged = {
        name: LowRankDelta(
            U=torch.randn(layer.out_features, 2, generator=gen) * 0.3,
            V=torch.randn(2, layer.in_features, generator=gen) * 0.3,
        )
        for name, layer in list(host.layers.items())[:3]  # some modules merged, others not
    }
    state = GlobalState(round=2, merged=merged, adapter=adapter, extras=extras)
    host.load_state(state, init_seed=0)
    ids = torch.tensor([[101, 2054, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
    mask = (ids != 0).long()
    host.model.eval()
    expected = host.model(input_ids=ids, attention_mask=mask).logits

    out = export_adapter(state, tmp_path / "adapter", str(tiny_bert_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["r"] == 6
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    loaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5
    )


def test_export_of_empty_state_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no adapter to export"):
        export_adapter(GlobalState(), tmp_path / "a", "m")


def test_re_export_replaces_the_directory(tmp_path):
    export_adapter(factories.state(0), tmp_path / "adapter", "m")
    export_adapter(factories.state(1), tmp_path / "adapter", "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_run_exports_an_adapter_that_names_its_labels_and_its_base(tiny_bert_dir, tmp_path):
    from fedpeft.testing import LocalGrid
    from server.loop import FederatedRun

    config = factories.small_config(
        tiny_bert_dir,
        **{
            "strategy.name": "dp",
            "strategy.inner": "'fedavg'",
            "strategy.clip_norm": 1.0,
            "strategy.noise_multiplier": 0.5,
        },
    )
    summary = FederatedRun(config, tmp_path).run(LocalGrid(3))
    adapter = tmp_path / "adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    assert labels["id2label"] == {str(i): name for i, name in enumerate(summary["label_names"])}
    assert labels["label2id"] == {name: i for i, name in enumerate(summary["label_names"])}
    assert summary["base_model"] == str(tiny_bert_dir)
    card = (adapter / "README.md").read_text()
    assert f"base_model: {tiny_bert_dir}" in card and "`dp` (clip_norm = 1.0" in card
    assert "client-level DP | ε = " in card and "num_labels=" in card
    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert_dir),
        num_labels=len(labels["id2label"]),
        id2label={int(i): name for i, name in labels["id2label"].items()},
        ignore_mismatched_sizes=True,
    )
    model = PeftModel.from_pretrained(base, str(adapter))
    assert model.base_model.model.config.id2label[0] == summary["label_names"][0]


def test_fedpeft_export_writes_a_merged_classifier_that_names_its_labels(tiny_bert_dir, tmp_path):
    from fedpeft.cli import main
    from fedpeft.testing import LocalGrid
    from server.loop import FederatedRun

    summary = FederatedRun(factories.small_config(tiny_bert_dir, **{"run.rounds": 1}), tmp_path / "run").run(
        LocalGrid(3)
    )
    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "full")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full")
    assert [model.config.id2label[i] for i in range(len(summary["label_names"]))] == summary["label_names"]
    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "x")]) == 2  # not a run: one line
