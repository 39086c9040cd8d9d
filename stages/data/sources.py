"""Reading a raw data source row by row, so that every problem can name the file, the row and the field.

`read_records(cfg, root)` returns the source's label and a list of `Record`s (where the row came from,
and its values by column name). Local files are read with the standard library (CSV, TSV, JSONL, JSON)
or pyarrow (Parquet) so each row keeps its line number; a folder of such files (one per delivery, say) is
read file by file in name order; a Hub dataset id, or a local folder in Hub layout, goes through
`datasets.load_dataset` (config, split and revision from params). Structural problems stop with an
`InputError`: a missing or empty file, an unknown extension, content that is not what the extension says,
text that is not UTF-8, a broken JSON line, a CSV row with the wrong number of fields, no data rows.
Problems with single values (a bad price, empty text) are for the caller to judge.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import DataConfig
from stages.common.errors import InputError

EMBEDDED_DIAMONDS = "embedded:diamonds"
FORMATS = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON Lines", ".json": "JSON", ".parquet": "Parquet"}
BINARY_MAGIC = {b"PAR1": "Parquet", b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip (or xlsx)", b"SQLite format 3": "SQLite"}


@dataclass(frozen=True)
class Record:
    where: str  # "data/raw/items.csv:12" (file and line) or "data/raw/items.parquet row 12"
    values: dict


def describe_diamond(row: dict) -> str:
    """A product description for one row of the diamonds table (price left out).

    The x/y/z dimensions are left out: they follow from carat and depth and would cost ~20 tokens each.
    """
    return (
        f"Loose diamond, {row['carat']:.2f} carat, {row['cut']} cut, colour {row['color']}, "
        f"clarity {row['clarity']}, depth {row['depth']:.1f}%, table {row['table']:.0f}%."
    )


def read_diamonds() -> list[Record]:
    """The diamonds table shipped in the plotnine wheel, as text/price records."""
    import pandas as pd

    try:
        path = Path(importlib.metadata.distribution("plotnine").locate_file("plotnine/data/diamonds.csv"))
    except importlib.metadata.PackageNotFoundError as exc:
        raise InputError(f"{EMBEDDED_DIAMONDS} needs plotnine installed (pip install plotnine)") from exc
    table = pd.read_csv(path).to_dict("records")
    return [
        Record(f"{EMBEDDED_DIAMONDS} row {i}", {"text": describe_diamond(row), "price": row["price"]})
        for i, row in enumerate(table, start=1)
    ]


def checked_bytes(path: Path, fmt: str, name: str) -> bytes:
    """The file's bytes; InputError (naming the file as `name`) when it is missing, empty, or binary content
    under a text extension."""
    if not path.is_file():
        raise InputError(f"{name}: data file not found (data.source)")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{name}: the file is empty")
    for magic, kind in BINARY_MAGIC.items():
        if data.startswith(magic) and kind != fmt:
            raise InputError(f"{name}: holds {kind} data, not {fmt} as its extension says; rename or convert it")
    return data


def decoded(name: str, data: bytes) -> str:
    """`data` as UTF-8 text (a leading BOM is dropped); InputError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(
            f"{name}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from exc


def read_delimited(name: str, text: str, delimiter: str) -> list[Record]:
    """Rows of a CSV/TSV text under its header row; a row with another number of fields stops the read."""
    csv.field_size_limit(2**31 - 1)  # an enormous field is read, then dropped by length with a warning
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    records = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(f"{name}:{start}: malformed row ({exc})") from exc
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if header is None:
            header = [cell.strip() for cell in row]
        elif len(row) != len(header):
            raise InputError(
                f"{name}:{start}: {len(row)} fields where the header has {len(header)}; fix or remove the row "
                "(quote fields that contain the delimiter)"
            )
        else:
            records.append(Record(f"{name}:{start}", dict(zip(header, row, strict=True))))
    return records


def read_json_lines(name: str, text: str) -> list[Record]:
    """One JSON object per line; a broken line stops the read with its number."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{number}: not valid JSON ({exc.msg}: column {exc.colno})") from exc
        if not isinstance(value, dict):
            raise InputError(f"{name}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append(Record(f"{name}:{number}", value))
    return records


def read_json_array(name: str, text: str) -> list[Record]:
    """A JSON array of objects; item numbers stand in for rows."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; one object per line is JSON Lines: name the file .jsonl" if exc.msg == "Extra data" else ""
        raise InputError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg}: column {exc.colno}){hint}") from exc
    if not isinstance(value, list):
        raise InputError(f"{name}: expected a JSON array of objects, got {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise InputError(f"{name} item {number}: expected a JSON object, got {type(item).__name__}")
    return [Record(f"{name} item {number}", item) for number, item in enumerate(value, start=1)]


def read_parquet(path: Path, name: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise InputError(f"{name}: not a readable Parquet file ({exc})") from exc
    return [Record(f"{name} row {number}", row) for number, row in enumerate(rows, start=1)]


def read_local(path: Path, name: str | None = None) -> list[Record]:
    """Records of a local .csv/.tsv/.jsonl/.json/.parquet file; messages and records name it as `name`
    (default: the path), e.g. the path relative to the project as data.source gives it."""
    name = name or str(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{name}: unknown format {suffix or '(no extension)'!r}; use one of {', '.join(FORMATS)}")
    data = checked_bytes(path, FORMATS[suffix], name)
    if suffix == ".parquet":
        if not data.startswith(b"PAR1"):
            raise InputError(f"{name}: not a Parquet file (no PAR1 header); is it CSV or JSON text?")
        return read_parquet(path, name)
    text = decoded(name, data)
    if suffix in (".csv", ".tsv"):
        return read_delimited(name, text, "\t" if suffix == ".tsv" else ",")
    return read_json_lines(name, text) if suffix == ".jsonl" else read_json_array(name, text)


def read_hub(cfg: DataConfig, source: str) -> list[Record]:
    """A split of a Hub dataset id (config `hub_config`, revision `revision`), or of a local dataset folder,
    through `datasets.load_dataset`; offline, Hub ids come from the local datasets cache."""
    import datasets

    try:
        dataset = datasets.load_dataset(source, name=cfg.hub_config, split=cfg.hub_split, revision=cfg.revision)
    except Exception as exc:  # network, missing config or split, missing dataset: all end the stage
        raise InputError(
            f"data.source={cfg.source!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r}) cannot be loaded: {exc}"
        ) from exc
    label = f"{cfg.source} [{cfg.hub_split}]"
    return [Record(f"{label} row {number}", row) for number, row in enumerate(dataset.to_list(), start=1)]


HUB_LAYOUT_MARKERS = ("README.md", "dataset_infos.json", "dataset_dict.json", "dataset_info.json")
HUB_SPLIT_NAME = re.compile(r"(train|test|validation|valid|dev|eval)([-_.].*)?", re.IGNORECASE)


def delivery_files(folder: Path) -> list[Path]:
    """The data files of a delivery folder (every supported file at its top level, by name), or [] when it is
    in Hub layout: a dataset card (README.md), a loading script, `save_to_disk` metadata, data only in
    subfolders, or files named after splits (train.jsonl, test-00000.parquet), as `datasets` reads them."""
    if any((folder / marker).exists() for marker in HUB_LAYOUT_MARKERS) or any(folder.glob("*.py")):
        return []
    files = sorted(
        (path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in FORMATS),
        key=lambda path: path.name,
    )
    return [] if any(HUB_SPLIT_NAME.fullmatch(path.name.split(".")[0]) for path in files) else files


def read_folder(folder: Path, name: str) -> list[Record]:
    """The records of every file in a delivery folder, file after file in name order (so `2026-12-01.jsonl`
    before `2026-12-02.jsonl`), each named as `<name>/<file>` in messages. Files of other kinds are skipped
    with a warning naming them."""
    skipped = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in FORMATS)
    skipped = [entry for entry in skipped if not entry.startswith(".")]
    if skipped:
        print(f"[split_data] warning: {name}: skipped {skipped}: not one of {', '.join(FORMATS)}", file=sys.stderr)
    return [record for path in delivery_files(folder) for record in read_local(path, f"{name.rstrip('/')}/{path.name}")]


def read_records(cfg: DataConfig, root: Path) -> tuple[str, list[Record]]:
    """(label, records) of data.source: the embedded default, a local file, a folder of delivery files, a
    local folder in Hub layout, or a Hub id.

    Relative paths are under `root`. InputError when the source holds no rows at all.
    """
    if cfg.source == EMBEDDED_DIAMONDS:
        return cfg.source, read_diamonds()
    path = root / cfg.source
    if path.is_dir() and delivery_files(path):
        label, records = cfg.source, read_folder(path, cfg.source)
    elif path.is_dir():
        label, records = cfg.source, read_hub(cfg, str(path))
    elif path.suffix.lower() in FORMATS or path.exists():
        label, records = cfg.source, read_local(path, cfg.source)
    else:
        label, records = cfg.source, read_hub(cfg, cfg.source)
    if not records:
        raise InputError(f"{label}: no data rows (only a header, blank lines or an empty list)")
    return label, records


def columns_of(records: list[Record]) -> list[str]:
    """Every column name seen in any record, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record.values))
    return list(seen)
