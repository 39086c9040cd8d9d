"""Recording one pipeline execution as one MLflow run: params, metrics, loss curve, artifacts, lineage.

`record_pipeline_run(paths, params, started_by)` reads what the stages wrote (METRIC_FILES, CHARTS and
RECORDED below) and dvc.lock, so a stage that DVC skipped still has its metrics recorded. The store is the
one stages/tracking/store.py names; artifacts of a new experiment go to <project>/mlartifacts/, or, with a
tracking server (MLFLOW_TRACKING_URI=http://...), wherever that server stores them (uploaded through it).
MLflow is imported only inside these functions.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from stages.common.config import Params, flatten
from stages.common.io import read_json, read_jsonl
from stages.common.paths import Paths
from stages.common.rows import key_digest, row_key
from stages.tracking.gate import Provenance
from stages.tracking.names import adapter_test_metrics, curve
from stages.tracking.orphans import origin_tags
from stages.tracking.registry import (
    MEMBERSHIP_TAG,
    PER_ITEM_ARTIFACT,
    PER_ITEM_TAG,
    TEST_HASH_TAG,
    TRAINED_ON_ARTIFACT,
    TRAINED_ON_TAG,
    champion_run,
)
from stages.tracking.store import client_for, is_server, store_root

MAX_PARAM_LENGTH = 250  # MLflow rejects longer parameter values
METRIC_FILES = (Paths.data_metrics, Paths.token_metrics, Paths.train_metrics, Paths.eval_metrics)
CHARTS = (Paths.token_histogram, Paths.loss_chart, Paths.scatter_chart)
# What a run records besides metrics and charts: the loss curve, the adapter, the predictions, the export.
RECORDED = (Paths.loss_plot, Paths.adapter, Paths.predictions, Paths.export)
DATA_VERSION_ARTIFACT = "data_version"  # the run's copies of the raw data's .dvc files: which version it read
LOSS_COLUMNS = ("train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_seen")
# What a run's Source column says, by how the run started (record_run's `started_by`).
SOURCES = {
    "prefect": "flows/retrain.py (Prefect flow retrain)",
    "sweep": "flows/sweep.py (Prefect flow sweep)",
    "dvc repro": "dvc.yaml (dvc repro)",
    "dvc exp run": "dvc.yaml (dvc exp run)",
}
# The experiment kind MLflow 3's UI opens as a model-training experiment (runs table, charts, compare), not as a
# GenAI one (traces, evaluation runs, judges).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "dvc", "mlflow", "prefect")


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
    """The commit the workspace is at and whether it has uncommitted changes ("unknown" outside git), as the
    project's own tags and as MLflow's standard source tags (the UI's Source column links the commit)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    tags = {"git.commit": commit, "git.dirty": str(bool(dirty)).lower(), "mlflow.source.git.commit": commit}
    branch, remote = git("rev-parse", "--abbrev-ref", "HEAD"), git("remote", "get-url", "origin")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    if remote:
        tags["mlflow.source.git.repoURL"] = without_credentials(remote)
    return tags


def without_credentials(url: str) -> str:
    """A git remote's URL without the user and token an https remote may hold (https://TOKEN@host/x)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def source_tags(started_by: str) -> dict[str, str]:
    """MLflow's standard tags for who ran what: the UI's User and Source columns."""
    import getpass

    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": SOURCES.get(started_by, started_by),
            "mlflow.user": getpass.getuser()}  # fmt: skip


def dvc_lock_tags(root: Path) -> dict[str, str]:
    """Lineage from dvc.lock: the md5 of every stage's deps and outputs, and a digest of its params."""
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    tags = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            tags[f"dvc.out.{out['path']}"] = out.get("md5", "")
        for dep in entry.get("deps") or []:
            tags[f"dvc.dep.{stage}.{dep['path']}"] = dep.get("md5", "")
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


def log_in_batches(client, run_id: str, metrics: list) -> None:
    for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def log_metrics(client, run_id: str, values: dict[str, float]) -> None:
    """Log {name: value} in one request rather than one per metric."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    log_in_batches(client, run_id, [Metric(key=k, value=v, timestamp=now, step=0) for k, v in values.items()])


def log_step_metrics(client, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """Log per-step series as curves/<column>, skipping any the run already has (streamed live by train_qlora)."""
    from mlflow.entities import Metric

    metrics = [
        Metric(key=curve(name), value=value, timestamp=0, step=step)
        for name, points in series.items()
        if points and not client.get_metric_history(run_id, curve(name))
        for step, value in points
    ]
    log_in_batches(client, run_id, metrics)


def experiment_id(client, paths: Paths, name: str) -> str:
    """The id of experiment `name`, created when missing. A tracking server chooses the artifact location
    of a new experiment itself (proxied `mlflow-artifacts:/`, stored where `--artifacts-destination`
    says); a store opened directly gets <project>/mlartifacts/ rather than a folder under the cwd."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if not any(key in experiment.tags for key in EXPERIMENT_KIND):  # made before the kind was set
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    if is_server(client.tracking_uri):
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    artifacts = store_root(paths) / paths.mlflow_artifacts.name
    return client.create_experiment(name, artifact_location=artifacts.as_uri(), tags=EXPERIMENT_KIND)


def library_tags() -> dict[str, str]:
    """The versions of the libraries that shape a run's result."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for package in LIBRARIES:
        try:
            tags[f"lib.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"lib.{package}"] = "not installed"
    return tags


def test_set_hash(paths: Paths) -> str | None:
    """The sha256 of the test split, from metrics/data.json (None before split_data has run)."""
    return read_json(paths.data_metrics)["test"]["sha256"] if paths.data_metrics.is_file() else None


def trained_on(paths: Paths) -> frozenset[str] | None:
    """The key digests of the rows this workspace's adapter saw in training (train and val splits; val too,
    because it steered training), or None before split_data has run."""
    if not (paths.split("train").is_file() and paths.split("val").is_file()):
        return None
    return frozenset(key_digest(row_key(row)) for name in ("train", "val") for row in read_jsonl(paths.split(name)))


def workspace_test_set(paths: Paths) -> Provenance:
    """What this workspace's adapter was scored and trained on (stages/tracking/gate.py Provenance)."""
    data = read_json(paths.data_metrics) if paths.data_metrics.is_file() else {}
    membership = data.get("membership", {}).get("fingerprint")
    return Provenance(data.get("test", {}).get("sha256"), membership, trained_on(paths))


