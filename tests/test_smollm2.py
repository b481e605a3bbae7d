"""Two federated rounds on the real SmolLM2-135M-Instruct, then its exported adapter generating in
a fresh process through plain transformers + peft (no fedpeft imported)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedpeft import model_store
from fedpeft.models import resolve_model
from fedpeft.testing import LocalGrid
from server.loop import FederatedRun
from tests.factories import causal_config

SMOLLM2 = model_store.KNOWN_MODELS["smollm2-135m-instruct"]

PLAIN_PEFT_GENERATE = r"""
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, adapter_dir = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(base_dir)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
chat = [{"role": "user", "content": "what is two plus three ?"}]
ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
assert not any(name.split(".")[0] in ("fedpeft", "server", "client", "strategies") for name in sys.modules)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not model_store.is_fetched(SMOLLM2),
    reason="SmolLM2-135M-Instruct is not fetched; run `fedpeft models fetch smollm2-135m-instruct`",
)
def test_two_federated_rounds_on_smollm2_then_plain_peft_generates(tmp_path):
    extra = {
        "model.max_length": 64,
        "lora.target_modules": ["q_proj", "v_proj"],
        "train.local_steps": 3,
        "train.batch_size": 2,
        "train.lr": 1e-3,
        "data.test_limit": 4,
        "eval.max_new_tokens": 12,
    }
    config = causal_config(tmp_path, "smollm2-135m-instruct", "fedavg", **extra)
    summary = FederatedRun(config, tmp_path / "run").run(LocalGrid(2))
    assert summary["rounds"] == 2
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]

    args = [resolve_model("smollm2-135m-instruct"), str(tmp_path / "run" / "adapter")]
    fresh = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_GENERATE, *args], capture_output=True, text=True, timeout=600
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.strip()
