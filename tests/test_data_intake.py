"""split_data on bad input: every case of the README's table, with its message, exit code and outputs.

Cases that stop the stage must exit 1 with a message naming the file (and line and field where there is
one) and leave the previous run's data/splits/*.jsonl and metrics/data.json byte-for-byte as they were.
Cases that drop a row must exit 0, name the file, line and field in a warning, and count the row.
"""

import csv
import hashlib
import io
import json

import pandas as pd
import pytest
import yaml

from stages import split_data
from tests.conftest import price_rows

OUTPUTS = ("data/splits/train.jsonl", "data/splits/val.jsonl", "data/splits/test.jsonl", "metrics/data.json")


def set_data(project, **data) -> None:
    """Change params.yaml's data section in the project."""
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(data)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def csv_bytes(rows: list[list], header=("text", "price")) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def good_rows(n: int = 90) -> list[list]:
    return [[r["text"], r["price"]] for r in price_rows(n)]


def snapshot(project) -> dict[str, bytes]:
    return {name: (project / name).read_bytes() for name in OUTPUTS}


@pytest.fixture
def previous_run(project, capsys):
    """The project after one good split_data run, with the bytes of its outputs."""
    assert split_data.main([]) == 0
    capsys.readouterr()
    return project, snapshot(project)


def parquet_bytes(tmp_path) -> bytes:
    pd.DataFrame(price_rows(5)).to_parquet(tmp_path / "p.parquet")
    return (tmp_path / "p.parquet").read_bytes()


LATIN1 = csv_bytes(good_rows(2)) + "Caf\u00e9 table, oak,120\n".encode("latin-1")
WRONG_FIELDS = csv_bytes(good_rows(2)) + b"a lamp, red, 3 cm,12,extra\n"

# (case, file name, content or a builder taking tmp_path, data overrides, expected message)
STOPS = [
    ("missing file", "absent.csv", None, {}, "absent.csv: data file not found"),
    ("unknown format", "table.xlsx", b"x", {}, "table.xlsx: unknown format '.xlsx'"),
    ("parquet under .csv", "items.csv", parquet_bytes, {}, "items.csv: holds Parquet data, not CSV"),
    ("CSV under .jsonl", "items.jsonl", csv_bytes(good_rows(5)), {}, "items.jsonl:1: not valid JSON"),
    ("JSON Lines under .json", "items.json", b'{"text": "a", "price": 1}\n{"text": "b", "price": 2}\n', {},
     "items.json:2: not valid JSON (Extra data: column 1); one object per line is JSON Lines: name the file .jsonl"),
    ("text under .parquet", "items.parquet", csv_bytes(good_rows(5)), {}, "items.parquet: not a Parquet file"),
    ("broken JSON line", "items.jsonl", b'{"text": "a", "price": 1}\n{"text": "b", "price": 2}\n{"text": "c", "pri\n',
     {}, "items.jsonl:3: not valid JSON"),
    ("CSV row with wrong number of fields", "items.csv", WRONG_FIELDS, {},
     "items.csv:4: 5 fields where the header has 2"),
    ("broken encoding", "items.csv", LATIN1, {}, "items.csv:4: not valid UTF-8 (byte 0xe9 at column 4)"),
    ("empty file", "items.csv", b"", {}, "items.csv: the file is empty"),
    ("header only", "items.csv", b"text,price\n", {}, "items.csv: no data rows"),
    ("missing mapped column", "items.csv", csv_bytes(good_rows()), {"price_column": "cost"},
     "column(s) not found: data.price_column='cost'; columns present: ['text', 'price']"),
    ("empty after cleaning", "items.csv", csv_bytes([[f"item {i}", -1] for i in range(5)]), {},
     "no rows left after cleaning (5 in, dropped {'price_not_positive': 5})"),
    ("sizes cannot be met", "items.csv", csv_bytes(good_rows()), {"n_train": 1000},
     "rows of the 90 left after cleaning are not test or val items, but data.n_train=1000"),
    ("unknown shape", "items.csv", csv_bytes(good_rows()), {"shape": "regression"}, "data.shape: expected one of"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "content", "data", "message"), STOPS, ids=[s[0] for s in STOPS])
def test_stopping_case_exits_1_names_the_problem_and_keeps_outputs(
    previous_run, tmp_path_factory, capsys, case, name, content, data, message
):
    project, before = previous_run
    if content is not None:
        body = content(tmp_path_factory.mktemp("bytes")) if callable(content) else content
        (project / "data" / "raw" / name).write_bytes(body)
    set_data(project, source=f"data/raw/{name}", **data)
    assert split_data.main([]) == 1, case
    assert message in capsys.readouterr().err
    assert snapshot(project) == before


# (case, bad row written as line 92 of items.csv, dropped reason, expected words in the warning)
DROPS = [
    ("non-numeric price", ["a lamp", "twelve"], "price_not_numeric", "field 'price': 'twelve' is not a number"),
    ("negative price", ["a lamp", "-5"], "price_not_positive", "field 'price': -5 is not positive"),
    ("zero price", ["a lamp", "0"], "price_not_positive", "field 'price': 0 is not positive"),
    ("NaN price", ["a lamp", "nan"], "price_not_finite", "field 'price': 'nan' is not a finite number"),
    ("infinite price", ["a lamp", "inf"], "price_not_finite", "field 'price': 'inf' is not a finite number"),
    ("missing price", ["a lamp", ""], "price_missing", "field 'price': no value"),
    ("empty text", ["", "12"], "text_empty", "field 'text': empty or whitespace only"),
    ("whitespace-only text", [" \t ", "12"], "text_empty", "field 'text': empty or whitespace only"),
    ("one enormous row", ["lamp " * 20000, "12"], "row_too_long",
     "field 'text': 99,999 characters > data.max_row_chars=50,000"),
    ("same text twice", [price_rows(1)[0]["text"].upper(), "999"], "duplicate_text", "field 'text': same as "),
]  # fmt: skip


