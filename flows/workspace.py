"""What the flows need to know about a project folder: who holds it, and whether DVC has anything to do.

- `workspace_lock(paths, wait_seconds, owner)`: one retrain at a time per workspace. A second one waits up to
  `wait_seconds` for the first, then stops with `WorkspaceBusy` naming the holder (pid, host, start time,
  flow run), so dvc.lock, the DVC cache and mlflow.db only ever have one writer. The lock is an OS file
  lock on .cache/retrain.lock: it dies with its process, so a killed run never leaves a stale lock; the
  holder's record in the file stays, though, which is how the next holder knows the last one was killed
  (`Holding.stale`).
- `close_orphans(paths, params, holding, closer)`: once held, close the MLflow runs that processes of this workspace
  which are gone left RUNNING.
- `pipeline_changes(root)`: `dvc status --json`, i.e. the stages whose data, params or code changed since
  dvc.lock was written; empty when the pipeline is up to date.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stages.common.config import Params
from stages.common.io import read_json
from stages.common.paths import Paths
from stages.tracking.orphans import Closed, close_orphaned_runs
from stages.tracking.store import client_for, store_root

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def command_line(argv: list[str] | None) -> argparse.Namespace:
    """The options of `python -m flows` and `python -m flows.retrain`."""
    parser = argparse.ArgumentParser(
        prog="python -m flows", description="Run the QLoRA pipeline through DVC and record it in MLflow."
    )
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="project root holding dvc.yaml")
    return parser.parse_args(argv)


def stage_environment(extra: dict[str, str]) -> dict[str, str]:
    """The environment for `dvc repro` and `dvc status`: this interpreter's bin folder first, so
    `python -m stages.*` in dvc.yaml runs with the same packages as the flow, plus `extra` (the MLflow run)."""
    env = {**os.environ, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class WorkspaceBusy(RuntimeError):
    """Another retrain holds this workspace."""


class DvcStatusFailed(RuntimeError):
    """`dvc status` could not tell what changed."""


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder_record(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and {"pid", "host", "owner", "since"} <= info.keys() else None


def describe_holder(info: dict | None) -> str:
    """ "pid 12 on host, flow run x, since 2026-..." for a lock file's record (from `Holding.stale`, say)."""
    if info is None:
        return "holder unknown"
    return f"pid {info['pid']} on {info['host']}, {info['owner']}, since {info['since']}"


def _holder(lock_file: Path) -> str:
    try:
        return describe_holder(_holder_record(lock_file.read_text(encoding="utf-8")))
    except OSError:
        return "holder unknown"


@dataclass(frozen=True)
class Holding:
    """What taking the workspace found: whether it had to wait for another holder (what was read of the workspace
    before may then be out of date), and `stale`, the record of a holder that died without letting go (killed:
    its MLflow runs may still say RUNNING), or None."""

    waited: bool
    stale: dict | None


@contextmanager
def workspace_lock(paths: Paths, wait_seconds: float, owner: str):
    """Hold the workspace for one retrain; wait up to `wait_seconds` for another one, then raise WorkspaceBusy.
    Yields a `Holding`."""
    lock_file = paths.workspace_lock
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a+", encoding="utf-8") as handle:
        deadline = time.monotonic() + wait_seconds
        waited = False
        while not _try_lock(handle):
            waited = True
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                raise WorkspaceBusy(
                    f"another retrain is running on {paths.root} ({_holder(lock_file)}){waited}; "
                    "let it finish (or stop it) and run again, or set flow.lock_wait_seconds to wait for it"
                )
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))
        handle.seek(0)
        stale = _holder_record(handle.read())  # a holder that lets go empties the file: this one died
        handle.truncate(0)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": owner, "since": since}))
        handle.flush()
        try:
            yield Holding(waited, stale)
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def close_orphans(paths: Paths, params: Params, holding: Holding, closer: str) -> list[Closed]:
    """Once the workspace is held and the tracking server answered (`require_server`): close the MLflow runs its dead
    processes left RUNNING (stages/tracking/orphans.py), saying so; `closer` names who closes them."""
    if holding.stale:
        print(f"the last holder of {paths.root} ({describe_holder(holding.stale)}) ended without letting go: killed")
    record = read_json(paths.run_record) if paths.run_record.is_file() else {}
    client = client_for(paths, params)
    closed = close_orphaned_runs(client, params.tracking.experiment, store_root(paths), closer, record.get("run_id"))
    for run in closed:
        print(f"closed MLflow run {run.run_id} ({run.name}) as {run.status}: {run.reason}")
    return closed


def busy_message(paths: Paths) -> str | None:
    """Why a retrain cannot start now (another one holds the workspace), or None; takes nothing."""
    if not paths.workspace_lock.is_file():
        return None
    with paths.workspace_lock.open("a+", encoding="utf-8") as handle:
        if _try_lock(handle):
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
    return f"another retrain is running on {paths.root} ({_holder(paths.workspace_lock)})"


def pipeline_changes(root: Path, env: dict[str, str] | None = None) -> dict:
    """`dvc status --json` in `root`: {stage: [what changed]}; {} when everything is up to date."""
    return StatusAhead(root, env).changes()


class StatusAhead:
    """`dvc status --json` in `root`, started now and read later, so DVC can answer while the caller does
    something else: `python -m flows` starts it before importing Prefect, which takes about as long."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root).resolve()
        command = [sys.executable, "-m", "dvc", "status", "--json"]
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._answer: dict | DvcStatusFailed | None = None

    def changes(self) -> dict:
        """{stage: [what changed]}, {} when up to date; DvcStatusFailed with DVC's message. Waits for DVC the
        first time; later calls give the same answer."""
        if self._answer is None:
            out, err = self.process.communicate()
            if self.process.returncode != 0:
                message = (err or out).strip()[-2000:]
                self._answer = DvcStatusFailed(f"`dvc status` failed in {self.root}: {message}")
            else:
                self._answer = json.loads(out or "{}")
        if isinstance(self._answer, DvcStatusFailed):
            raise self._answer
        return self._answer

    def says_up_to_date(self) -> bool:
        """True when DVC answered that nothing changed (False for changes and for a failed `dvc status`)."""
        try:
            return self.changes() == {}
        except DvcStatusFailed:
            return False

    def discard(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def lock_committed(root: Path) -> bool:
    """Whether dvc.lock is absent or committed: experiments and `dvc metrics diff` compare against a commit's."""
    if not (root / "dvc.lock").is_file():
        return True
    command = ["git", "ls-files", "--error-unmatch", "dvc.lock"]
    return subprocess.run(command, cwd=root, capture_output=True, check=False).returncode == 0


def describe_changes(changes: dict) -> str:
    """One line per changed stage: `train_qlora: changed params (train), changed deps (stages/train_qlora.py)`."""
    lines = []
    for stage, entries in changes.items():
        parts = []
        for entry in entries:
            if isinstance(entry, str):
                parts.append(entry)
                continue
            for kind, detail in entry.items():
                names = ", ".join(f"{name} {state}" for name, state in _flatten(detail))
                parts.append(f"{kind}: {names}" if names else kind)
        lines.append(f"{stage}: {'; '.join(parts)}")
    return "\n".join(lines)


def _flatten(detail) -> list[tuple[str, str]]:
    if not isinstance(detail, dict):
        return []
    pairs = []
    for name, state in detail.items():
        if isinstance(state, dict):  # params: {"params.yaml": {"train.learning_rate": "modified"}}
            pairs.extend((f"{name} {key}", value) for key, value in _flatten(state))
        else:
            pairs.append((name, str(state)))
    return pairs
