"""Where every stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Paths:
        return cls(Path(root).resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # base_model
    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    # split_data
    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.jsonl"

    @property
    def data_metrics(self) -> Path:
        return self.root / "metrics" / "data.json"

    # tokenize_data
    @property
    def tokenized(self) -> Path:
        return self.root / "data" / "tokenized"

    @property
    def token_metrics(self) -> Path:
        return self.root / "metrics" / "tokens.json"

    @property
    def token_lengths_plot(self) -> Path:
        return self.root / "plots" / "token_lengths.csv"

    @property
    def token_histogram(self) -> Path:
        return self.root / "reports" / "token_lengths.png"

    # train_qlora
    @property
    def adapter(self) -> Path:
        return self.root / "models" / "adapter"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "plots" / "loss.csv"

    @property
    def loss_chart(self) -> Path:
        return self.root / "reports" / "loss_curve.png"

    @property
    def train_samples(self) -> Path:
        return self.root / "reports" / "train_samples.jsonl"

    @property
    def train_scratch(self) -> Path:
        """The Trainer's checkpoints: not a DVC output, kept until the stage completes."""
        return self.root / ".cache" / "train_qlora"

    # evaluate_adapter
    @property
    def eval_metrics(self) -> Path:
        return self.root / "metrics" / "eval.json"

    @property
    def predictions(self) -> Path:
        return self.root / "eval" / "predictions.jsonl"

    @property
    def predictions_plot(self) -> Path:
        return self.root / "plots" / "predictions.csv"

    @property
    def scatter_chart(self) -> Path:
        return self.root / "reports" / "scatter.png"

    # export_hub
    @property
    def export(self) -> Path:
        return self.root / "export"

    # record_run
    @property
    def run_record(self) -> Path:
        return self.root / "reports" / "mlflow_run.json"

    # flows: one retrain at a time per workspace
    @property
    def workspace_lock(self) -> Path:
        return self.root / ".cache" / "retrain.lock"

    # tracking
    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"
