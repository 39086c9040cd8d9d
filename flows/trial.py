"""Prefect flow `sweep-trial`: one trial of a sweep with `sweep.backend: prefect`, run by a worker of the trial
deployment's pool in that worker's clone of the repository (sweeps/workers.py says what a trial does).

flows/sweep.py creates these flow runs; nobody calls this flow by hand. A worker serves it:

    make deploy-trials     # once per Prefect server: the pool and the deployment `sweep-trial/worker-trial`
    make trial-worker      # on each machine, in its own clone: one trial at a time
"""

from __future__ import annotations

from prefect import flow

from flows.workspace import PROJECT_ROOT, stage_environment, workspace_lock
from stages.common.config import load_params
from stages.common.paths import Paths
from sweeps.workers import run_trial


@flow(name="sweep-trial", log_prints=True, flow_run_name="{trial}")
def sweep_trial(
    trial: str,
    arguments: list[str],
    commit: str,
    ref: str,
    git_url: str,
    dvc_remote: str | None,
    environment: dict[str, str],
    project_dir: str = str(PROJECT_ROOT),
) -> dict:
    """Run trial `trial` (`dvc exp run -S ...` with `arguments`) at `commit` (fetched from `ref` of `git_url`)
    in the clone `project_dir`, holding its workspace lock; `environment` reaches the stages (the sweep's
    parent run, the tracking server). Returns where it ran."""
    paths = Paths.at(project_dir)
    wait = load_params(paths.params).flow.lock_wait_seconds
    details = {"trial": trial, "arguments": arguments, "commit": commit, "ref": ref, "git_url": git_url,
               "dvc_remote": dvc_remote}  # fmt: skip
    with workspace_lock(paths, wait, owner=f"sweep trial {trial}"):
        return run_trial(paths.root, details, stage_environment(environment))
