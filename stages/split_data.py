"""Stage `split_data`: read raw data, check and clean every row, deduplicate, and split train/val/test.

The source (params `data`, read by stages/data/sources.py) is `embedded:diamonds` (the diamonds table
shipped with plotnine, rendered into product descriptions), a local .csv/.tsv/.jsonl/.json/.parquet file
(put it under data/raw/ so DVC tracks it), or a Hub dataset id (or a local folder in Hub layout) read
with `datasets.load_dataset` (config `hub_config`, split `hub_split`, revision `revision`).
`data.shape` says what a row is and `data.*_column` where its fields are: `price` (text + numeric
target), `prompt_completion`, or `chat` (a list of role/content turns ending with the assistant's).
A row with a bad value (missing, non-numeric, non-finite or non-positive price; empty text; an invalid
conversation; more than `max_row_chars` characters) is dropped, counted and reported with its file, line
and field; a structural problem (missing, empty, misnamed or non-UTF-8 file, broken row, missing
column, nothing left, sizes that cannot be met) stops the stage and leaves the previous outputs as they
were. The course's curation (`scrub`, `min_text_words`, `max_text_words`, `balance_per_price`) applies to
the price shape. Duplicates (same text after lower-casing and collapsing spaces) keep their first row,
so no text is in two splits. A source may be a folder of such files (one per delivery), read in name order.
Each row's split follows from a seeded hash of its key (stages/data/membership.py): rows that arrive later
join the splits in proportion and never move an old row, so the test set keeps its items as the data grows;
`data.test_split` pins a test set by hand instead (a kept copy of an earlier test.jsonl, used as is).
It writes the three splits as JSONL (one row per line, in its shape's fields) and the data metrics (source,
shape, rows in, kept and dropped per reason with examples, the size, sha256 and price statistics of each
split, the membership rule and its fingerprint, and the rows kept, added, removed and moved per split since
the previous run, stages/data/previous.py). Inputs and outputs: `SPEC` below.

Run: `python -m stages.split_data` (or `dvc repro split_data`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass

from stages.common.cli import run_stage
from stages.common.config import CHAT, PAIR, PRICE, DataConfig, Params
from stages.common.errors import StageError
from stages.common.io import atomic_path, read_jsonl, write_json
from stages.common.paths import Paths
from stages.common.rows import ROLES, row_key, split_shape
from stages.common.spec import StageSpec
from stages.data.curation import balanced, cap_words, scrub
from stages.data.membership import assign, changes, rule
from stages.data.previous import previous_run
from stages.data.sources import Record, columns_of, read_records

SPEC = StageSpec(
    "split_data", params=("data",), reads=(Paths.raw_dir,), writes=(Paths.splits,), metrics=(Paths.data_metrics,)
)
SPLITS = ("train", "val", "test")
FEW_TEST_ITEMS = 30  # fewer draw a warning: too few for the gate to tell adapters apart
EXAMPLES_PER_REASON = 3  # dropped rows named in the warning and in metrics/data.json, per reason
REASONS = {
    PRICE: (
        "row_too_long", "text_empty", "text_not_in_template", "price_missing", "price_not_numeric",
        "price_not_finite", "price_not_positive", "price_below_min", "price_above_max", "text_too_short",
        "text_too_few_words", "duplicate_text", "balanced_sample_cap",
    ),
    PAIR: ("row_too_long", "prompt_empty", "completion_empty", "duplicate_text"),
    CHAT: ("row_too_long", "messages_invalid", "duplicate_text"),
}  # fmt: skip


@dataclass(frozen=True)
class Result:
    rows_in: int
    dropped: dict[str, int]
    sizes: dict[str, int]


class Dropped(Exception):
    """A row that cleaning drops: the reason (a key of metrics/data.json), the field and what is wrong."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def mapped_columns(cfg: DataConfig) -> dict[str, str]:
    """{params key: source column} that data.shape needs."""
    if cfg.shape == PRICE:
        return {"text_column": cfg.text_column, "price_column": cfg.price_column}
    if cfg.shape == PAIR:
        return {"prompt_column": cfg.prompt_column, "completion_column": cfg.completion_column}
    return {"messages_column": cfg.messages_column}


def text_value(raw, field: str, reason: str) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise Dropped(reason, field, "empty or whitespace only")
    if not isinstance(raw, str):
        raise Dropped(reason, field, f"not text but {type(raw).__name__} {raw!r:.40}")
    return raw


