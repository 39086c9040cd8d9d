"""A sweep across two "machines" (sweep.backend: prefect, sweeps/workers.py): two Prefect workers, each in its own
clone in its own folder, a bare Git repository and a local-folder DVC remote between them and the coordinator,
and the MLflow and Prefect servers on PostgreSQL (team_servers). The 2 x 2 sweep of tiny trials must run on
both workers and land as four experiments in the coordinator's `dvc exp show` and four child runs in MLflow,
with the gate applied once and the champion downloadable through the server. The same trial again is reused
from the run cache the first sweep pushed, and a trial that fails stops nothing and is named in the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.common.errors import ConfigError, StageError
from sweeps.queue import FAILED, QUEUED, SUCCESS
from sweeps.workers import FINAL_TYPES, NO_WORKER_SECONDS, TRIAL_STATES, WorkerPool, read_deployment
from tests.flow_workspace import dvc, latest_report, run, set_param, sweep_runs
from tests.sweep_machines import DEFAULT_MODULES, GRID, MODEL, run_sweep, sweep_machines


def test_every_prefect_state_is_a_trial_state():
    from prefect.client.schemas.objects import StateType

    assert {state.value for state in StateType} == set(TRIAL_STATES)
    assert set(FINAL_TYPES) == {s for s, trial in TRIAL_STATES.items() if trial in (SUCCESS, FAILED)}


def test_trials_no_worker_picks_up_are_said_once_with_the_command_that_starts_one(monkeypatch, capsys, tmp_path):
    import time
    from types import SimpleNamespace

    scheduled = SimpleNamespace(state_type=SimpleNamespace(value="SCHEDULED"))
    monkeypatch.setattr(WorkerPool, "flow_run", lambda self, name: scheduled)
    pool = WorkerPool(tmp_path, {}, "s", "sweep-trial/worker-trial", "origin", None, {}, pool="trial-pool")
    pool.flow_runs = {"s-01": "id"}
    pool.waiting_since = time.monotonic() - NO_WORKER_SECONDS - 1
    assert pool.states() == {"s-01": QUEUED} and pool.states() == {"s-01": QUEUED}
    said = capsys.readouterr().out
    assert said.count("no worker of work pool trial-pool has picked up a trial") == 1 and "make trial-worker" in said


def test_trials_on_workers_need_a_tracking_server(tmp_path):
    from flows.sweep import trial_backend
    from stages.common.config import params_from_dict
    from stages.common.paths import Paths

    params = params_from_dict({"sweep": {"backend": "prefect"}})
    trial_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with pytest.raises(StageError, match="only this machine opens; point MLFLOW_TRACKING_URI at a tracking server"):
        trial_backend(Paths.at(tmp_path), params, "sweep-x", trial_env, jobs=1)
    secret = {"MLFLOW_TRACKING_URI": "https://bot:s3cret@mlflow.example"}  # a flow-run parameter Prefect keeps
    with pytest.raises(StageError, match=r"https://bot:\*\*\*@mlflow.example holds a password") as refused:
        trial_backend(Paths.at(tmp_path), params, "sweep-x", secret, jobs=1)
    assert "s3cret" not in str(refused.value)


def test_a_missing_trial_deployment_names_the_make_targets(prefect_api, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with pytest.raises(StageError, match="no deployment 'sweep-trial/absent'; create it with `make deploy-trials`"):
        read_deployment("sweep-trial/absent")


def test_the_trial_deployment_is_named_flow_slash_deployment():
    from stages.common.config import params_from_dict

    with pytest.raises(ConfigError, match=r"sweep.deployment: expected <flow name>/<deployment name>"):
        params_from_dict({"sweep": {"deployment": "worker-trial"}})


@pytest.fixture(scope="module")
def machines(team_servers, tmp_path_factory, tiny_model_dir):
    with sweep_machines(tmp_path_factory.mktemp("machines"), team_servers, tiny_model_dir, workers=2) as machines:
        yield machines


@pytest.fixture(scope="module")
def first_sweep(machines):
    done, seconds, folder = run_sweep(machines)
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
        _, _, folder = run_sweep(machines)
    finally:
        run(["git", "checkout", "--", "params.yaml"], root, machines.env)
    markdown = (folder / "report.md").read_text()
    assert "1 of 2 trials succeeded" in markdown, markdown
    assert f"**{folder.name}-02** (learning_rate=0.003 r=4 target_modules=['nope']) failed" in markdown
    assert "nope" in markdown.split("failed:", 1)[1]  # the worker's own words, from its flow run
    trials = {t["name"]: t for t in json.loads((folder / "trials.json").read_text())}
    _, first_folder = first_sweep
    first = {tuple(t["values"][k] for k in GRID): t for t in json.loads((first_folder / "trials.json").read_text())}
    original = first[(3.0e-3, 4)]["run_id"]
    assert trials[f"{folder.name}-01"]["run_id"] == original  # restored from the pushed run cache, not trained
    _, _, reused = sweep_runs(machines.tracking_uri, folder.name)
    assert [r.data.tags["sweep.reused_run"] for r in reused] == [original] and "| reused |" in markdown
