"""Batch prediction: price a file of descriptions with the champion, any registered version, or an adapter folder.

    python -m serving.predict --input F --output G [--model URI | --adapter DIR]

- `--model` (default `models:/<tracking.registered_model>@champion` in this workspace's MLflow store, or the
  store in $MLFLOW_TRACKING_URI): the MLflow Model record_run logged (serving/pricer.py), so the prompt,
  generation settings and base model are the ones it was trained and scored with.
- `--adapter DIR`: a PEFT adapter folder with this workspace's params and base model (models/base).
The input is a .csv, .tsv, .jsonl, .json or .parquet file, read row by row as split_data reads data (so a
problem names the file, the line and the field); it needs the model's input column (`data.text_column` for
prices). Rows are predicted in batches of `evaluate.batch_size`, with a progress bar, exactly as evaluation
generates. The output (its format follows its extension: .csv, .jsonl or .parquet) keeps every input row and
column and adds `completion` and `predicted_price`; where the input has the truth (`data.price_column`), also
`error` and `band` (the course's colours; a completion without a number counts as $0, as in evaluation). A
row whose text is empty keeps its place with no prediction and a `problem`; a file that cannot be read, or
lacks the input column, stops before the model loads. The output is written to a temporary file and renamed,
so a failed run leaves nothing half-written and no earlier file lost.

Run: `python -m serving.predict --input new.csv --output predictions.csv` (or `make predict`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from stages.common.config import PRICE, load_params
from stages.common.errors import ConfigError, InputError, StageError
from stages.common.io import atomic_path
from stages.common.metrics import band
from stages.common.paths import Paths
from stages.data.sources import read_local

OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")


def command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="a .csv/.tsv/.jsonl/.json/.parquet file")
    parser.add_argument("--output", required=True, type=Path, help=f"where to write: {', '.join(OUTPUT_FORMATS)}")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="an MLflow model URI (default: models:/<registered model>@champion)")
    which.add_argument("--adapter", type=Path, help="a PEFT adapter folder, with this workspace's base model")
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="the workspace (params.yaml)")
    return parser.parse_args(argv)


def predictor(args, params, paths: Paths):
    """(its input column, its data shape, a function that loads it and returns its predict function) for a
    logged MLflow Model or an adapter folder here; the column and shape are known before the model loads."""
    if args.adapter is not None:
        from serving.pricer import Pricer, model_config

        if not (args.adapter / "adapter_config.json").is_file():
            raise StageError(f"{args.adapter}: not an adapter folder (no adapter_config.json)")
        config = model_config(params, paths)
        return config["input_column"], config["shape"], lambda: Pricer().load(config, args.adapter).answers
    import mlflow

    from stages.tracking.store import tracking_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(paths, params))  # the store `models:/` reads
    uri = args.model or f"models:/{params.tracking.registered_model}@champion"
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as exc:  # no such model, version or alias; not an MLflow Model
        raise StageError(f"{uri}: cannot be loaded as an MLflow Model ({exc})") from exc
    outputs = info.signature.outputs.input_names()
    return (
        info.signature.inputs.input_names()[0],
        PRICE if "price" in outputs else "text",
        lambda: mlflow.pyfunc.load_model(uri).predict,
    )


def read_input(path: Path, column: str):
    """The input rows as a DataFrame, every column kept; InputError naming the file (and line) when it
    cannot be read or lacks `column`."""
    import pandas as pd

    records = read_local(path)
    frame = pd.DataFrame([record.values for record in records])
    if column not in frame.columns:
        raise InputError(f"{path}: no column {column!r}, which the model reads; columns present: {list(frame.columns)}")
    return frame, [record.where for record in records]


def empty_rows(frame, column: str, where: list[str]) -> list[int]:
    """Positions of rows whose input is empty, each named in a warning with its file, line and field."""
    empty = []
    for position, value in enumerate(frame[column].tolist()):
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
            print(f"warning: {where[position]}: field {column!r}: empty; no prediction for this row", file=sys.stderr)
            empty.append(position)
    return empty


def truth_of(value) -> float | None:
    try:
        truth = float(value)
    except (TypeError, ValueError):
        return None
    return truth if math.isfinite(truth) else None


def add_predictions(frame, answers, empty: list[int], truth_column: str | None) -> None:
    """Put the model's answers beside the input rows as `completion` and `predicted_price` (empty rows get
    none), with `error` and `band` where the input has the truth: a completion without a number counts as $0,
    as evaluation counts it."""
    import pandas as pd

    skipped = set(empty)
    kept = [i for i in range(len(frame)) if i not in skipped]
    for name, values in answers.items():
        column = pd.Series([None] * len(frame), dtype=object)
        column.iloc[kept] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        frame["predicted_price" if name == "price" else name] = column
    if empty:
        frame["problem"] = ["empty input" if i in skipped else "" for i in range(len(frame))]
    if truth_column and "predicted_price" in frame.columns:
        pairs = [(truth_of(t), p or 0.0) for t, p in zip(frame[truth_column], frame["predicted_price"], strict=True)]
        frame["error"] = [abs(p - t) if t is not None else None for t, p in pairs]
        frame["band"] = [band(t, p) if t is not None else None for t, p in pairs]


def write_output(frame, path: Path) -> None:
    """`frame` in the format `path`'s extension names, written beside it and renamed into place."""
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        elif path.suffix == ".jsonl":
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_parquet(tmp, index=False)


def predict_file(args) -> int:
    """Read, predict and write; the number of rows written."""
    if args.output.suffix not in OUTPUT_FORMATS:
        raise StageError(f"{args.output}: unknown output format; use one of {', '.join(OUTPUT_FORMATS)}")
    paths = Paths.at(args.project_dir)
    params = load_params(paths.params)
    column, shape, load = predictor(args, params, paths)
    frame, where = read_input(args.input, column)
    empty = empty_rows(frame, column, where)
    inputs = frame.drop(index=frame.index[empty]) if empty else frame
    answers = load()(inputs[[column]].reset_index(drop=True))
    truth = params.data.price_column if shape == PRICE and params.data.price_column in frame.columns else None
    add_predictions(frame, answers.reset_index(drop=True), empty, truth)
    write_output(frame, args.output)
    return len(frame)


def main(argv: list[str] | None = None) -> int:
    args = command_line(argv)
    try:
        rows = predict_file(args)
    except (ConfigError, InputError, StageError, FileNotFoundError) as exc:
        print(f"[predict] error: {exc}", file=sys.stderr)
        return 1
    print(f"[predict] {rows} rows priced into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