def check_length(texts: list[str], field: str, cfg: DataConfig) -> None:
    size = sum(len(text) for text in texts)
    if size > cfg.max_row_chars:
        raise Dropped("row_too_long", field, f"{size:,} characters > data.max_row_chars={cfg.max_row_chars:,}")


def price_value(raw, cfg: DataConfig) -> float:
    """The row's price as a float, or Dropped saying why it cannot be one."""
    field = cfg.price_column
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise Dropped("price_missing", field, "no value")
    if isinstance(raw, bool):
        raise Dropped("price_not_numeric", field, f"{raw!r} is not a number")
    try:
        price = float(raw)
    except (TypeError, ValueError):
        raise Dropped("price_not_numeric", field, f"{raw!r:.40} is not a number") from None
    if not math.isfinite(price):
        raise Dropped("price_not_finite", field, f"{raw!r} is not a finite number")
    if price <= 0:
        raise Dropped("price_not_positive", field, f"{price:g} is not positive")
    if price < cfg.min_price:
        raise Dropped("price_below_min", field, f"{price:g} < data.min_price={cfg.min_price:g}")
    if cfg.max_price is not None and price > cfg.max_price:
        raise Dropped("price_above_max", field, f"{price:g} > data.max_price={cfg.max_price:g}")
    return price


def unwrapped(text: str, template: str, field: str) -> str:
    """The description inside `text`, a prompt written with `template` (data.text_template): what stands at
    {text}. Whatever follows the template's end is dropped: it is the answer the source wrote into its prompt
    (ed-donner/pricer-data ends each text with "Price is $<price>.00"); the price is read from price_column."""
    head, tail = template.split("{text}")
    if not text.startswith(head):
        raise Dropped("text_not_in_template", field, f"does not start as data.text_template does ({head!r:.60})")
    end = text.rfind(tail, len(head)) if tail else len(text)
    if end < 0:
        raise Dropped("text_not_in_template", field, f"lacks the end of data.text_template ({tail!r:.60})")
    return text[len(head) : end]


def price_row(values: dict, cfg: DataConfig) -> dict:
    """{"text", "price"} from a raw row, curated as params ask."""
    field = cfg.text_column
    text = text_value(values.get(field), field, "text_empty").strip()
    if cfg.text_template is not None:
        text = text_value(unwrapped(text, cfg.text_template.strip(), field), field, "text_empty").strip()
    check_length([text], field, cfg)
    price = price_value(values.get(cfg.price_column), cfg)
    if cfg.scrub:
        text = scrub(text, cfg.scrub_phrases)
    if len(text) < cfg.min_text_chars:
        raise Dropped("text_too_short", field, f"{len(text)} characters < data.min_text_chars={cfg.min_text_chars}")
    if len(text.split()) < cfg.min_text_words:
        raise Dropped(
            "text_too_few_words", field, f"{len(text.split())} words < data.min_text_words={cfg.min_text_words}"
        )
    return {"text": cap_words(text, cfg.max_text_words), "price": price}


def pair_row(values: dict, cfg: DataConfig) -> dict:
    """{"prompt", "completion"} from a raw row, both kept verbatim."""
    prompt = text_value(values.get(cfg.prompt_column), cfg.prompt_column, "prompt_empty")
    completion = text_value(values.get(cfg.completion_column), cfg.completion_column, "completion_empty")
    check_length([prompt, completion], cfg.prompt_column, cfg)
    return {"prompt": prompt, "completion": completion}


