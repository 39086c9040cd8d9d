"""Recording one pipeline execution as one MLflow run: params, metrics, loss curve, artifacts, lineage.

`record_pipeline_run(paths, params, started_by)` reads what the stages wrote (metrics/*.json,
plots/loss.csv, models/adapter/, reports/*.png, export/README.md) and dvc.lock, so a stage that DVC
skipped still has its metrics recorded. The store is `tracking.tracking_uri`, else MLFLOW_TRACKING_URI,
else sqlite:///<project>/mlflow.db; artifacts of a new experiment go to <project>/mlartifacts/.
MLflow is imported only inside these functions, so stages run without it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml

from stages.core.config import Params, flatten
from stages.core.io import read_json
from stages.core.paths import Paths

MAX_PARAM_LENGTH = 250  # MLflow rejects longer parameter values
METRIC_FILES = ("data_metrics", "token_metrics", "train_metrics", "eval_metrics")
LOSS_COLUMNS = ("train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_seen")


def tracking_uri(paths: Paths, params: Params) -> str:
    return params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db}"


def numeric_leaves(data: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics into {"a.b": number}, keeping numbers only (booleans and strings dropped)."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(numeric_leaves(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def git_tags(root: Path) -> dict[str, str]:
    """The commit the workspace is at and whether it has uncommitted changes ("unknown" outside git)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def dvc_lock_tags(root: Path) -> dict[str, str]:
    """Lineage from dvc.lock: the md5 of every stage output and a digest of each stage's params."""
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    tags = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            tags[f"dvc.out.{out['path']}"] = out.get("md5", "")
        if entry.get("params"):
            digest = hashlib.sha256(json.dumps(entry["params"], sort_keys=True).encode()).hexdigest()[:16]
            tags[f"dvc.params.{stage}"] = digest
    return tags


def loss_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step series from plots/loss.csv: {column: [(step, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = {c: [] for c in LOSS_COLUMNS}
    if not path.is_file():
        return series
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for column in LOSS_COLUMNS:
                if row.get(column) not in (None, ""):
                    series[column].append((int(row["step"]), float(row[column])))
    return series


def log_step_metrics(client, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
    from mlflow.entities import Metric

    metrics = [
        Metric(key=name, value=value, timestamp=0, step=step)
        for name, points in series.items()
        for step, value in points
    ]
    for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def experiment_id(client, paths: Paths, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=paths.mlflow_artifacts.as_uri())


CHAMPION_ALIAS = "champion"
TEST_HASH_TAG = "data.test_sha256"


def test_set_hash(paths: Paths) -> str | None:
    """The sha256 of the test split, from metrics/data.json (None before split_data has run)."""
    return read_json(paths.data_metrics)["test"]["sha256"] if paths.data_metrics.is_file() else None


def champion_metrics(paths: Paths, params: Params) -> dict[str, float] | None:
    """The evaluation metrics of the registry's `champion` version of `tracking.registered_model`, when
    it exists and was scored on the same test set (same sha256) as this workspace; else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri(paths, params))
    try:
        version = client.get_model_version_by_alias(params.tracking.registered_model, CHAMPION_ALIAS)
    except MlflowException:
        return None  # no registered model, or no champion yet
    run = client.get_run(version.run_id)
    if run.data.tags.get(TEST_HASH_TAG) != test_set_hash(paths):
        print(f"champion (version {version.version}) was scored on another test set; not compared")
        return None
    prefix = "eval.adapter."
    return {key.removeprefix(prefix): value for key, value in run.data.metrics.items() if key.startswith(prefix)}


def record_pipeline_run(
    paths: Paths, params: Params, started_by: str, run_name: str | None = None, extra_metrics: dict | None = None
) -> str:
    """Log this pipeline execution as one MLflow run (plus `extra_metrics`, e.g. stage times); return its id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(paths, params))
    tags = {"started_by": started_by, **git_tags(paths.root), **dvc_lock_tags(paths.root)}
    test_hash = test_set_hash(paths)
    if test_hash:
        tags[TEST_HASH_TAG] = test_hash
    run = client.create_run(experiment_id(client, paths, params.tracking.experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        for key, value in flatten(params).items():
            client.log_param(run_id, key, str(value)[:MAX_PARAM_LENGTH])
        for attribute in METRIC_FILES:
            path = getattr(paths, attribute)
            if path.is_file():
                for key, value in numeric_leaves(read_json(path), f"{path.stem}.").items():
                    client.log_metric(run_id, key, value)
        for key, value in (extra_metrics or {}).items():
            client.log_metric(run_id, key, value)
        log_step_metrics(client, run_id, loss_history(paths.loss_plot))
        client.log_artifact(run_id, str(paths.params))
        for folder, destination in ((paths.adapter, "adapter"), (paths.root / "reports", "plots")):
            if folder.is_dir():
                client.log_artifacts(run_id, str(folder), destination)
        for file in (paths.export / "README.md", paths.predictions, paths.root / "dvc.lock"):
            if file.is_file():
                client.log_artifact(run_id, str(file), "model_card" if file.name == "README.md" else None)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
