"""Temporary project workspaces for the end-to-end tests (tests/test_flow_e2e.py, tests/test_scaling_servers.py):
a copy of the project's code in a fresh git repository, with the tiny params, model and price CSV (under
`dvc add`, as the README says), and the environment that runs the flow, DVC and Prefect in it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import REPO_ROOT, write_project

COPIED = (
    "stages",
    "flows",
    "dvc.yaml",
    "prefect.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
)
CLEARED = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "PIPELINE_STARTED_BY", "PROJECT_DIR")


def run(command: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run `command`; with `check`, fail with the end of its output when it exits non-zero."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def project_env(root: Path, prefect_api: str | None = None) -> dict[str, str]:
    """This environment with the venv's bin first on PATH (stage commands call `python` and `dvc`), a
    Prefect home in `root`, the Prefect server at `prefect_api` (if given), a git identity, and no tracking or DVC
    variables inherited from the caller."""
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
    for name in (*CLEARED, "PREFECT_API_URL"):
        env.pop(name, None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def git_project(root: Path, tiny_model_dir: Path, env: dict[str, str]) -> Path:
    """Copy the project's code into `root`, add the tiny params, model and CSV, `dvc add` the CSV and
    commit everything: a workspace the flow can retrain."""
    for name in COPIED:
        source = REPO_ROOT / name
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    write_project(root, tiny_model_dir)
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/prices.csv"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project"], root, env)
    return root


def latest_report(prefect_api: str) -> str:
    """The newest `retrain-report` Markdown artifact, read back from the Prefect server's REST API."""
    query = {"artifacts": {"key": {"any_": ["retrain-report"]}}, "sort": "CREATED_DESC", "limit": 1}
    request = urllib.request.Request(
        f"{prefect_api}/artifacts/filter",
        data=json.dumps(query).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (artifact,) = json.load(response)
    return artifact["data"]
