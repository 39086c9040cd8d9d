"""The pipeline on shared servers, all on loopback and stopped afterwards: an MLflow tracking server (its runs
and registry in PostgreSQL, artifacts uploaded through it) records a retrain, and a Prefect process worker
runs that retrain as the deployment in prefect.yaml, against a Prefect server whose database is PostgreSQL too.

One retrain serves both tests, to keep the time down: the servers start side by side, the deployment from
prefect.yaml goes on a process work pool, a worker (PROJECT_DIR = the workspace, MLFLOW_TRACKING_URI = the
MLflow server) picks up `prefect deployment run` and runs it to completion. Then the MLflow test reads the
run, an artifact and the registry back through the server, and the worker test checks the flow run, the
deployment and what the stages wrote.
"""

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.servers import background_process
from stages import STAGES
from tests.conftest import REPO_ROOT
from tests.flow_workspace import commit, latest_report, new_workspace, run, workspace_env

POOL = "retrain-pool"
DEPLOYMENT = "worker-retrain"
MODEL = "qlora-price-adapter"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def git_workspace(root, tiny_model_dir) -> None:
    """The tiny project in a git repository, everything committed (the worker's runs change it)."""
    commit(root, new_workspace(root, tiny_model_dir, None), "tiny project")


@pytest.fixture(scope="module")
def servers(team_servers, tmp_path_factory, tiny_model_dir):
    """(Prefect API URL, MLflow tracking URI, MLflow artifacts folder, workspace): the PostgreSQL-backed servers
    of `team_servers` and the workspace (a git repository, tiny project)."""
    root = tmp_path_factory.mktemp("worker-project")
    git_workspace(root, tiny_model_dir)
    return team_servers.prefect_api, team_servers.tracking_uri, team_servers.mlflow_artifacts, root


def api(prefect_api: str, path: str):
    """GET `path` from the Prefect REST API; the decoded JSON answer."""
    with urllib.request.urlopen(f"{prefect_api}{path}", timeout=30) as response:
        return json.load(response)


def wait_for_final_state(prefect_api: str, flow_run_id: str, timeout: float) -> dict:
    """Poll flow run `flow_run_id` until its state is final; the flow run, or an error after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = api(prefect_api, f"/flow_runs/{flow_run_id}")
        if flow_run["state"]["type"] in FINAL_STATES:
            return flow_run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout:.0f} s: {flow_run['state']}")


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory, servers):
    """Create the process pool, start a worker on it (PROJECT_DIR = the workspace), deploy prefect.yaml while
    the worker starts, run the deployment and wait for a final state. (workspace, flow run, worker log)."""
    prefect_api, mlflow_uri, _, root = servers
    env = {**workspace_env(root, prefect_api), "MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    started = time.monotonic()
    run([*prefect, "work-pool", "create", POOL, "--type", "process"], root, env)
    worker = [*prefect, "worker", "start", "--pool", POOL, "--type", "process"]
    worker_log = tmp_path_factory.mktemp("worker") / "worker.log"
    with background_process(worker, {**env, "PROJECT_DIR": str(root)}, worker_log):
        run([*prefect, "deploy", "--name", DEPLOYMENT], root, env)
        triggered = run([*prefect, "deployment", "run", f"retrain/{DEPLOYMENT}"], root, env).stdout
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered).group(1)
        flow_run = wait_for_final_state(prefect_api, flow_run_id, timeout=600)
    log = worker_log.read_text(errors="replace")
    seconds, in_flow = time.monotonic() - started, flow_run["total_run_time"]
    print(f"pool, worker, deploy and the deployment run: {seconds:.1f} s; the flow run itself {in_flow:.1f} s")
    print(next((line for line in log.splitlines() if "stage times" in line), "no stage times in the worker log"))
    return root, flow_run, log


def test_mlflow_server_holds_the_run_its_artifacts_and_the_registry(worker_run, servers, monkeypatch, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    root, flow_run, log = worker_run
    _, uri, server_artifacts, _ = servers
    assert flow_run["state"]["type"] == "COMPLETED", log[-4000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("qlora-price")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    run_id, data = mlflow_run.info.run_id, mlflow_run.data
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert data.params["lora.r"] == "4" and data.params["train.learning_rate"] == "0.003"
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert data.metrics["eval/adapter.avg_error"] == pytest.approx(evaluation["adapter"]["avg_error"])
    history = client.get_metric_history(run_id, "curves/val_loss")
    assert len(history) >= 2 and all(point.timestamp > 0 for point in history)  # streamed live by train_qlora

    adapter = (root / "models" / "adapter" / "adapter_model.safetensors").read_bytes()
    downloaded = client.download_artifacts(run_id, "adapter/adapter_model.safetensors", str(tmp_path))
    assert Path(downloaded).read_bytes() == adapter
    stored = list(server_artifacts.rglob("adapter_model.safetensors"))  # the server's store
    assert len(stored) == 2 and all(file.read_bytes() == adapter for file in stored)  # the run's and the model's

    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["run_id"] == run_id and record["tracking_uri"] == uri and record["version"] == "1"
    version = client.get_model_version_by_alias(MODEL, record["alias"])
    assert version.version == "1" and version.run_id == run_id
    model_id = data.tags["model.uri"].removeprefix("models:/")
    assert version.source == client.get_logged_model(model_id).artifact_location  # the logged MLflow Model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as the README's recipe: the registry is the server's too
    champion_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@{record['alias']}"))
    assert (champion_dir / "artifacts" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (champion_dir / "MLmodel").is_file()  # an MLflow Model, as `mlflow models serve` takes it

    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()  # nothing stored locally
    assert data.tags["prefect.flow_run_id"] == flow_run["id"] and data.tags["prefect.deployment"] == DEPLOYMENT
    page = f"{uri}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
    assert f"on the tracking server: {page}" in latest_report(
        {"PREFECT_API_URL": servers[0]}
    )  # the report links the server


def test_process_worker_runs_the_deployment_to_completion(worker_run, servers):
    prefect_api = servers[0]
    root, flow_run, log = worker_run
    assert flow_run["state"]["type"] == "COMPLETED", log[-4000:]
    deployment = api(prefect_api, f"/deployments/name/retrain/{DEPLOYMENT}")
    assert flow_run["deployment_id"] == deployment["id"] and deployment["work_pool_name"] == POOL
    assert api(prefect_api, f"/work_pools/{POOL}")["type"] == "process"
    pull = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $PROJECT_DIR }}"  # resolved from the worker's environment at run time
    assert deployment["global_concurrency_limit"]["limit"] == 1  # prefect.yaml's concurrency_limit
    assert flow_run["id"] in log  # this worker ran it

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)  # every stage ran through DVC in the workspace
    assert (root / "export" / "adapter_model.safetensors").is_file()
    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["started_by"] == "prefect"
    report = latest_report({"PREFECT_API_URL": prefect_api})
    assert "Retrain report: retrained" in report and record["run_id"] in report


def test_prefect_yaml_schedule_is_the_params_schedule():
    deployment = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"][0]
    flow_params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["flow"]
    (schedule,) = deployment["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (flow_params["schedule"], flow_params["timezone"])
    assert deployment["entrypoint"] == "flows/retrain.py:retrain" and deployment["work_pool"]["name"] == POOL
