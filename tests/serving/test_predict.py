"""Batch prediction: every input row kept, the prices evaluation scored, errors and bands against truths,
bad input named by file, line and field, and nothing half-written."""

from __future__ import annotations

import pandas as pd
import pytest

from serving import predict
from stages.common.metrics import band
from tests.serving.conftest import MODEL, first_batch


def input_file(folder, items, suffix=".csv", **extra_columns):
    """The test items as a file of descriptions and prices, with an extra column that must survive."""
    frame = pd.DataFrame({"sku": [f"A-{i}" for i in range(len(items))], "text": [i["text"] for i in items],
                          "price": [i["price"] for i in items], **extra_columns})  # fmt: skip
    path = folder / f"items{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def read_output(path):
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False)
    return pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_an_adapter_folder_prices_a_file_as_evaluation_did(registered, tmp_path, suffix, capsys):
    paths, params, _, _ = registered
    items, evaluated = first_batch(paths, params)
    source = input_file(tmp_path, items, suffix)
    output = tmp_path / f"priced{suffix}"
    argv = ["--input", str(source), "--output", str(output), "--adapter", str(paths.adapter)]
    assert predict.main([*argv, "--project-dir", str(paths.root)]) == 0
    priced = read_output(output)
    assert list(priced.columns) == ["sku", "text", "price", "completion", "predicted_price", "error", "band"]
    assert list(priced["sku"]) == [f"A-{i}" for i in range(len(items))]
    assert [str(c) for c in priced["completion"]] == [row["adapter_output"] for row in evaluated]
    # the tiny model writes no number: the price is empty, the error is the truth, the band that of $0
    assert all(row["adapter_prediction"] is None for row in evaluated)
    assert [round(float(e), 6) for e in priced["error"]] == [round(float(i["price"]), 6) for i in items]
    assert list(priced["band"]) == [band(float(i["price"]), 0.0) for i in items]
    assert f"{len(items)} rows priced into {output}" in capsys.readouterr().out


def test_the_champion_in_the_registry_prices_a_file(registered, tmp_path, monkeypatch):
    paths, params, uri, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    items, evaluated = first_batch(paths, params)
    output = tmp_path / "priced.jsonl"
    argv = ["--input", str(input_file(tmp_path, items)), "--output", str(output), "--model", f"models:/{MODEL}/1"]
    assert predict.main([*argv, "--project-dir", str(paths.root)]) == 0
    assert list(read_output(output)["completion"]) == [row["adapter_output"] for row in evaluated]


def test_an_empty_description_keeps_its_row_with_a_problem(registered, tmp_path, capsys):
    paths, params, _, _ = registered
    items, _ = first_batch(paths, params)
    items = [dict(items[0]), {**items[1], "text": "  "}, dict(items[2])]
    output = tmp_path / "priced.csv"
    argv = ["--input", str(input_file(tmp_path, items)), "--output", str(output), "--adapter", str(paths.adapter)]
    assert predict.main([*argv, "--project-dir", str(paths.root)]) == 0
    priced = read_output(output)
    assert list(priced["problem"]) == ["", "empty input", ""] and priced["completion"][1] == ""
    assert "items.csv:3: field 'text': empty; no prediction for this row" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("sku,description\nA,a lamp\n", "items.csv: no column 'text', which the model reads"),
        ('{"text": "a lamp"}\n{"text": "a kettle\n', "items.jsonl:2: not valid JSON"),
    ],
)
def test_bad_input_stops_naming_the_file_and_keeps_the_earlier_output(registered, tmp_path, content, said, capsys):
    paths, _, _, _ = registered
    source = tmp_path / ("items.csv" if content.startswith("sku") else "items.jsonl")
    source.write_text(content)
    output = tmp_path / "priced.csv"
    output.write_text("an earlier result\n")
    argv = ["--input", str(source), "--output", str(output), "--adapter", str(paths.adapter)]
    assert predict.main([*argv, "--project-dir", str(paths.root)]) == 1
    assert said in capsys.readouterr().err
    assert output.read_text() == "an earlier result\n" and list(tmp_path.glob(".priced*")) == []


def test_an_unknown_model_or_output_format_is_refused(registered, tmp_path, capsys, monkeypatch):
    paths, params, uri, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    items, _ = first_batch(paths, params)
    source = input_file(tmp_path, items)
    argv = ["--input", str(source), "--project-dir", str(paths.root)]
    assert predict.main([*argv, "--output", str(tmp_path / "out.xlsx"), "--adapter", str(paths.adapter)]) == 1
    assert "out.xlsx: unknown output format" in capsys.readouterr().err
    assert predict.main([*argv, "--output", str(tmp_path / "out.csv"), "--model", f"models:/{MODEL}/99"]) == 1
    assert f"models:/{MODEL}/99: cannot be loaded as an MLflow Model" in capsys.readouterr().err
