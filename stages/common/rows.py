"""The three shapes of data rows, as split_data writes them and every later stage reads them.

- `price`: {"text", "price"} (the course's price task).
- `prompt_completion`: {"prompt", "completion"}: any supervised task.
- `chat`: {"messages": [{"role", "content"}, ...]} ending with an assistant turn.
A split file's shape follows from its rows' fields (`split_shape`), so the splits carry it themselves;
`row_key` is what must not repeat across splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from stages.common.config import CHAT, PAIR, PRICE
from stages.common.errors import InputError

ROLES = ("system", "user", "assistant")
TARGET_FIELD = {PRICE: "price", PAIR: "completion", CHAT: "messages"}  # named when a target does not fit
KEY_RULES = {  # what `row_key` is, in words, for metrics/data.json: a change of it is a new test set
    PRICE: "text, lower-cased, whitespace collapsed",
    PAIR: "prompt, lower-cased, whitespace collapsed",
    CHAT: "role: content of every turn but the last, lower-cased, whitespace collapsed",
}


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: the key under which two texts count as the same."""
    return " ".join(text.split()).lower()  # str.split() splits on the same Unicode whitespace as regex \s


def row_shape(row: dict) -> str | None:
    if "messages" in row:
        return CHAT
    if "prompt" in row and "completion" in row:
        return PAIR
    if "text" in row and "price" in row:
        return PRICE
    return None


def split_shape(rows: list[dict], where: str) -> str:
    """The one shape of every row in a split file; InputError naming the line of a row that differs."""
    shape = numbered_shape(enumerate(rows, start=1), where)
    if shape is None:
        raise InputError(f"{where}: no rows; run split_data first")
    return shape


def numbered_shape(numbered: Iterable[tuple[int, dict]], where: str, expected: str | None = None) -> str | None:
    """The one shape of (line, row) pairs, which must be `expected` when given (the shape of the file's earlier
    rows, for a file read in chunks); InputError naming the line of a row that differs; None for no rows."""
    for line, row in numbered:
        shape = row_shape(row)
        if shape is None:
            raise InputError(
                f"{where}:{line}: fields {sorted(row)}; expected text+price, prompt+completion or messages"
            )
        if expected is not None and shape != expected:
            raise InputError(f"{where}:{line}: a {shape} row in a file of {expected} rows")
        expected = shape
    return expected


def row_key(row: dict) -> str:
    """What must not repeat across splits: the description, the prompt, or the conversation before its
    last (assistant) turn."""
    shape = row_shape(row)
    if shape == PRICE:
        return normalise(row["text"])
    if shape == PAIR:
        return normalise(row["prompt"])
    return normalise(" ".join(f"{turn['role']}: {turn['content']}" for turn in row["messages"][:-1]))


def key_digest(key: str) -> str:
    """A short stable digest of a row key (64 bits): how runs record which rows they trained on and how the
    gate pairs items, without storing the texts."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def reference(row: dict, shape: str) -> str:
    """The completion a prompt/completion or chat row expects (the last assistant turn for chat)."""
    return row["completion"] if shape == PAIR else row["messages"][-1]["content"]
