"""Generation-based evaluation of causal LMs: batched greedy decoding and exact match on answers.

An answer extractor turns a text into the part that is compared (or ``None`` when it finds none):
- ``gsm8k``: the number after GSM8K's ``#### ``, else the last number in the text;
- ``last_number``: the last number in the text;
- ``exact``: the whole text, stripped;
- ``regex:<pattern>``: the pattern's first group (or whole match) at its last occurrence.
Numbers are compared without thousands separators or a trailing ``.0``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedpeft.errors import UserError
from fedpeft.instructions import Message, pad_id, prompt_ids

Extractor = Callable[[str], str | None]
_NUMBER = r"-?[\d,]*\.?\d+"


class ExtractorError(UserError):
    """An unknown answer extractor name or a bad pattern."""


def _number(text: str | None) -> str | None:
    if text is None:
        return None
    value = text.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def _last(pattern: str, text: str) -> str | None:
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.groups() else last.group(0)


def _gsm8k(text: str) -> str | None:
    return _number(_last(rf"####\s*({_NUMBER})", text) or _last(_NUMBER, text))


EXTRACTORS: dict[str, Extractor] = {
    "gsm8k": _gsm8k,
    "last_number": lambda text: _number(_last(_NUMBER, text)),
    "exact": lambda text: text.strip(),
}


def get_extractor(name: str) -> Extractor:
    """The extractor called ``name`` (see the module docstring)."""
    if name.startswith("regex:"):
        try:
            pattern = re.compile(name.removeprefix("regex:"))
        except re.error as exc:
            raise ExtractorError(f"eval.extractor pattern is not a valid regex ({exc}); fix it") from exc
        return lambda text: _last(pattern.pattern, text)
    if name not in EXTRACTORS:
        raise ExtractorError(
            f"unknown eval.extractor {name!r}; use one of {', '.join(EXTRACTORS)} or 'regex:<pattern>'"
        )
    return EXTRACTORS[name]


@torch.no_grad()
def generate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: list[list[Message]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of each chat's last turn (the turns before it are the prompt), in
    left-padded batches."""
    model.eval()
    pad = pad_id(tokenizer)
    prompts = [prompt_ids(chat, tokenizer) for chat in chats]
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def exact_match(predictions: list[str], references: list[str], extract: Extractor) -> float:
    """The fraction of predictions whose extracted answer equals the reference's."""
    hits = 0
    for predicted, reference in zip(predictions, references, strict=True):
        expected = extract(reference)
        hits += expected is not None and extract(predicted) == expected
    return hits / len(references)