def conversation(raw, field: str) -> list:
    """The raw messages value as a list: JSON text (CSV) and arrays (Parquet) are accepted."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise Dropped("messages_invalid", field, f"not a JSON list ({exc.msg})") from None
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, list) or not raw:
        raise Dropped("messages_invalid", field, "not a non-empty list of turns")
    return raw


def chat_row(values: dict, cfg: DataConfig) -> dict:
    """{"messages": [{"role", "content"}, ...]}: known roles, non-empty contents, a user turn, and an
    assistant turn last (the one evaluation compares against)."""
    field = cfg.messages_column
    messages = []
    for number, turn in enumerate(conversation(values.get(field), field), start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise Dropped("messages_invalid", field, f"turn {number} has no role among {ROLES}")
        if not isinstance(turn.get("content"), str) or not turn["content"].strip():
            raise Dropped("messages_invalid", field, f"turn {number} has empty content")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise Dropped("messages_invalid", field, "needs a user turn and must end with an assistant turn")
    check_length([m["content"] for m in messages], field, cfg)
    return {"messages": messages}


ROW_BUILDERS = {PRICE: price_row, PAIR: pair_row, CHAT: chat_row}


def check_columns(cfg: DataConfig, label: str, records: list[Record]) -> None:
    """StageError naming the params key when a mapped column is absent from every row."""
    present = columns_of(records)
    missing = {key: column for key, column in mapped_columns(cfg).items() if column not in present}
    if missing:
        named = ", ".join(f"data.{key}={column!r}" for key, column in missing.items())
        raise StageError(f"{label}: column(s) not found: {named}; columns present: {present}")


def clean(records: list[Record], cfg: DataConfig) -> tuple[list[dict], Counter, dict[str, list[str]]]:
    """Rows that pass checks and deduplication; drops per reason; a few 'where: field: why' per reason."""
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    kept: list[dict] = []
    first_seen: dict[str, str] = {}
    for record in records:
        try:
            row = ROW_BUILDERS[cfg.shape](record.values, cfg)
            key = row_key(row)
            if key in first_seen:
                raise Dropped("duplicate_text", next(iter(mapped_columns(cfg).values())), f"same as {first_seen[key]}")
        except Dropped as drop:
            dropped[drop.reason] += 1
            if len(examples.setdefault(drop.reason, [])) < EXAMPLES_PER_REASON:
                examples[drop.reason].append(f"{record.where}: field {drop.field!r}: {drop.detail}")
            continue
        first_seen[key] = record.where
        kept.append(row)
    if cfg.shape == PRICE and cfg.balance_per_price > 0:
        capped = balanced(kept, cfg.balance_per_price, cfg.seed)
        dropped["balanced_sample_cap"] += len(kept) - len(capped)
        kept = capped
    return kept, dropped, examples


def split(rows: list[dict], cfg: DataConfig, pinned_test: list[dict] | None = None) -> dict[str, list[dict]]:
    """The splits by the membership rule (stages/data/membership.py), train cut to `data.n_train` rows;
    StageError when test or val would be empty or the training pool is smaller than n_train."""
    splits = assign(rows, cfg, pinned_test)
    for name, key in (("test", "test_fraction"), ("val", "val_fraction")):
        if not splits[name]:
            raise StageError(
                f"data: data.{key}={getattr(cfg, key):g} puts none of the {len(rows)} rows left after cleaning in "
                f"the {name} set; raise it or bring more data"
            )
    if len(splits["train"]) < cfg.n_train:
        raise StageError(
            f"data: {len(splits['train'])} rows of the {len(rows)} left after cleaning are not test or val items, "
            f"but data.n_train={cfg.n_train}; lower it (-1 takes them all) or bring more data"
        )
    if cfg.n_train >= 0:
        splits["train"] = splits["train"][: cfg.n_train]  # the lowest positions: the same rows while they last
    if len(splits["test"]) < FEW_TEST_ITEMS:
        print(
            f"[split_data] warning: only {len(splits['test'])} test items: the gate's interval will be wide; "
            "raise data.test_fraction",
            file=sys.stderr,
        )
    return splits


def read_pinned_test(cfg: DataConfig, root) -> list[dict] | None:
    """The rows of `data.test_split` (None when unset), checked to be of the data's shape."""
    if cfg.test_split is None:
        return None
    path = root / cfg.test_split
    if not path.is_file():
        raise StageError(f"data.test_split: {cfg.test_split} not found; copy an earlier data/splits/test.jsonl there")
    rows = read_jsonl(path)
    if not rows:
        raise StageError(f"data.test_split: {cfg.test_split} holds no rows")
    shape = split_shape(rows, cfg.test_split)
    if shape != cfg.shape:
        raise StageError(f"data.test_split: {cfg.test_split} holds {shape} rows but data.shape is {cfg.shape}")
    return rows


