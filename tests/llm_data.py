"""Tiny instruction data in the tiny Llama's vocabulary (tests/factories.py ``TINY_WORDS``)."""

from __future__ import annotations

import json
from pathlib import Path

NUMBERS = "zero one two three four five six seven eight nine".split()


def arithmetic_rows() -> list[dict[str, str]]:
    """Additions with single-digit answers, as dolly-style rows; category = the first operand."""
    rows = []
    for a in range(5):
        for b in range(5):
            rows.append(
                {
                    "instruction": f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?",
                    "context": "",
                    "response": f"the answer is {NUMBERS[a + b]} #### {a + b}",
                    "category": f"c{a}",
                }
            )
    return rows


def write_json(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps(rows))
    return path
