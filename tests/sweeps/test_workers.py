"""A sweep across two "machines" (sweep.backend: prefect, sweeps/workers.py): two Prefect workers, each in its own
clone in its own folder, a bare Git repository and a local-folder DVC remote between them and the coordinator,
and the MLflow and Prefect servers on PostgreSQL (team_servers). The 2 x 2 sweep of tiny trials must run on
both workers and land as four experiments in the coordinator's `dvc exp show` and four child runs in MLflow,
with the gate applied once and the champion downloadable through the server. The same trial again is reused
from the run cache the first sweep pushed, and a trial that fails stops nothing and is named in the report.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from infra.servers import background_process
from tests.flow_workspace import commit, dvc, latest_report, new_workspace, run, set_param, workspace_env

POOL, DEPLOYMENT, MODEL = "trial-pool", "worker-trial", "qlora-price-adapter"
GRID = {"train.learning_rate": [3.0e-3, 1.0e-2], "lora.r": [4, 8]}
PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
DEFAULT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]  # params.yaml's lora.target_modules


class Machines(NamedTuple):
    coordinator: Path
    env: dict  # the coordinator's: PREFECT_API_URL and MLFLOW_TRACKING_URI of the shared servers
    clones: list[Path]  # each worker's own clone
    tracking_uri: str


@pytest.fixture(scope="module")
def machines(team_servers, tmp_path_factory, tiny_model_dir):
    """The coordinator's project (committed, pushed to the bare repository, its DVC remote a local folder), the
    trial pool and deployment, and two workers each serving one trial at a time from its own clone."""
    base = tmp_path_factory.mktemp("machines")
    coordinator = base / "coordinator"
    coordinator.mkdir()
    sweep = {"backend": "prefect", "grid": GRID, "fixed": {"train.max_steps": 4}, "register": "best"}
    overrides = {"base_model": {"source": str(tiny_model_dir)}, "sweep": sweep}  # a path every machine reads
    env = new_workspace(coordinator, tiny_model_dir, team_servers.prefect_api, overrides)
    env["MLFLOW_TRACKING_URI"] = team_servers.tracking_uri
    run(["git", "init", "-q", "--bare", str(base / "project.git")], base, env)
    run(["git", "remote", "add", "origin", str(base / "project.git")], coordinator, env)
    dvc(["remote", "add", "-d", "shared", str(base / "dvc-remote")], coordinator, env)
    commit(coordinator, env, "tiny project")
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], coordinator, env)
    run([*PREFECT, "work-pool", "create", POOL, "--type", "process"], coordinator, env)
    run([*PREFECT, "deploy", "--name", DEPLOYMENT], coordinator, env)
    clones = []
    with contextlib.ExitStack() as stack:
        for n in (1, 2):
            clone = base / f"machine-{n}"
            run(["git", "clone", "-q", "-b", "main", str(base / "project.git"), str(clone)], base, env)
            worker_env = {**workspace_env(clone, team_servers.prefect_api), "PROJECT_DIR": str(clone),
                          "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
            worker = [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"]
            log = base / f"worker-{n}.log"
            stack.enter_context(background_process([*worker, "--name", f"machine-{n}"], worker_env, log, cwd=clone))
            clones.append(clone)
        yield Machines(coordinator, env, clones, team_servers.tracking_uri)


def sweep(machines: Machines):
    """`python -m flows.sweep` on the coordinator: (completed process, wall seconds, the report's folder)."""
    root = machines.coordinator
    started = time.monotonic()
    done = run([sys.executable, "-m", "flows.sweep", "--project-dir", str(root)], root, machines.env, check=False)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    folder = max((root / "reports" / "sweeps").iterdir(), key=lambda p: p.stat().st_mtime)
    return done, seconds, folder


def sweep_runs(uri: str, sweep_id: str):
    """(client, parent run, child runs) of the sweep on the tracking server at `uri`."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qlora-price")
    runs = client.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{sweep_id}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.fixture(scope="module")
def first_sweep(machines):
    done, seconds, folder = sweep(machines)
    print(f"2 x 2 sweep on two workers: {seconds:.1f} s")
    return done, folder


def test_a_two_by_two_sweep_runs_on_both_workers_and_lands_on_the_coordinator(machines, first_sweep, tmp_path):
    import mlflow

    done, folder = first_sweep
    sweep_id, root, env = folder.name, machines.coordinator, machines.env
    names = [f"{sweep_id}-0{i}" for i in range(1, 5)]

    shown = json.loads(dvc(["exp", "show", "--json"], root, env).stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for row in shown for e in row.get("experiments") or []}
    assert set(names) <= set(experiments), f"dvc exp show lists {sorted(experiments)}"
    tried = {(experiments[n]["params"]["params.yaml"]["data"]["train"]["learning_rate"],
              experiments[n]["params"]["params.yaml"]["data"]["lora"]["r"]) for n in names}  # fmt: skip
    assert tried == {(lr, r) for lr in GRID["train.learning_rate"] for r in GRID["lora.r"]}
    assert all(experiments[n]["metrics"]["metrics/eval.json"]["data"]["adapter"]["avg_error"] > 0 for n in names)

    client, parent, children = sweep_runs(machines.tracking_uri, sweep_id)
    assert sorted(c.data.tags["dvc.exp_name"] for c in children) == names
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    workspaces = {c.data.tags["origin.workspace"] for c in children}
    assert workspaces == {str(clone) for clone in machines.clones}  # trials ran on both machines

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1 and parent.data.tags["promotion.version"] == versions[0].version  # the gate, once
    alias = parent.data.tags["promotion.alias"]  # champion, or challenger when 4 tiny steps lose to the base
    gated = client.get_model_version_by_alias(MODEL, alias)
    assert gated.run_id in {c.info.run_id for c in children} and alias in ("champion", "challenger")
    mlflow.set_tracking_uri(machines.tracking_uri)
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@{alias}", dst_path=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(None)
    assert (downloaded / "artifacts" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert "4 of 4 trials succeeded" in latest_report(env, "sweep-report")
    assert "as flow runs of sweep-trial/worker-trial" in done.stderr  # the flow's log


def test_the_same_trial_is_reused_and_a_failing_one_is_named(machines, first_sweep):
    root = machines.coordinator
    grid = {"train.learning_rate": [3.0e-3], "lora.r": [4], "lora.target_modules": [DEFAULT_MODULES, ["nope"]]}
    set_param(root, "sweep", "grid", grid)
    try:
        _, _, folder = sweep(machines)
    finally:
        run(["git", "checkout", "--", "params.yaml"], root, machines.env)
    markdown = (folder / "report.md").read_text()
    assert "1 of 2 trials succeeded" in markdown, markdown
    assert f"**{folder.name}-02** (learning_rate=0.003 r=4 target_modules=['nope']) failed" in markdown
    assert "nope" in markdown.split("failed:", 1)[1]  # the worker's own words, from its flow run
    trials = {t["name"]: t for t in json.loads((folder / "trials.json").read_text())}
    _, first_folder = first_sweep
    first = {tuple(t["values"][k] for k in GRID): t for t in json.loads((first_folder / "trials.json").read_text())}
    assert trials[f"{folder.name}-01"]["run_id"] == first[(3.0e-3, 4)]["run_id"]  # reused, not trained again
