"""Helpers for the tests that run the flow end to end in a temporary git repository (test_flow_e2e.py,
test_dvc_remote.py, the sweep tests): build the workspace, run commands and the flow, edit params, read the
flow's report and a sweep's MLflow runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT, write_project

COPIED = (
    "stages",
    "serving",
    "sweeps",
    "flows",
    "configs",
    "dvc.yaml",
    "prefect.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
)


def run(command: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run `command` in `cwd`; with `check`, fail the test with its output when it exits non-zero."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def dvc(args: list[str], root: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], root, env, check)


def flow(root: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m flows` (what `make demo` runs) on the workspace `root`."""
    return run([sys.executable, "-m", "flows", "--project-dir", str(root)], root, env, check)


def workspace_env(root: Path, prefect_api: str | None) -> dict:
    """The environment of the workspace's commands: this interpreter first on PATH, the Prefect server at
    `prefect_api` (none: unset), a git identity, and none of the MLflow/DVC/worker variables a surrounding
    run may have set."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(root / ".prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TQDM_DISABLE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    cleared = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "PIPELINE_STARTED_BY", "PROJECT_DIR")
    for name in (*cleared, "PREFECT_API_URL"):
        env.pop(name, None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def new_workspace(root: Path, tiny_model_dir: Path, prefect_api: str | None, overrides: dict | None = None) -> dict:
    """A git repository in `root` holding the project's code and DVC files, the tiny params (plus
    `overrides`), the tiny base model and a price CSV under `dvc add`, nothing committed; returns its env."""
    for name in COPIED:
        source = REPO_ROOT / name
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    write_project(root, tiny_model_dir, overrides)
    env = workspace_env(root, prefect_api)
    run(["git", "init", "-q"], root, env)
    dvc(["add", "-q", "data/raw/prices.csv"], root, env)  # as the README says
    return env


def commit(root: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", message], root, env)


def set_param(root: Path, section: str, key: str, value) -> None:
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params[section][key] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def latest_report(env: dict, key: str = "retrain-report") -> str:
    """The newest Markdown artifact `key`, read back from the REST API of the Prefect server in `env`'s
    PREFECT_API_URL."""
    query = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    request = urllib.request.Request(
        f"{env['PREFECT_API_URL']}/artifacts/filter",
        data=json.dumps(query).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (artifact,) = json.load(response)
    return artifact["data"]


def sweep_runs(uri: str, sweep_id: str):
    """(client, parent run, child runs) of the sweep in the MLflow store or on the tracking server at `uri`."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qlora-price")
    runs = client.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{sweep_id}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
