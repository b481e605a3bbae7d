"""Write a GlobalState as a standard PEFT adapter directory that plain ``peft`` loads, and
optionally the full model with the adapter merged in.

The frozen merged delta U V and the trainable adapter s B A concatenate into one LoRA adapter:
A' = [V; A], B' = [U, s B] (s B R with a LoRA-SB core R: Fed-SB exports standard LoRA), with
``lora_alpha`` equal to each module's rank so that peft's own scale alpha/r is 1 (per-module
ranks go in ``rank_pattern`` / ``alpha_pattern``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, TaskType
from safetensors.torch import save_file
from torch import Tensor

from fedpeft.lora import PEFT_PREFIX
from fedpeft.state import GlobalState


def combined_factors(state: GlobalState) -> dict[str, tuple[Tensor, Tensor]]:
    """Per module (A', B') with B' @ A' equal to the state's total delta."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name in state.module_names():
        As: list[Tensor] = []
        Bs: list[Tensor] = []
        if name in state.merged:
            As.append(state.merged[name].V.float())
            Bs.append(state.merged[name].U.float())
        if state.adapter and name in state.adapter:
            f = state.adapter[name]
            As.append(f.A.float())
            Bs.append(f.scale * f.outer_B().float())
        out[name] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1))
    return out


def export_adapter(
    state: GlobalState, out_dir: str | Path, base_model: str, task_type: TaskType = TaskType.SEQ_CLS
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir`` atomically."""
    factors = combined_factors(state)
    if not factors:
        raise ValueError("the global state holds no adapter to export (no round has completed)")
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    top = max(ranks.values())
    config = LoraConfig(
        task_type=task_type,
        r=top,
        lora_alpha=top,
        target_modules=sorted(factors),
        rank_pattern={n: r for n, r in ranks.items() if r != top},
        alpha_pattern={n: r for n, r in ranks.items() if r != top},
        modules_to_save=sorted({name.rsplit(".", 1)[0] for name in state.extras}) or None,
        base_model_name_or_path=base_model,
    )
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    for name, t in state.extras.items():
        tensors[f"{PEFT_PREFIX}{name}"] = t.float().contiguous()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    config.save_pretrained(str(staging))
    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    replace_dir(staging, out_dir)
    return out_dir


def export_merged(adapter_dir: Path, base_model: str, out_dir: Path, labels: list[str] | None = None) -> Path:
    """Load ``base_model`` + the adapter with plain peft, ``merge_and_unload`` and save the full
    model and tokenizer into ``out_dir``: a causal LM, or with ``labels`` a classifier whose config
    names them (``id2label`` / ``label2id``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if labels is None:
        base = AutoModelForCausalLM.from_pretrained(base_model)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the adapter brings the head
        )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(staging)
    replace_dir(staging, out_dir)
    return out_dir


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished directory ``staging`` to ``target``, replacing what was there."""
    if target.exists():
        old = target.with_name(f".{target.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
