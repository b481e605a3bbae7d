"""Instruction data for causal LMs: rows -> chat messages -> token ids with response-only labels.

A row is either a chat (a ``messages`` list of ``{"role", "content"}``) or an instruction with an
optional input and a response (field names detected among common aliases, or set in ``[data]``).
The tokenizer's own chat template renders the conversation; only the assistant turns (their text
and the template's end-of-turn marker) count in the loss, every other position is labelled -100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedpeft.config import DataSection
from fedpeft.errors import UserError

MESSAGES = "messages"
IGNORE = -100  # the label transformers' loss skips
ALIASES = {
    "instruction": ("instruction", "question", "prompt"),
    "input": ("input", "context"),
    "response": ("output", "response", "answer"),
}
Message = dict[str, str]
logger = logging.getLogger(__name__)


class InstructionDataError(UserError):
    """Instruction data or a tokenizer that cannot be used as asked; the message says the fix."""


def to_messages(frame: pd.DataFrame, spec: DataSection, source: str) -> list[list[Message]]:
    """One chat per row: the ``messages`` column as is, or user (instruction + input) / assistant."""
    if MESSAGES in frame.columns:
        return [[{"role": m["role"], "content": m["content"]} for m in chat] for chat in frame[MESSAGES]]
    instruction = _field(frame, "instruction", spec.instruction_field, source)
    response = _field(frame, "response", spec.response_field, source)
    extra = _field(frame, "input", spec.input_field, source, required=False)
    chats = []
    for i in range(len(frame)):
        prompt = str(frame[instruction].iloc[i])
        if extra is not None and isinstance(frame[extra].iloc[i], str) and frame[extra].iloc[i].strip():
            prompt = f"{prompt}\n\n{frame[extra].iloc[i]}"
        chats.append(
            [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": str(frame[response].iloc[i])},
            ]
        )
    return chats


def _field(
    frame: pd.DataFrame, kind: str, chosen: str | None, source: str, required: bool = True
) -> str | None:
    candidates = (chosen,) if chosen else ALIASES[kind]
    found = next((c for c in candidates if c in frame.columns), None)
    if found is None and required:
        raise InstructionDataError(
            f"{source} has no {kind} field (looked for {', '.join(candidates)}; fields: "
            f"{', '.join(map(str, frame.columns))}); set data.{kind}_field, or give chat rows in '{MESSAGES}'"
        )
    return found


@dataclass
class InstructionBatches:
    """Tokenized chats: unpadded ids and labels (-100 outside the responses)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    truncated: int = 0
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: list[int], tokenizer: PreTrainedTokenizerBase) -> dict[str, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id)
        labels = torch.full((len(indices), width), IGNORE)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            labels[row, :n] = torch.tensor(self.labels[i])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's own, else its end-of-sequence id (as generation does)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InstructionDataError("the tokenizer has neither a pad nor an eos token; use another model")
    return pad


def encode_chats(
    chats: list[list[Message]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> InstructionBatches:
    """Tokenize ``chats`` with response-only labels, cut at ``max_length`` tokens.

    A chat whose responses are cut away entirely has nothing to learn from and is skipped; how
    many were truncated and skipped is logged and kept on the result.
    """
    data = InstructionBatches(input_ids=[], labels=[], pad_id=pad_id(tokenizer))
    for chat in chats:
        ids, labels = encode_chat(chat, tokenizer)
        if len(ids) > max_length:
            data.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
            data.skipped += 1
            continue
        data.input_ids.append(ids)
        data.labels.append(labels)
    if data.truncated:
        logger.warning(
            "truncated %d of %d examples to model.max_length=%d tokens (%d lost their whole response "
            "and are skipped)",
            data.truncated,
            len(chats),
            max_length,
            data.skipped,
        )
    if not data.input_ids and chats:
        raise InstructionDataError(
            f"no example keeps any response token within model.max_length={max_length}; raise it"
        )
    return data


def encode_chat(chat: list[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat, and labels equal to the ids on assistant turns only.

    Each assistant turn spans from the end of the prompt rendered with the generation prompt to the
    end of the conversation rendered up to that turn; tokens are mapped to those character spans
    through the tokenizer's offsets (no library offers response masking from an arbitrary
    template, so this is written here).
    """
    if not tokenizer.chat_template:
        raise InstructionDataError("the tokenizer has no chat template; use an instruct/chat model")
    text = _render(tokenizer, chat)
    spans = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, chat[:i], add_generation_prompt=True)
        upto = _render(tokenizer, chat[: i + 1])
        if not (text.startswith(prompt) and text.startswith(upto)):
            raise InstructionDataError(
                "this tokenizer's chat template does not render a conversation as a sequence of turns; "
                "response-only loss cannot find the responses (use another model or plain-text data)"
            )
        spans.append((len(prompt), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def prompt_ids(chat: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a model generates its answer after: every turn before the last, then the
    template's generation prompt."""
    text = _render(tokenizer, chat[:-1], add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(
    tokenizer: PreTrainedTokenizerBase, chat: list[Message], add_generation_prompt: bool = False
) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
