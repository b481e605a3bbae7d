"""Instruction data: rows -> chats, response-only labels on concrete token positions, truncation,
partitioning by field and by file."""

from __future__ import annotations

import pandas as pd
import pytest

from fedpeft.config import DataSection
from fedpeft.data import DataError, load_instruction_splits, partition
from fedpeft.instructions import IGNORE, InstructionDataError, encode_chat, encode_chats, to_messages
from tests.factories import tiny_chat_tokenizer
from tests.llm_data import arithmetic_rows, write_json

USER = {"role": "user", "content": "what is two plus three ?"}
ANSWER = {"role": "assistant", "content": "five"}


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_only_the_response_and_its_end_of_turn_count_in_the_loss():
    tokenizer = tiny_chat_tokenizer()
    ids, labels = encode_chat([USER, ANSWER], tokenizer)
    assert tokens(tokenizer, ids) == [
        "<|im_start|>", "user", "what", "is", "two", "plus", "three", "?", "<|im_end|>",
        "<|im_start|>", "assistant", "five", "<|im_end|>",
    ]  # fmt: skip
    counted = [i for i, label in enumerate(labels) if label != IGNORE]
    assert counted == [11, 12]
    assert [labels[i] for i in counted] == [ids[11], ids[12]]


def test_every_assistant_turn_counts_and_no_user_or_system_turn_does():
    tokenizer = tiny_chat_tokenizer()
    chat = [
        {"role": "system", "content": "a"},
        USER,
        ANSWER,
        {"role": "user", "content": "and two plus four ?"},
        {"role": "assistant", "content": "six"},
    ]
    ids, labels = encode_chat(chat, tokenizer)
    counted = [tok for tok, label in zip(tokens(tokenizer, ids), labels, strict=True) if label != IGNORE]
    assert counted == ["five", "<|im_end|>", "six", "<|im_end|>"]


def test_truncation_is_counted_and_examples_without_a_response_left_are_skipped():
    tokenizer = tiny_chat_tokenizer()
    long_answer = {"role": "assistant", "content": "the answer is five"}  # 16 tokens in all
    short = [{"role": "user", "content": "two"}, ANSWER]  # 7 tokens
    data = encode_chats([[USER, ANSWER], [USER, long_answer], short], tokenizer, max_length=13)
    assert (data.truncated, data.skipped, len(data)) == (1, 0, 3)
    assert len(data.input_ids[1]) == 13 and tokens(tokenizer, data.input_ids[1])[-2:] == ["the", "answer"]
    assert data.labels[1][-2:] == data.input_ids[1][-2:]
    data = encode_chats([[USER, ANSWER], [USER, long_answer], short], tokenizer, max_length=11)
    assert (data.truncated, data.skipped, len(data)) == (2, 2, 1)
    with pytest.raises(InstructionDataError, match="no example keeps any response token"):
        encode_chats([[USER, ANSWER]], tokenizer, max_length=11)


def test_a_batch_is_right_padded_with_ignored_labels():
    tokenizer = tiny_chat_tokenizer()
    data = encode_chats([[USER, ANSWER], [{"role": "user", "content": "two"}, ANSWER]], tokenizer, 64)
    batch = data.collate([0, 1], tokenizer)
    short = len(data.input_ids[1])
    assert batch["input_ids"].shape == (2, 13)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (13 - short)
    assert (batch["labels"][1, short:] == IGNORE).all()
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()


def test_rows_become_chats_from_dolly_gsm8k_or_messages_fields():
    spec = DataSection()
    dolly = pd.DataFrame([{"instruction": "name a city", "context": "in france", "response": "paris"}])
    assert to_messages(dolly, spec, "d") == [
        [{"role": "user", "content": "name a city\n\nin france"}, {"role": "assistant", "content": "paris"}]
    ]
    gsm8k = pd.DataFrame([{"question": "two plus two ?", "answer": "#### 4"}])
    assert to_messages(gsm8k, spec, "g")[0][1] == {"role": "assistant", "content": "#### 4"}
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert to_messages(pd.DataFrame({"messages": [chat]}), spec, "m") == [chat]
    with pytest.raises(InstructionDataError, match=r"no response field .* set data.response_field"):
        to_messages(pd.DataFrame([{"instruction": "x", "reply": "y"}]), spec, "bad.json")


def test_field_partition_deals_values_to_clients(tmp_path):
    path = write_json(tmp_path / "train.json", arithmetic_rows())
    spec = DataSection(source=str(path), num_clients=2, partition="field", partition_field="category")
    train = load_instruction_splits(spec).train
    parts = [partition(train, spec, k, seed=0) for k in range(2)]
    assert [sorted(set(p["category"])) for p in parts] == [["c0", "c2", "c4"], ["c1", "c3"]]
    assert sum(len(p) for p in parts) == len(train) == 25
    with pytest.raises(DataError, match="5 distinct values, fewer than data.num_clients"):
        partition(
            train,
            DataSection(source=str(path), num_clients=6, partition="field", partition_field="category"),
            0,
            0,
        )


def test_files_partition_gives_client_k_the_kth_file_in_natural_order(tmp_path):
    rows = arithmetic_rows()
    for k in (0, 1, 10):  # "10" sorts after "1" and "0" only in natural order
        write_json(tmp_path / f"local_{k}.json", [r for r in rows if r["category"] == f"c{min(k, 4)}"])
    spec = DataSection(source=str(tmp_path / "local_*.json"), num_clients=3, partition="files")
    train = load_instruction_splits(spec).train
    assert [sorted(set(partition(train, spec, k, 0)["category"])) for k in range(3)] == [
        ["c0"],
        ["c1"],
        ["c4"],
    ]
    with pytest.raises(DataError, match="matches 3 files but data.num_clients is 4"):
        partition(train, DataSection(source=spec.source, num_clients=4, partition="files"), 0, 0)