def check_no_shared_text(splits: dict[str, list[dict]]) -> None:
    """StageError naming both places when the same text (normalised) is in two splits."""
    owner: dict[str, str] = {}
    for name in SPLITS:
        for line, row in enumerate(splits[name], start=1):
            where = f"{name}.jsonl:{line}"
            first = owner.setdefault(row_key(row), where)
            if first.split(".")[0] != name:
                raise StageError(f"the same text is in {first} and {where}: the test set would leak; nothing written")


def price_stats(rows: list[dict]) -> dict[str, float]:
    prices = sorted(r["price"] for r in rows)
    if not prices:
        return {}
    return {"mean": sum(prices) / len(prices), "median": prices[len(prices) // 2], "min": prices[0], "max": prices[-1]}


def warn_dropped(dropped: Counter, examples: dict[str, list[str]]) -> None:
    for reason, count in sorted(dropped.items()):
        if count:
            shown = "; ".join(examples.get(reason, []))
            print(f"[split_data] warning: {count} row(s) dropped ({reason}), e.g. {shown}", file=sys.stderr)


def write_splits(paths: Paths, splits: dict[str, list[dict]]) -> dict[str, str]:
    """Write the three JSONL files as one folder swap; return each file's sha256."""
    hashes = {}
    with atomic_path(paths.splits) as tmp:
        tmp.mkdir()
        for name in SPLITS:
            body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in splits[name]).encode("utf-8")
            (tmp / f"{name}.jsonl").write_bytes(body)
            hashes[name] = hashlib.sha256(body).hexdigest()
    return hashes


def membership_of(cfg: DataConfig) -> dict:
    """The membership rule (stages/data/membership.py), or the pinned file when `data.test_split` is set."""
    return {**rule(cfg), "test_split": cfg.test_split}


def since_last_run(paths: Paths, cfg: DataConfig, splits: dict[str, list[dict]]) -> dict:
    """What changed since the previous run's splits: `previous` (where they were read from), whether the
    membership rule changed (then the test set is another one: warned), and per split the rows kept, added,
    removed, with the rows `moved` between splits. {"previous": None} on a first run."""
    previous = previous_run(paths)
    if previous is None:
        return {"previous": None}
    before = previous.metrics.get("membership", {})
    now = membership_of(cfg)
    changed = {key: [before.get(key), now[key]] for key in now if key != "fingerprint" and before.get(key) != now[key]}
    if changed:
        named = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        print(
            f"[split_data] warning: split membership changed since the last run ({named}): this is another test "
            "set, so the gate re-scores the champion on it rather than comparing logged results",
            file=sys.stderr,
        )
    return {"previous": previous.where, "membership_changed": sorted(changed), **changes(previous.splits, splits)}


def run(params: Params, paths: Paths) -> Result:
    """Read, check, clean, deduplicate and split params.data; write the splits and metrics/data.json.

    Every check runs before the first write, so a failure leaves the previous outputs untouched.
    """
    cfg = params.data
    label, records = read_records(cfg, paths.root)
    check_columns(cfg, label, records)
    rows, dropped, examples = clean(records, cfg)
    warn_dropped(dropped, examples)
    if not rows:
        raise StageError(f"{label}: no rows left after cleaning ({len(records)} in, dropped {dict(dropped)})")
    splits = split(rows, cfg, read_pinned_test(cfg, paths.root))
    check_no_shared_text(splits)
    since = since_last_run(paths, cfg, splits)
    hashes = write_splits(paths, splits)
    summary: dict = {
        "source": label, "shape": cfg.shape, "rows_in": len(records), "rows_kept": len(rows),
        "rows_dropped": sum(dropped.values()), "dropped": {reason: dropped[reason] for reason in REASONS[cfg.shape]},
        "dropped_examples": examples, "membership": membership_of(cfg), "since_last_run": since,
    }  # fmt: skip
    for name in SPLITS:
        summary[name] = {"n": len(splits[name]), "sha256": hashes[name]}
        if cfg.shape == PRICE:
            summary[name]["price"] = price_stats(splits[name])
    write_json(paths.data_metrics, summary)
    sizes = {name: len(splits[name]) for name in SPLITS}
    print(f"{len(records)} rows in, {len(rows)} kept, {summary['rows_dropped']} dropped; splits {sizes}")
    if "test" in since:
        test = since["test"]
        print(f"test set since the last run: {test['kept']} kept, {test['added']} added, {test['removed']} removed")
    return Result(rows_in=len(records), dropped=dict(dropped), sizes=sizes)


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