@pytest.mark.parametrize(("case", "bad", "reason", "warning"), DROPS, ids=[d[0] for d in DROPS])
def test_dropping_case_counts_the_row_and_warns_with_file_line_and_field(project, capsys, case, bad, reason, warning):
    (project / "data" / "raw" / "items.csv").write_bytes(csv_bytes([*good_rows(), bad]))
    set_data(project, source="data/raw/items.csv")
    assert split_data.main([]) == 0, case
    err = capsys.readouterr().err
    assert f"1 row(s) dropped ({reason})" in err and f"items.csv:92: {warning}" in err
    report = json.loads((project / "metrics" / "data.json").read_text())
    assert report["rows_in"] == 91 and report["rows_kept"] == 90 and report["rows_dropped"] == 1
    assert report["dropped"][reason] == 1 and sum(report["dropped"].values()) == 1
    assert f"items.csv:92: {warning}" in report["dropped_examples"][reason][0]


def test_same_text_never_lands_in_two_splits(project):
    rows = good_rows()
    (project / "data" / "raw" / "items.csv").write_bytes(csv_bytes(rows + [[t.upper() + "  ", p + 1] for t, p in rows]))
    set_data(project, source="data/raw/items.csv", n_train=-1)
    assert split_data.main([]) == 0
    texts = {
        n: {json.loads(line)["text"].lower() for line in (project / f"data/splits/{n}.jsonl").open()}
        for n in ("train", "test")
    }
    assert not texts["train"] & texts["test"]
    assert json.loads((project / "metrics" / "data.json").read_text())["dropped"]["duplicate_text"] == 90


def test_shared_text_check_names_both_places():
    row = {"text": "A red lamp", "price": 3.0}
    splits = {"train": [{"text": "a RED  lamp", "price": 4.0}], "val": [], "test": [row]}
    with pytest.raises(split_data.StageError, match=r"same text is in train.jsonl:1 and test.jsonl:1"):
        split_data.check_no_shared_text(splits)


def test_data_report_counts_and_hashes(previous_run):
    project, _ = previous_run
    report = json.loads((project / "metrics" / "data.json").read_text())
    assert report["source"] == "data/raw/prices.csv" and report["shape"] == "price"
    assert report["rows_in"] == 90 and report["rows_dropped"] == 0
    assert set(report["dropped"]) == set(split_data.REASONS["price"])
    for name in ("train", "val", "test"):
        body = (project / "data" / "splits" / f"{name}.jsonl").read_bytes()
        assert report[name]["sha256"] == hashlib.sha256(body).hexdigest()
        assert report[name]["n"] == len(body.splitlines()) and report[name]["price"]["min"] > 0


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def pairs(n: int = 90) -> list[dict]:
    return [{"prompt": f"Colour of item {i}?", "completion": f" colour {i}"} for i in range(n)]


def chats(n: int = 90) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
            for p in pairs(n)]  # fmt: skip


# (case, data overrides, rows with the bad one last (line 91), reason, expected words in the warning)
SHAPED_DROPS = [
    ("empty completion", {"shape": "prompt_completion"}, [*pairs(), {"prompt": "Colour?", "completion": " "}],
     "completion_empty", "field 'completion': empty or whitespace only"),
    ("conversation ending with the user", {"shape": "chat"},
     [*chats(), {"messages": [{"role": "user", "content": "Hi"}]}],
     "messages_invalid", "field 'messages': needs a user turn and must end with an assistant turn"),
    ("turn without a role", {"shape": "chat"}, [*chats(), {"messages": [{"content": "Hi"}]}],
     "messages_invalid", "field 'messages': turn 1 has no role"),
    ("price above max_price", {"max_price": 430.0}, [*price_rows(90), {"text": "gold lamp", "price": 431}],
     "price_above_max", "field 'price': 431 > data.max_price=430"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "data", "rows", "reason", "warning"), SHAPED_DROPS, ids=[d[0] for d in SHAPED_DROPS])
def test_dropping_case_for_each_shape(project, capsys, case, data, rows, reason, warning):
    (project / "data" / "raw" / "items.jsonl").write_bytes(jsonl_bytes(rows))
    set_data(project, source="data/raw/items.jsonl", **data)
    assert split_data.main([]) == 0, case
    assert f"items.jsonl:{len(rows)}: {warning}" in capsys.readouterr().err
    assert json.loads((project / "metrics" / "data.json").read_text())["dropped"][reason] >= 1


def test_chat_messages_as_json_text_in_a_csv(project):
    rows = [[json.dumps(row["messages"])] for row in chats()] + [["not json"]]
    (project / "data" / "raw" / "chats.csv").write_bytes(csv_bytes(rows, header=("messages",)))
    set_data(project, source="data/raw/chats.csv", shape="chat")
    assert split_data.main([]) == 0
    report = json.loads((project / "metrics" / "data.json").read_text())
    assert report["rows_kept"] == 90 and report["dropped"]["messages_invalid"] == 1
    assert "chats.csv:92: field 'messages': not a JSON list" in report["dropped_examples"]["messages_invalid"][0]
