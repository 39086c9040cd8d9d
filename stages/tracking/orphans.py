"""MLflow runs whose process died: who opened each run, and closing the ones left RUNNING by a process that is gone.

A process killed with SIGKILL (the OOM killer, a lost machine, `kill -9`) runs no exit hook, so the MLflow run it
had open stays RUNNING forever: in the UI it looks like a retrain still in progress. Every run this project opens
carries `origin_tags`: the host, the workspace (the store root: under `dvc exp run --queue` the workspace in
$DVC_ROOT) and the pid and start time of the process that opened it. `close_orphaned_runs`, called by the retrain
and sweep flows once they hold the workspace lock, finds this workspace's RUNNING runs on this host whose process
is gone (no such pid, a zombie, or the pid now belongs to a process started at another time) and closes them:
KILLED, or FINISHED for the run that record_run had already recorded in full (its process died in the flow's last
steps), tagged with why (`orphan.*`). A run of a live process, of another workspace or of another host is never
touched (another host's runs are closed by the next retrain there). MLflow is imported by the client handed in.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

HOST_TAG = "origin.host"
WORKSPACE_TAG = "origin.workspace"
PID_TAG = "origin.pid"
PROCESS_STARTED_TAG = "origin.process_started"  # the opener's start time, epoch seconds: a reused pid is not it
CLOSED_AT_TAG = "orphan.closed_at"
CLOSED_BY_TAG = "orphan.closed_by"
REASON_TAG = "orphan.reason"
SAME_PROCESS_SECONDS = 1.0  # start times within this are the same process (psutil rounds them differently)


@cache
def process_started(pid: int) -> float:
    """The start time of process `pid` (epoch seconds)."""
    import psutil

    return psutil.Process(pid).create_time()


def origin_tags(workspace: Path) -> dict[str, str]:
    """The tags naming who opens a run now: this host, `workspace`, this process's pid and start time."""
    pid = os.getpid()
    return {
        HOST_TAG: socket.gethostname(),
        WORKSPACE_TAG: str(Path(workspace).resolve()),
        PID_TAG: str(pid),
        PROCESS_STARTED_TAG: f"{process_started(pid):.2f}",
    }


def process_alive(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs (a zombie has ended; a pid reused by a
    process started at another time is another process). One we may not inspect counts as alive."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - started) < SAME_PROCESS_SECONDS
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@dataclass(frozen=True)
class Closed:
    """A run closed because its process was gone: its id, name, the status it was given and why."""

    run_id: str
    name: str
    status: str
    reason: str


def orphan_of(run, workspace: str, host: str) -> str | None:
    """Why `run` is an orphan of `workspace` on `host` (its process is gone), or None: another workspace's or
    host's run, one opened before runs carried their origin, or one whose process still runs."""
    tags = run.data.tags
    if tags.get(WORKSPACE_TAG) != workspace or tags.get(HOST_TAG) != host:
        return None
    try:
        pid, started = int(tags[PID_TAG]), float(tags[PROCESS_STARTED_TAG])
    except (KeyError, ValueError):
        return None
    if process_alive(pid, started):
        return None
    since = datetime.fromtimestamp(started, tz=UTC).isoformat(timespec="seconds")
    return f"its process (pid {pid} on {host}, started {since}) was gone"


def close_orphaned_runs(
    client, experiment: str, workspace: Path, closer: str, recorded_run: str | None
) -> list[Closed]:
    """Close the RUNNING runs of experiment `experiment` that a gone process of `workspace` on this host left open;
    `closer` says who closes them ("retrain flow run <name>"), `recorded_run` is the run id in the workspace's run
    record (reports/mlflow_run.json): record_run recorded it in full, so it is FINISHED rather than KILLED.
    Returns the runs closed, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host, root = socket.gethostname(), str(Path(workspace).resolve())
    running = client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'RUNNING'",
        order_by=["attributes.start_time ASC"], max_results=1000,
    )  # fmt: skip
    now = datetime.now(UTC).isoformat(timespec="seconds")
    closed = []
    for run in running:
        gone = orphan_of(run, root, host)
        if gone is None:
            continue
        finished = run.info.run_id == recorded_run
        status = "FINISHED" if finished else "KILLED"
        done = "record_run had recorded it in full" if finished else "it never finished"
        reason = f"{gone} when {closer} took the workspace at {now}; {done}"
        for key, value in {CLOSED_AT_TAG: now, CLOSED_BY_TAG: closer, REASON_TAG: reason}.items():
            client.set_tag(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status=status)
        closed.append(Closed(run.info.run_id, run.info.run_name or "", status, reason))
    return closed


def closed_markdown(closed: list[Closed]) -> str:
    """The runs closed, as a report section's body."""
    rows = "\n".join(f"| `{c.run_id}` | {c.name} | {c.status} | {c.reason} |" for c in closed)
    return (
        f"{len(closed)} MLflow run(s) left RUNNING by a process that is gone, closed now:\n\n"
        f"| run | name | closed as | why |\n|---|---|---|---|\n{rows}\n"
    )


def closed_count(client, experiment: str) -> int:
    """How many runs of experiment `experiment` were closed because their process was gone."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{CLOSED_AT_TAG}` != ''", max_results=5000)
    return len(runs)
