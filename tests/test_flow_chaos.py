"""A retrain killed with SIGKILL at any moment leaves no trace but its cache.

One fresh workspace (the tiny params of `flow_project`) is retrained through the flow and killed, process group
and all, inside each stage in turn and between registering a version and moving its alias; each kill is followed
by a run that goes on from there, and a last run finishes. Then: the outputs equal those of `flow_project`'s
uninterrupted run (file for file, and byte for byte where they hold no times), no half-written file is left, the
registry is consistent (every version's run there, the alias the gate gave on the last run's version), no
MLflow run is left RUNNING (the killed ones KILLED, tagged why), and the Prefect automation of flows/heartbeats.py
marked every killed flow run Crashed.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from stages import STAGES
from tests.flow_workspace import commit, flow, latest_report, new_workspace

HEARTBEAT_SECONDS = 30  # Prefect's minimum
BEFORE_ALIAS = "between registering a version and moving its alias"
KILL_POINTS = (*STAGES, BEFORE_ALIAS)
# Outputs whose bytes hold no times: an uninterrupted run on this machine writes the same.
SAME_BYTES = ("data/splits/train.jsonl", "data/splits/test.jsonl", "models/adapter/adapter_model.safetensors",
              "eval/predictions.jsonl")  # fmt: skip
SITECUSTOMIZE = Path(__file__).parent / "chaos"
# How far into its command each stage is killed: the quick stages at once, the others mid-work; record_run early,
# before it registers anything (a warm record_run registers within 3 s), so the next run reaches BEFORE_ALIAS.
INTO_STAGE_SECONDS = {"train_qlora": 3.0, "evaluate_adapter": 2.0, "record_run": 0.5}


def stage_running(group: int, stage: str) -> bool:
    """Whether the command of `stage` (python -m stages.<stage>) runs in process group `group`."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if f"stages.{stage}" in (process.info["cmdline"] or []) and os.getpgid(process.pid) == group:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def kill_group(group: int, process: subprocess.Popen) -> None:
    """SIGKILL process group `group`, then wait until none of it is left, not even a zombie: DVC takes a pid it
    finds in its lock for a live process, and the system reaps the orphaned ones a moment later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {group} outlived SIGKILL by 30 s")


def retrain_killed_at(root: Path, env: dict, point: str, log: Path) -> None:
    """Start the retrain flow on `root` and kill its whole process group with SIGKILL at `point`: inside the stage's
    own command (INTO_STAGE_SECONDS after it started), or once record_run has registered a version and before it
    moves the alias."""
    marker = root.parent / "version-registered"
    marker.unlink(missing_ok=True)
    extra = {"CHAOS_PAUSE_AFTER_VERSION": str(marker)} if point == BEFORE_ALIAS else {}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows", "--project-dir", str(root)],
            cwd=root, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    reached = (lambda: marker.is_file()) if point == BEFORE_ALIAS else (lambda: stage_running(process.pid, point))
    deadline = time.monotonic() + 300
    while not reached():
        if process.poll() is not None or time.monotonic() > deadline:
            kill_group(process.pid, process)
            raise AssertionError(f"the retrain never reached {point}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    if point != BEFORE_ALIAS:
        time.sleep(INTO_STAGE_SECONDS.get(point, 0))
        assert stage_running(process.pid, point), f"{point} ended before the kill: kill it sooner"
    kill_group(process.pid, process)


def files_under(root: Path, folders: set[str]) -> set[str]:
    return {p.relative_to(root).as_posix() for f in folders for p in (root / f).rglob("*") if p.is_file()}


def flow_runs(root: Path) -> list[dict]:
    """The retrain flow runs on the Prefect server of the current settings that ran on workspace `root`."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return [r for r in await client.read_flow_runs(limit=200) if r.parameters.get("project_dir") == str(root)]

    import asyncio

    return [{"name": r.name, "state": r.state.type.value if r.state else None} for r in asyncio.run(read())]


def test_a_retrain_killed_at_every_stage_ends_as_if_never_killed(flow_project, tiny_model_dir, prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        killed_and_rerun(flow_project, tiny_model_dir, prefect_api, tmp_path)


def killed_and_rerun(flow_project, tiny_model_dir, prefect_api: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flows.heartbeats import ensure_automation

    automation, _ = ensure_automation(HEARTBEAT_SECONDS)
    root = tmp_path / "workspace"
    root.mkdir()
    env = new_workspace(root, tiny_model_dir, prefect_api, overrides={"flow": {"push": False}})
    commit(root, env, "tiny project")
    env = {**env, "PYTHONPATH": os.pathsep.join([str(SITECUSTOMIZE), env.get("PYTHONPATH", "")]),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}  # fmt: skip
    try:
        for point in KILL_POINTS:
            retrain_killed_at(root, env, point, tmp_path / f"killed-at-{point.split()[0]}.log")
        done = flow(root, env)
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("qlora-price").experiment_id])
        deadline = time.monotonic() + HEARTBEAT_SECONDS * 4
        while {r["state"] for r in flow_runs(root)} - {"CRASHED", "COMPLETED"} and time.monotonic() < deadline:
            time.sleep(2)
        states = sorted(r["state"] for r in flow_runs(root))
    finally:
        automation.delete()

    output = done.stdout + done.stderr
    assert "ended without letting go: killed" in output and "as KILLED" in output
    statuses = sorted(run.info.status for run in runs)
    assert statuses == ["FINISHED"] + ["KILLED"] * len(KILL_POINTS), statuses
    for run in runs:
        if run.info.status == "KILLED":
            assert "was gone when retrain flow run" in run.data.tags["orphan.reason"]
    record = yaml.safe_load((root / "reports" / "mlflow_run.json").read_text())
    report = latest_report(env)
    assert "## Runs closed" in report and "| KILLED |" in report

    versions = client.search_model_versions("name = 'qlora-price-adapter'")
    run_ids = {run.info.run_id for run in runs}
    assert all(v.run_id in run_ids for v in versions)  # no version without its run
    assert len(versions) == 1  # the one registered before the kill was redone, not left without an alias
    aliased = client.get_model_version_by_alias("qlora-price-adapter", record["alias"])  # the gate's, as uninterrupted
    assert record["alias"] == yaml.safe_load((flow_project.root / "reports" / "mlflow_run.json").read_text())["alias"]
    assert aliased.run_id == record["run_id"] and client.get_run(record["run_id"]).info.status == "FINISHED"
    assert "was registered by run" in output  # the interrupted registration, named

    uninterrupted = flow_project.root
    lock = yaml.safe_load((uninterrupted / "dvc.lock").read_text())
    folders = {out["path"].split("/")[0] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    assert files_under(root, folders) == files_under(uninterrupted, folders)  # nothing half-written beside
    for name in SAME_BYTES:
        assert (root / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert (
        "up to date"
        in subprocess.run(
            [sys.executable, "-m", "dvc", "status"], cwd=root, env=env, capture_output=True, text=True, check=True
        ).stdout
    )

    assert states == ["COMPLETED"] + ["CRASHED"] * len(KILL_POINTS), states
