"""The course's curation of product descriptions, each step switched on in params `data`.

- `scrub`: remove boilerplate phrases (`data.scrub_phrases`), brackets, quotes and colons, and
  part-number-like words (7+ characters with a digit, e.g. "B07XJ8C8F5"), which cost tokens and teach
  nothing about the price.
- `cap_words`: cut a description to its first N words (`data.max_text_words`).
- `balanced`: keep at most N rows per whole-dollar price (`data.balance_per_price`), so the many cheap
  items do not swamp the training set: those with the lowest seeded hash of their key, so which rows are kept
  does not depend on the order they arrive in, and a row kept stays kept when rows of other prices arrive.
Words, not tokens: split_data runs before (and without) the base model's tokenizer, so a change of base
model does not re-split the data. For English text a word is about 1.3 Llama tokens.
"""

from __future__ import annotations

import re
from collections import defaultdict

from stages.common.rows import row_key
from stages.data.membership import position

PART_NUMBER_MIN_CHARS = 7
_PUNCTUATION = re.compile(r'[:\[\]"{}【】\s]+')


def is_part_number(word: str) -> bool:
    return len(word) >= PART_NUMBER_MIN_CHARS and any(char.isdigit() for char in word)


def scrub(text: str, phrases: list[str]) -> str:
    """`text` without `phrases`, brackets, quotes, colons, doubled commas and part-number-like words."""
    for phrase in phrases:
        text = text.replace(phrase, " ")
    text = _PUNCTUATION.sub(" ", text).strip()
    text = text.replace(" ,", ",").replace(",,,", ",").replace(",,", ",")
    return " ".join(word for word in text.split(" ") if not is_part_number(word))


def cap_words(text: str, max_words: int) -> str:
    """The first `max_words` words of `text` (all of it when max_words <= 0 or it is shorter)."""
    words = text.split()
    return text if max_words <= 0 or len(words) <= max_words else " ".join(words[:max_words])


def balanced(rows: list[dict], per_price: int, seed: int) -> list[dict]:
    """At most `per_price` rows for each whole-dollar price (those whose key hashes lowest with `seed`), in
    their original order."""
    buckets: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for index, row in enumerate(rows):
        buckets[round(row["price"])].append((position(row_key(row), seed), index))
    keep = {index for members in buckets.values() for _, index in sorted(members)[:per_price]}
    return [row for index, row in enumerate(rows) if index in keep]