def champion_metrics(paths: Paths, params: Params) -> dict[str, float] | None:
    """The evaluation metrics of the registry's `champion` version of `tracking.registered_model`, when
    it exists and was scored on the same test set (same sha256) as this workspace; else None."""
    found = champion_run(client_for(paths, params), params.tracking.registered_model)
    if found is None:
        return None
    version, run = found
    if run.data.tags.get(TEST_HASH_TAG) != test_set_hash(paths):
        print(
            f"champion (version {version.version}) was scored on another test set: its logged metrics are left out "
            "of the table; the gate compares it on shared or re-scored items"
        )
        return None
    return adapter_test_metrics(run.data.metrics)


def params_in_lock(text: str | None) -> dict[str, object] | None:
    """{"section.key": value} of the params a dvc.lock's text recorded (None without one)."""
    if not text:
        return None
    recorded: dict[str, object] = {}
    for entry in (yaml.safe_load(text) or {}).get("stages", {}).values():
        for values in (entry.get("params") or {}).values():
            for name, value in values.items():  # a whole section ("train": {...}) or one key ("data.source")
                if isinstance(value, dict):
                    recorded.update({f"{name}.{key}": item for key, item in value.items()})
                else:
                    recorded[name] = value
    return recorded


def run_name(started_by: str, lock_text: str | None, current: dict[str, object]) -> str:
    """A run name that says what was tried: the params (`current`, "section.key": value) that differ from those a
    dvc.lock recorded (`lock_text`: the last run's), else that the data or code changed, or that it is the first:
    "retrain: learning_rate=0.002"."""
    recorded = params_in_lock(lock_text)
    if recorded is None:
        return f"{started_by}: first run"
    changed = [
        f"{key.rsplit('.', 1)[-1]}={current[key]}"
        for key in recorded
        if current.get(key, recorded[key]) != recorded[key]
    ]
    return f"{started_by}: {', '.join(changed) if changed else 'data or code changed'}"


def committed_lock(root: Path) -> str | None:
    """The text of dvc.lock at the last commit: the run a `dvc repro` is compared with (None outside git)."""
    done = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def start_pipeline_run(
    paths: Paths, params: Params, started_by: str, run_name: str | None = None, tags: dict | None = None
) -> str:
    """Open an MLflow run for one pipeline execution, tagged with how it started, who opened it (so a later retrain
    can close it if this process dies: stages/tracking/orphans.py) and `tags`; return its id. Stages log into it
    while they run when its id is in $MLFLOW_RUN_ID."""
    client = client_for(paths, params)
    tags = {
        "started_by": started_by,
        **source_tags(started_by),
        **git_tags(paths.root),
        **library_tags(),
        **origin_tags(store_root(paths)),
        **(tags or {}),
    }
    run = client.create_run(experiment_id(client, paths, params.tracking.experiment), run_name=run_name, tags=tags)
    return run.info.run_id


