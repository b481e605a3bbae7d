"""What an exported adapter says about itself: its label names (``labels.json``) and a model card
(``README.md``, the Hugging Face convention) naming the base model, the task, the federation that
trained it and its privacy parameters, so it can be loaded and judged without the run directory."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig

LABELS_FILE = "labels.json"


def write_labels(out_dir: Path, labels: list[str]) -> None:
    """``id2label`` / ``label2id`` as ``from_pretrained`` takes them."""
    mapping = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    (out_dir / LABELS_FILE).write_text(json.dumps(mapping, indent=2) + "\n")


def write_card(out_dir: Path, config: RunConfig, summary: dict[str, Any], last_row: dict[str, Any]) -> None:
    """``README.md`` in ``out_dir``: front matter for the Hub, then the run that produced it."""
    base, labels = summary["base_model"], summary.get("label_names") or []
    train, lora = config.train, config.lora
    targets = ", ".join(lora.target_modules) if lora.target_modules else "peft's default modules"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [fedpeft, federated-learning, lora]",
        "---",
        "",
        f"# {config.run.name}: a federated LoRA adapter",
        "",
        f"Trained with fedpeft {_fedpeft_version()} on `{base}` ({config.model.task}).",
        "",
        "| | |",
        "|---|---|",
        f"| strategy | `{config.strategy.name}` {_options(config.strategy.options)} |",
        f"| rounds | {summary['rounds']} |",
        f"| clients | {config.data.num_clients}, {config.clients_per_round} per round |",
        f"| local training | {train.local_steps} steps of batch {train.batch_size}, lr {train.lr:g} |",
        f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}, on {targets} |",
    ]
    if summary.get("examples_trained_on"):
        lines.append(f"| training examples (all clients) | {summary['examples_trained_on']} |")
    lines += [f"| {key} | {_figure(value)} |" for key, value in summary.items() if key.startswith("final_")]
    lines += _privacy(config, last_row)
    lines += ["", "## Loading it", "", "```python", "from peft import PeftModel"]
    if labels:
        lines += [
            "from transformers import AutoModelForSequenceClassification",
            "",
            f"labels = {json.dumps(labels)}  # also in {LABELS_FILE}",
            "base = AutoModelForSequenceClassification.from_pretrained(",
            f'    "{base}", num_labels={len(labels)}, ignore_mismatched_sizes=True,',
            "    id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},",
            ")",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        ]
    lines += ['model = PeftModel.from_pretrained(base, "path/to/this/adapter")', "```", ""]
    if labels:
        lines += [
            "The adapter carries the classifier head; loading the base prints that the head is newly",
            "initialised, which the adapter then replaces.",
            "",
        ]
    (out_dir / "README.md").write_text("\n".join(lines))


def _privacy(config: RunConfig, last_row: dict[str, Any]) -> list[str]:
    out = []
    if config.strategy.name == "dp" and "epsilon" in last_row:
        out.append(f"| client-level DP | ε = {last_row['epsilon']:.3f} {_options(config.strategy.options)} |")
    if config.example_dp.enabled:
        dp = config.example_dp
        spent = (
            f"ε = {last_row['example_epsilon']:.3f} (largest client), "
            if "example_epsilon" in last_row
            else ""
        )
        out.append(
            f"| example-level DP | {spent}δ = {dp.delta:g}, noise {dp.noise_multiplier:g}, "
            f"clip {dp.max_grad_norm:g} |"
        )
    return out


def _options(options: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} = {v}" for k, v in sorted(options.items())) + ")" if options else ""


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _fedpeft_version() -> str:
    try:
        return version("fedpeft")
    except PackageNotFoundError:
        return "(source tree)"
