"""End to end: `fedpeft simulate` through Flower's simulation engine, then the exported adapter in
a fresh Python process that never imports fedpeft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedpeft.config import load_config
from fedpeft.data import load_splits
from fedpeft.models import resolve_model
from tests.factories import simulate_cli

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["run.rounds=3", "data.demo_train_size=800", "data.demo_test_size=200", "train.local_steps=8"]

PLAIN_PEFT_EVAL = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

base_dir, adapter_dir, rows_path, num_labels, max_length, batch_size = sys.argv[1:]
rows = [json.loads(line) for line in open(rows_path)]
tokenizer = AutoTokenizer.from_pretrained(base_dir)
base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=int(num_labels))
model = PeftModel.from_pretrained(base, adapter_dir).eval()
correct = 0
with torch.no_grad():
    for start in range(0, len(rows), int(batch_size)):
        chunk = rows[start:start + int(batch_size)]
        batch = tokenizer([r["text"] for r in chunk], truncation=True, max_length=int(max_length),
                          padding=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1)
        correct += sum(int(p) == r["label"] for p, r in zip(predicted.tolist(), chunk))
assert not any(name.split(".")[0] in ("fedpeft", "server", "client", "strategies") for name in sys.modules)
print(json.dumps({"accuracy": correct / len(rows)}))
"""


def test_quickstart_simulation_then_plain_peft_reproduces_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    simulate_cli("simulations/quickstart.toml", run_dir, OVERRIDES)

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["bytes_up"] > 0 and r["clients_aggregated"] == 4 for r in rows[1:])
    assert summary["final_eval_accuracy"] >= summary["initial_eval_accuracy"] + 0.3
    for name in ("metrics.png", "config.json", "checkpoint.safetensors", "adapter/adapter_config.json"):
        assert (run_dir / name).is_file(), name

    config = load_config(ROOT / "simulations/quickstart.toml", OVERRIDES)
    test = load_splits(config.data, config.run.seed).test
    rows_path = tmp_path / "test.jsonl"
    rows_path.write_text(
        "".join(
            json.dumps({"text": t, "label": y}) + "\n"
            for t, y in zip(test["text"], test["label"], strict=True)
        )
    )
    args = [
        resolve_model(config.model.name),
        str(run_dir / "adapter"),
        str(rows_path),
        "4",
        str(config.model.max_length),
        str(config.train.eval_batch_size),
    ]
    fresh = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_EVAL, *args], capture_output=True, text=True, timeout=300
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1])["accuracy"] == summary["final_eval_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedex"])  # a streaming fold and a batch rule
def test_two_simulations_of_one_seed_end_with_the_same_adapter_to_the_bit(tmp_path, strategy):
    """Through Flower's simulation engine replies arrive in an order that varies between runs. A
    batch rule sees them in client-id order: the same adapter to the bit. A streaming fold sums in
    float64: the same float32 mean but for an element whose float64 sum lands on a float32 rounding
    boundary, which then differs by one unit in the last place."""
    from safetensors.torch import load_file

    overrides = ["run.rounds=2", "train.local_steps=4", "server.fraction=1.0", f"strategy.name={strategy}"]
    for name in ("a", "b"):
        simulate_cli("simulations/quickstart.toml", tmp_path / name, overrides)
    first = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        if strategy == "fedex":
            assert torch.equal(first[key], second[key]), key
        else:
            ulp = torch.finfo(torch.float32).eps * first[key].abs().clamp_min(1e-30)
            assert bool(((first[key] - second[key]).abs() <= ulp).all()), key
