"""Where every stage reads and writes, relative to the project root: each path is written here once.

`Paths.at(root).splits` is an absolute `Path`; `Paths.splits` (on the class) is the `Location` itself, whose
`.relative` ("data/splits") is what dvc.yaml names. Stages declare which of these they read and write in their
`SPEC` (stages/common/spec.py), and tests/test_dvc_yaml.py checks dvc.yaml against those declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class Location:
    """A path below the project root: `Paths.<name>` gives the Location, `paths.<name>` the absolute Path."""

    def __init__(self, relative: str):
        self.relative = relative

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, paths: Paths | None, owner=None):
        return self if paths is None else self.at(paths)

    def at(self, paths: Paths) -> Path:
        """This location in the project `paths` is for."""
        return paths.root / self.relative

    def __repr__(self) -> str:
        return f"Location({self.relative!r})"


SPLITS = "data/splits"


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Paths:
        return cls(Path(root).resolve())

    params = Location("params.yaml")
    # base_model
    base_model = Location("models/base")
    # split_data
    raw_dir = Location("data/raw")
    splits = Location(SPLITS)
    train_split = Location(f"{SPLITS}/train.jsonl")
    val_split = Location(f"{SPLITS}/val.jsonl")
    test_split = Location(f"{SPLITS}/test.jsonl")
    data_metrics = Location("metrics/data.json")
    # tokenize_data
    tokenized = Location("data/tokenized")
    token_metrics = Location("metrics/tokens.json")
    token_lengths_plot = Location("plots/token_lengths.csv")
    token_histogram = Location("reports/token_lengths.png")
    # train_qlora
    accelerate_configs = Location("configs/accelerate")
    adapter = Location("models/adapter")
    train_metrics = Location("metrics/train.json")
    loss_plot = Location("plots/loss.csv")
    loss_chart = Location("reports/loss_curve.png")
    train_samples = Location("reports/train_samples.jsonl")
    train_scratch = Location(".cache/train_qlora")  # the Trainer's checkpoints: not a DVC output
    # evaluate_adapter
    eval_metrics = Location("metrics/eval.json")
    predictions = Location("eval/predictions.jsonl")
    predictions_plot = Location("plots/predictions.csv")
    scatter_chart = Location("reports/scatter.png")
    # export_hub
    export = Location("export")
    # record_run
    run_record = Location("reports/mlflow_run.json")
    # flows: one retrain at a time per workspace
    workspace_lock = Location(".cache/retrain.lock")
    # the default MLflow store
    mlflow_db = Location("mlflow.db")
    mlflow_artifacts = Location("mlartifacts")

    def split(self, name: str) -> Path:
        """data/splits/<name>.jsonl for name in train, val, test."""
        return self.splits / f"{name}.jsonl"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
