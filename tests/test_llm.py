"""Causal LM fine-tuning on a tiny in-process Llama: training, evaluation, batched generation,
a federated run through the in-process grid, and the exported adapter in plain peft."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedpeft.config import ConfigError, LoraSection, ModelSection, load_config
from fedpeft.generation import ExtractorError, exact_match, generate, get_extractor
from fedpeft.instructions import encode_chats
from fedpeft.lora import extract_adapter
from fedpeft.models import CausalLMSpec, ModelError, device_and_dtype, load_causal_lm, load_tokenizer
from fedpeft.testing import LocalGrid
from fedpeft.training import evaluate_lm, train
from server.loop import FederatedRun
from tests.factories import causal_config
from tests.llm_data import arithmetic_rows

LORA = LoraSection(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"])


def lm(path, **fields) -> ModelSection:
    return ModelSection(name=str(path), task="causal_lm", **fields)


def chats(rows):
    return [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]
        for r in rows
    ]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("gsm8k", "so 3 + 4 = 7\n#### 1,234", "1234"),
        ("gsm8k", "the answer is 12.", "12"),
        ("gsm8k", "no number", None),
        ("last_number", "7 then 8.0", "8"),
        ("exact", "  paris \n", "paris"),
        ("regex:answer: (\\w+)", "answer: red, answer: blue", "blue"),
    ],
)
def test_answer_extractors(name, text, expected):
    assert get_extractor(name)(text) == expected


def test_exact_match_and_unknown_extractor():
    extract = get_extractor("gsm8k")
    assert exact_match(["#### 4", "5", "x"], ["so #### 4", "#### 6", "#### 1"], extract) == pytest.approx(
        1 / 3
    )
    with pytest.raises(ExtractorError, match="unknown eval.extractor 'nope'"):
        get_extractor("nope")


def test_training_lowers_the_response_loss(tiny_llama_dir):
    model = load_causal_lm(CausalLMSpec.from_config(lm(tiny_llama_dir), LORA, seed=0))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    data = encode_chats(chats(arithmetic_rows()), tokenizer, max_length=64)
    before = evaluate_lm(model, tokenizer, data, batch_size=8)
    metrics = train(model, tokenizer, data, steps=30, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0)
    after = evaluate_lm(model, tokenizer, data, batch_size=8)
    assert after["loss"] < before["loss"] - 1.0
    assert after["perplexity"] == pytest.approx(torch.tensor(after["loss"]).exp().item())
    assert metrics.train_loss < before["loss"]


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_llama_dir):
    model = load_causal_lm(CausalLMSpec.from_config(lm(tiny_llama_dir), LORA, seed=0))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    prompts = chats(arithmetic_rows()[:3])
    prompts[1][0]["content"] = "two ?"  # different prompt lengths: left padding matters
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in prompts]
    assert batched == single and all(batched)


@pytest.mark.parametrize("strategy", ["fedavg", "stacking"])
def test_federated_causal_lm_rounds_then_plain_peft_loads_the_adapter(tiny_llama_dir, tmp_path, strategy):
    config = causal_config(tmp_path, tiny_llama_dir, strategy, **{"run.export_merged": True})
    run = FederatedRun(config, tmp_path / "run")
    summary = run.run(LocalGrid(2))

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_aggregated"] == 2 for r in rows[1:])
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert 0.0 <= summary["final_eval_exact_match"] <= 1.0

    adapter_dir = tmp_path / "run" / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    test = encode_chats(run.evaluator.chats, tokenizer, config.model.max_length)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter_dir)
    plain_loss = evaluate_lm(plain, tokenizer, test, batch_size=8)["loss"]
    assert plain_loss == pytest.approx(summary["final_eval_loss"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert evaluate_lm(merged, tokenizer, test, batch_size=8)["loss"] == pytest.approx(plain_loss, rel=1e-4)


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"),
    [
        (False, False, ("cpu", torch.float32)),
        (True, True, ("cuda", torch.bfloat16)),
        (True, False, ("cuda", torch.float32)),
    ],
)
def test_device_and_dtype_follow_the_machine(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    device, dtype = device_and_dtype()
    assert (device.type, dtype) == expected


def test_a_named_dtype_overrides_the_machine_default():
    assert device_and_dtype("bfloat16")[1] is torch.bfloat16
    assert device_and_dtype("float32")[1] is torch.float32


def test_base_in_bfloat16_keeps_lora_in_float32(tiny_llama_dir):
    model = load_causal_lm(CausalLMSpec.from_config(lm(tiny_llama_dir, dtype="bfloat16"), LORA, seed=0))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}


def test_quantization_without_cuda_is_one_clear_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = CausalLMSpec.from_config(lm(tiny_llama_dir, quantization="4bit"), LORA, seed=0)
    with pytest.raises(ModelError, match='needs a CUDA GPU.*quantization = "none"'):
        load_causal_lm(spec)


def test_quantization_is_refused_for_classifiers():
    with pytest.raises(ConfigError, match="causal LMs only"):
        load_config(None, ["model.quantization='4bit'"])


def test_gradient_checkpointing_trains_the_same_adapter(tiny_llama_dir):
    """Recomputing activations changes memory, not the arithmetic: the same steps give the same
    factors (to float32 rounding), and the model is left without checkpointing."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    data = encode_chats(chats(arithmetic_rows()), tokenizer, max_length=64)
    trained = []
    for checkpointing in (False, True):
        model = load_causal_lm(CausalLMSpec.from_config(lm(tiny_llama_dir), LORA, seed=0))
        train(
            model,
            tokenizer,
            data,
            steps=3,
            batch_size=4,
            lr=1e-2,
            weight_decay=0.0,
            seed=0,
            gradient_checkpointing=checkpointing,
        )
        base = model.get_base_model()
        assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
        trained.append(extract_adapter(model)[0])
    for name, f in trained[0].items():
        torch.testing.assert_close(trained[1][name].B, f.B, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(trained[1][name].A, f.A, rtol=1e-4, atol=1e-6)
