"""Which split a row belongs to, decided by the row alone, so that rows arriving later never move old ones.

Each row's dedup key (stages/common/rows.py `row_key`: the normalised description, prompt, or conversation
before its last turn) is hashed with `data.seed` into a position in [0, 1): below `data.test_fraction` the row
is a test item, below `test_fraction + val_fraction` a validation item, else it is in the training pool, of
which `data.n_train` rows (the lowest positions; -1 all) are trained on. A row's split depends on nothing but
its key and those params: appending rows, adding a delivery file, re-ordering or re-rendering the source
keeps every old row where it was, and the new rows join each split in proportion. Each split is written in
position order, so the same rows give the same bytes (and the same sha256) whatever order they arrived in.

What defines membership (the rule, its version, the seed, the two fractions, the key) is `rule(cfg)`; its
`fingerprint` is recorded in metrics/data.json and on the MLflow run, so a change of any of them is named as
a new test set. docs/decisions.md says why a hash of the key rather than a kept manifest.
"""

from __future__ import annotations

import hashlib
import json

from stages.common.config import DataConfig
from stages.common.rows import KEY_RULES, row_key

RULE = "sha256(seed, row key) < test_fraction: test; < test_fraction + val_fraction: val; else train pool"
RULE_VERSION = 1  # bump when `position` or the key changes: every earlier test set becomes another one
SPLITS = ("train", "val", "test")


def position(key: str, seed: int) -> float:
    """The row's place in [0, 1): the first 64 bits of sha256(seed, key), uniform and independent of every
    other row."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(place: float, cfg: DataConfig) -> str:
    """'test', 'val' or 'train' for a row at `place`."""
    if place < cfg.test_fraction:
        return "test"
    return "val" if place < cfg.test_fraction + cfg.val_fraction else "train"


def rule(cfg: DataConfig) -> dict:
    """What decides membership, with a short fingerprint of it: two runs with the same fingerprint put every
    row they share in the same split."""
    defined = {
        "rule": RULE, "version": RULE_VERSION, "key": KEY_RULES[cfg.shape], "seed": cfg.seed,
        "test_fraction": cfg.test_fraction, "val_fraction": cfg.val_fraction,
    }  # fmt: skip
    body = json.dumps(defined, sort_keys=True).encode()
    return {**defined, "fingerprint": hashlib.sha256(body).hexdigest()[:12]}


def assign(rows: list[dict], cfg: DataConfig, pinned_test: list[dict] | None = None) -> dict[str, list[dict]]:
    """{split: rows in position order}, "train" the whole pool (the caller takes its first n_train). With a
    pinned test set (`data.test_split`), it is the test split as given; its rows stay out of train and val,
    and so do the rows the rule puts in test (so that unpinning later never moves a trained-on row into the
    test set)."""
    placed = sorted(((position(row_key(row), cfg.seed), row) for row in rows), key=lambda pair: pair[0])
    pinned = {row_key(row) for row in pinned_test} if pinned_test is not None else set()
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for place, row in placed:
        if row_key(row) not in pinned:
            splits[split_of(place, cfg)].append(row)
    if pinned_test is not None:
        splits["test"] = pinned_test
    return splits


def changes(previous: dict[str, list[dict]] | None, current: dict[str, list[dict]]) -> dict:
    """Since the previous run's splits: per split the rows kept, added and removed (by key), and `moved`, the
    rows present in both runs that changed split (0 while membership is unchanged). {} without a previous run."""
    if previous is None:
        return {}
    before = {name: {row_key(row) for row in previous.get(name, [])} for name in SPLITS}
    after = {name: {row_key(row) for row in current[name]} for name in SPLITS}
    owner_before = {key: name for name in SPLITS for key in before[name]}
    owner_after = {key: name for name in SPLITS for key in after[name]}
    summary: dict = {
        name: {
            "kept": len(before[name] & after[name]),
            "added": len(after[name] - before[name]),
            "removed": len(before[name] - after[name]),
        }
        for name in SPLITS
    }
    summary["moved"] = sum(1 for key, name in owner_before.items() if owner_after.get(key, name) != name)
    return summary