def record_pipeline_run(
    paths: Paths,
    params: Params,
    started_by: str,
    run_id: str | None = None,
    run_name: str | None = None,
    extra_metrics: dict | None = None,
    tags: dict | None = None,
) -> str:
    """Log this pipeline execution into run `run_id` (or a new run): params, every metric the stages wrote,
    the loss curve, the adapter, charts and model card, and lineage tags (git, dvc.lock hashes, test-set
    hash, library versions). A run this call created is ended here; an adopted one stays open for its
    owner. Returns the run id."""
    client = client_for(paths, params)
    created = run_id is None
    if created:
        run_id = start_pipeline_run(paths, params, started_by, run_name, tags)
    try:
        log_execution(client, run_id, paths, params, extra_metrics or {})
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def log_splits(client, run_id: str, paths: Paths, source: str) -> None:
    """The train/val/test splits as the run's MLflow dataset inputs (the UI's Dataset column): named after the
    data source, with the split as context, their sha256 (from metrics/data.json) as digest and row counts."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if not paths.data_metrics.is_file():
        return
    data = read_json(paths.data_metrics)
    origin = Path(source.split(":", 1)[-1]).stem
    inputs = [
        DatasetInput(
            Dataset(
                name=f"{origin}-{split}",
                digest=data[split]["sha256"][:16],
                source_type="local",
                source=json.dumps({"uri": paths.split(split).relative_to(paths.root).as_posix(), "origin": source}),
                profile=json.dumps({"num_rows": data[split].get("n")}),
            ),
            tags=[InputTag("mlflow.data.context", split)],
        )
        for split in ("train", "val", "test")
        if split in data
    ]
    log_inputs_once_stored(client, run_id, inputs)


def log_inputs_once_stored(client, run_id: str, inputs: list, attempts: int = 3) -> None:
    """`client.log_inputs(run_id, datasets=inputs)`, again when it collided with another run's. MLflow's SQL
    store looks up which datasets exist, then inserts the others: two runs logging the same new dataset at the
    same moment (a sweep's trials, which share their splits, finishing together on a PostgreSQL-backed server)
    both insert it, and the second fails on the dataset's unique key. On the next attempt the dataset exists
    and is only linked to the run."""
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as exc:
            collided = any(word in str(exc) for word in ("UniqueViolation", "UNIQUE constraint", "Duplicate entry"))
            if not collided or attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


def params_sections(params: Params) -> dict:
    """The params sections this run was handed, as params.yaml holds them (the full text of every value that
    the flattened MLflow params may cut at 250 characters)."""
    import dataclasses

    from stages.common.config import Undeclared

    return {
        section.name: dataclasses.asdict(getattr(params, section.name))
        for section in dataclasses.fields(params)
        if not isinstance(getattr(params, section.name), Undeclared)
    }


def log_data_version(client, run_id: str, paths: Paths) -> None:
    """The `.dvc` files under data/raw (a file or a delivery folder under `dvc add`), under data_version/ at
    their place in the workspace: `dvc checkout` of one of them gives back the raw data this run read, from the
    DVC cache or, after `dvc pull`, the remote (docs/pipeline.md)."""
    for pointer in sorted(paths.raw_dir.rglob("*.dvc")):
        folder = pointer.parent.relative_to(paths.root).as_posix()
        client.log_artifact(run_id, str(pointer), f"{DATA_VERSION_ARTIFACT}/{folder}")


def log_execution(client, run_id: str, paths: Paths, params: Params, extra_metrics: dict) -> None:
    tags = {**git_tags(paths.root), **dvc_lock_tags(paths.root)}
    test = workspace_test_set(paths)
    if test.sha256:
        tags[TEST_HASH_TAG] = test.sha256
    if test.membership:
        tags[MEMBERSHIP_TAG] = test.membership
    if test.trained_on is not None:  # what the gate checks a later comparison against
        client.log_text(run_id, "".join(f"{digest}\n" for digest in sorted(test.trained_on)), TRAINED_ON_ARTIFACT)
        tags[TRAINED_ON_TAG] = TRAINED_ON_ARTIFACT
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for key, value in flatten(params).items():
        client.log_param(run_id, key, str(value)[:MAX_PARAM_LENGTH])
    values = dict(extra_metrics)
    for location in METRIC_FILES:
        path = location.at(paths)
        if path.is_file():
            values.update(numeric_leaves(read_json(path), f"{path.stem}/"))
    log_metrics(client, run_id, values)
    log_step_metrics(client, run_id, loss_history(paths.loss_plot))
    log_splits(client, run_id, paths, params.data.source)
    client.log_text(run_id, yaml.safe_dump(params_sections(params), sort_keys=False), "params.yaml")
    if paths.adapter.is_dir():
        client.log_artifacts(run_id, str(paths.adapter), "adapter")
    for chart in CHARTS:
        if chart.at(paths).is_file():
            client.log_artifact(run_id, str(chart.at(paths)), "plots")
    if paths.predictions.is_file():  # the per-item results a later candidate is compared with
        client.log_artifact(run_id, str(paths.predictions), PER_ITEM_ARTIFACT.rsplit("/", 1)[0])
        client.set_tag(run_id, PER_ITEM_TAG, PER_ITEM_ARTIFACT)
    log_data_version(client, run_id, paths)
    for file in (paths.export / "README.md", paths.root / "dvc.lock"):
        if file.is_file():
            client.log_artifact(run_id, str(file), "model_card" if file.name == "README.md" else None)
