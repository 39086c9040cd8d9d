"""Closing the MLflow runs a dead process left RUNNING: only this workspace's, on this host, of processes that are
gone; the run record_run had recorded in full is FINISHED, the others KILLED, each tagged with why."""

import subprocess
import sys
from pathlib import Path

from stages.tracking.orphans import (
    PID_TAG,
    PROCESS_STARTED_TAG,
    REASON_TAG,
    WORKSPACE_TAG,
    close_orphaned_runs,
    closed_count,
    closed_markdown,
    origin_tags,
    process_alive,
    process_started,
)


def dead_process() -> tuple[int, float]:
    """The pid and start time of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = process_started(child.pid)
    child.kill()
    child.wait()
    return child.pid, started


def test_a_process_is_alive_only_while_it_runs_and_only_as_itself():
    pid, started = dead_process()
    assert not process_alive(pid, started)
    me = origin_tags(Path("."))
    assert process_alive(int(me[PID_TAG]), float(me[PROCESS_STARTED_TAG]))
    assert not process_alive(int(me[PID_TAG]), float(me[PROCESS_STARTED_TAG]) - 60)  # the pid, reused by another


def test_only_runs_of_gone_processes_of_this_workspace_are_closed(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("price", artifact_location=(tmp_path / "artifacts").as_uri())
    here, elsewhere = tmp_path / "workspace", tmp_path / "other"
    pid, started = dead_process()
    dead = {**origin_tags(here), PID_TAG: str(pid), PROCESS_STARTED_TAG: f"{started:.2f}"}

    def run(name: str, tags: dict) -> str:
        return client.create_run(experiment, run_name=name, tags=tags).info.run_id

    killed = run("killed mid-training", dead)
    recorded = run("killed after record_run", dead)
    live = run("this live process", origin_tags(here))
    other = run("another workspace", {**dead, WORKSPACE_TAG: str(elsewhere.resolve())})
    untagged = run("from before runs named their process", {})
    done = run("finished", dead)
    client.set_terminated(done, status="FINISHED")

    closed = close_orphaned_runs(client, "price", here, "retrain flow run test", recorded_run=recorded)

    assert [(c.run_id, c.status) for c in closed] == [(killed, "KILLED"), (recorded, "FINISHED")]
    status = {run_id: client.get_run(run_id).info.status for run_id in (live, other, untagged, done)}
    assert status == {live: "RUNNING", other: "RUNNING", untagged: "RUNNING", done: "FINISHED"}
    reason = client.get_run(killed).data.tags[REASON_TAG]
    assert f"pid {pid}" in reason and "when retrain flow run test took the workspace" in reason
    assert "it never finished" in reason
    assert client.get_run(killed).info.end_time is not None
    assert closed_count(client, "price") == 2
    assert "| `" + killed + "` | killed mid-training | KILLED |" in closed_markdown(closed)
    assert close_orphaned_runs(client, "price", here, "again", recorded_run=None) == []  # nothing left to close
    assert close_orphaned_runs(client, "no such experiment", here, "x", None) == []
