"""Stage `split_data`: load raw price data, clean it, deduplicate it and split it train/val/test.

Reads params `data`. The source is `embedded:diamonds` (the diamonds table shipped with plotnine,
rendered into product descriptions), a local .csv/.tsv/.jsonl/.json/.parquet file with a text column and a
price column (put it under data/raw/ so DVC tracks it), or a Hub dataset id (or a local folder in Hub
layout) read with `datasets.load_dataset` at `revision`, split `hub_split`.
Cleaning drops rows with a missing, non-numeric or non-positive price, a price outside
[min_price, max_price], or empty text; duplicates (same text after lower-casing and collapsing spaces)
keep their first row, so no text is in two splits. The shuffle is seeded and the test set is taken
first, so changing n_train or n_val never changes the test set.
Writes data/splits/{train,val,test}.jsonl ({"text", "price"} per line) and metrics/data.json
(rows in, rows dropped per reason, price statistics and a sha256 of each split).

Run: `python -m stages.split_data` (or `dvc repro split_data`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stages.core.cli import StageError, run_stage
from stages.core.config import DataConfig, Params
from stages.core.io import write_json, write_text
from stages.core.paths import Paths

EMBEDDED_DIAMONDS = "embedded:diamonds"
SPLITS = ("train", "val", "test")
LOCAL_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Result:
    rows_in: int
    dropped: dict[str, int]
    sizes: dict[str, int]


def describe_diamond(row) -> str:
    """A product description for one row of the diamonds table (price left out).

    The x/y/z dimensions are left out: they follow from carat and depth and would cost ~20 tokens each.
    """
    return (
        f"Loose diamond, {row['carat']:.2f} carat, {row['cut']} cut, colour {row['color']}, "
        f"clarity {row['clarity']}, depth {row['depth']:.1f}%, table {row['table']:.0f}%."
    )


def load_diamonds():
    """The diamonds table from the installed plotnine wheel, as a text/price DataFrame."""
    import pandas as pd

    try:
        path = Path(importlib.metadata.distribution("plotnine").locate_file("plotnine/data/diamonds.csv"))
    except importlib.metadata.PackageNotFoundError as exc:
        raise StageError(f"{EMBEDDED_DIAMONDS} needs plotnine installed (pip install plotnine)") from exc
    table = pd.read_csv(path)
    return pd.DataFrame({"text": table.apply(describe_diamond, axis=1), "price": table["price"]})


def load_local(path: Path):
    """A local CSV/TSV/JSONL/JSON/Parquet file as a DataFrame; errors name the file."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise StageError(f"{path}: unknown format {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if not path.is_file():
        raise StageError(f"{path}: data file not found")
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        return pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types; the user needs the file and the reason
        raise StageError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc


def load_hub(cfg: DataConfig, source: str):
    """A split of a Hub dataset id, or of a local dataset folder in Hub layout, as a DataFrame.

    Both go through `datasets.load_dataset`; offline, Hub ids are read from the local datasets cache.
    """
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=cfg.hub_split, revision=cfg.revision)
    except Exception as exc:  # network, missing split, missing dataset: all end the stage
        raise StageError(f"data.source={cfg.source!r} (split {cfg.hub_split!r}) cannot be loaded: {exc}") from exc
    return dataset.to_pandas()


def load_raw(cfg: DataConfig, root: Path):
    """The raw table named by data.source (relative paths are under `root`), with `text` and `price`
    columns taken from the mapped ones."""
    if cfg.source == EMBEDDED_DIAMONDS:
        return load_diamonds()
    path = root / cfg.source
    if path.is_dir():
        table = load_hub(cfg, str(path))
    elif path.suffix.lower() in LOCAL_FORMATS or path.exists():
        table = load_local(path)
    else:
        table = load_hub(cfg, cfg.source)
    missing = [c for c in (cfg.text_column, cfg.price_column) if c not in table.columns]
    if missing:
        raise StageError(
            f"{cfg.source}: column(s) {missing} not found (data.text_column / data.price_column); "
            f"columns present: {list(table.columns)}"
        )
    return table[[cfg.text_column, cfg.price_column]].set_axis(["text", "price"], axis=1)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def clean(table, cfg: DataConfig) -> tuple[list[dict], Counter]:
    """Rows that pass cleaning and deduplication, and how many were dropped for each reason."""
    dropped: Counter = Counter()
    kept: list[dict] = []
    seen: set[str] = set()
    for text, raw_price in zip(table["text"], table["price"], strict=True):
        try:
            price = float(raw_price)
        except (TypeError, ValueError):
            dropped["price_not_numeric"] += 1
            continue
        if not math.isfinite(price):
            dropped["price_missing_or_infinite"] += 1
        elif price <= 0 or price < cfg.min_price:
            dropped["price_too_low"] += 1
        elif cfg.max_price is not None and price > cfg.max_price:
            dropped["price_too_high"] += 1
        elif not isinstance(text, str) or len(text.strip()) < max(cfg.min_text_chars, 1):
            dropped["text_empty_or_short"] += 1
        elif (key := normalise(text)) in seen:
            dropped["duplicate_text"] += 1
        else:
            seen.add(key)
            kept.append({"text": text.strip(), "price": price})
    return kept, dropped


def split(rows: list[dict], cfg: DataConfig) -> dict[str, list[dict]]:
    """Seeded shuffle, then test, val and train in that order (n_train -1 takes all the rest)."""
    import numpy as np

    wanted = cfg.n_test + cfg.n_val + max(cfg.n_train, 1)
    if len(rows) < wanted:
        raise StageError(
            f"data: {len(rows)} rows after cleaning, but n_test + n_val + n_train needs {wanted}; "
            "lower the sizes in params.yaml or bring more data"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    shuffled = [rows[i] for i in order]
    end_val = cfg.n_test + cfg.n_val
    end_train = len(rows) if cfg.n_train < 0 else end_val + cfg.n_train
    return {"test": shuffled[: cfg.n_test], "val": shuffled[cfg.n_test : end_val], "train": shuffled[end_val:end_train]}


def price_stats(rows: list[dict]) -> dict[str, float]:
    prices = sorted(r["price"] for r in rows)
    return {
        "mean": sum(prices) / len(prices),
        "median": prices[len(prices) // 2],
        "min": prices[0],
        "max": prices[-1],
    }


def run(params: Params, paths: Paths) -> Result:
    """Load, clean, deduplicate and split params.data; write the splits and metrics/data.json."""
    cfg = params.data
    table = load_raw(cfg, paths.root)
    rows, dropped = clean(table, cfg)
    splits = split(rows, cfg)
    summary: dict = {"rows_in": len(table), "rows_kept": len(rows), "dropped": dict(sorted(dropped.items()))}
    for name in SPLITS:
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in splits[name])
        write_text(paths.split(name), body)
        summary[name] = {
            "n": len(splits[name]),
            "price": price_stats(splits[name]),
            "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
        }
    write_json(paths.data_metrics, summary)
    sizes = {name: len(splits[name]) for name in SPLITS}
    print(f"{len(table)} rows in, {len(rows)} kept, dropped {dict(dropped) or 'none'}; splits {sizes}")
    return Result(rows_in=len(table), dropped=dict(dropped), sizes=sizes)


def main(argv: list[str] | None = None) -> int:
    return run_stage("split_data", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
