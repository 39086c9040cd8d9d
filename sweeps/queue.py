"""DVC's experiment queue, as a sweep drives it: queue the trials, start workers, watch them, read failures.

Each trial is `dvc exp run --queue --name <trial> -S key=value ...`; `dvc queue start --jobs N` starts N
workers, each running one trial at a time in its own temporary copy of the workspace (.dvc/tmp/exps), so
trials side by side never share outputs, and every finished trial is a DVC experiment (`dvc exp show`,
`dvc exp apply <name>`). The workers inherit the environment of `dvc queue start`: that is how a sweep hands
its trials the MLflow parent run and their share of the cores.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.errors import StageError

QUEUED, RUNNING, SUCCESS, FAILED = "Queued", "Running", "Success", "Failed"
FINISHED = (SUCCESS, FAILED)


def dvc(root: Path, env: dict, *args: str) -> str:
    """`dvc <args>` in `root`: its standard output; StageError with DVC's own message when it fails. The output
    goes through files, not pipes: `dvc queue start`'s workers inherit them and outlive the command."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as output, tempfile.TemporaryFile("w+") as errors:
        command = [sys.executable, "-m", "dvc", *args]
        code = subprocess.run(command, cwd=root, env=env, stdout=output, stderr=errors, check=False).returncode
        output.seek(0)
        errors.seek(0)
        text, said = output.read(), errors.read()
    if code != 0:
        lines = [line for line in (said + text).splitlines() if line.strip()]
        raise StageError(f"`dvc {' '.join(args)}` failed: {lines[-1] if lines else f'exit {code}'}")
    return text


def restored_records(root: Path, env: dict, names: list[str]) -> dict[str, dict]:
    """{experiment name: its run record (reports/mlflow_run.json), read from DVC's cache} for `names`: for a
    trial whose every stage DVC restored from its run cache (the same code, data and params ran before), it
    names the MLflow run that recorded those outputs. One `dvc exp show` for them all."""
    import json

    if not names:
        return {}
    cache = Path(dvc(root, env, "cache", "dir").strip())
    cache = cache if cache.is_absolute() else root / cache
    records = {}
    for row in json.loads(dvc(root, env, "exp", "show", "--json")):
        for experiment in row.get("experiments") or []:
            if experiment.get("name") not in names:
                continue
            out = experiment["revs"][0]["data"].get("outs", {}).get("reports/mlflow_run.json") or {}
            digest = out.get("hash") or ""
            path = cache / "files" / "md5" / digest[:2] / digest[2:]
            if digest and path.is_file():
                records[experiment["name"]] = json.loads(path.read_text(encoding="utf-8"))
    return records


def queue_states(root: Path, env: dict) -> dict[str, str]:
    """{experiment name: Queued / Running / Success / Failed} from `dvc queue status`."""
    states = {}
    for line in dvc(root, env, "queue", "status").splitlines():
        words = line.split()
        if len(words) >= 4 and words[-1] in (QUEUED, RUNNING, *FINISHED) and words[0] != "Task":
            states[words[1]] = words[-1]
    return states


def require_idle_queue(root: Path, env: dict) -> None:
    """StageError when the queue holds waiting or running experiments: the sweep's workers would run them too."""
    busy = sorted(name for name, state in queue_states(root, env).items() if state in (QUEUED, RUNNING))
    if busy:
        raise StageError(
            f"DVC's experiment queue already holds {', '.join(busy)} (`dvc queue status`); let them finish, or "
            "remove them with `dvc queue remove --queued` (`dvc queue kill` for running ones), then start the sweep"
        )


def queue_trial(root: Path, env: dict, name: str, arguments: list[str], copy_paths: list[str]) -> None:
    """Queue one trial: `dvc exp run --queue --name <name> -S ...`, copying `copy_paths` (ignored files the
    pipeline reads, such as a local base model) into its temporary workspace."""
    copies = [item for path in copy_paths for item in ("--copy-paths", path)]
    dvc(root, env, "exp", "run", "--queue", "--name", name, *arguments, *copies)


def start_workers(root: Path, env: dict, jobs: int) -> None:
    """`dvc queue start --jobs N`: N workers, each running one queued trial at a time, with `env`."""
    dvc(root, env, "queue", "start", "--jobs", str(jobs))


def trial_log(root: Path, env: dict, name: str, lines: int = 15) -> str:
    """The last lines of a trial's output (`dvc queue logs`), for a failure's report."""
    try:
        text = dvc(root, env, "queue", "logs", name)
    except StageError as exc:
        return str(exc)
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


@dataclass
class Watch:
    """When each trial started and ended, as seen by polling the queue every `interval` seconds."""

    names: list[str]
    interval: float = 10.0  # seconds between reads of the states
    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)

    def offset(self, name: str) -> float | None:
        """When `name` started, in seconds after the first trial started."""
        if name not in self.started:
            return None
        return round(self.started[name] - min(self.started.values()), 1)

    def seconds(self, name: str) -> float | None:
        if name not in self.ended:
            return None
        return round(self.ended[name] - self.started.get(name, self.ended[name]), 1)

    def until_done(self, read_states: Callable[[], dict[str, str]], say: Callable[[str], None]) -> dict[str, str]:
        """Poll `read_states` until every trial finished; say each change of state; return the final states."""
        while True:
            now = time.monotonic()
            current = read_states()
            for name in self.names:
                state = current.get(name, self.states.get(name, QUEUED))
                if state == self.states.get(name) or self.states.get(name) in FINISHED:
                    continue
                if state == RUNNING or (state in FINISHED and name not in self.started):
                    self.started.setdefault(name, now)
                if state in FINISHED:
                    self.ended[name] = now
                self.states[name] = state
                done = sum(self.states.get(n) in FINISHED for n in self.names)
                took = f" after {self.seconds(name) / 60:.1f} min" if state in FINISHED else ""
                say(f"[{done}/{len(self.names)} done] {name}: {state.lower()}{took}")
            if all(self.states.get(name) in FINISHED for name in self.names):
                return dict(self.states)
            time.sleep(self.interval)


def stop_trials(root: Path, env: dict, names: list[str]) -> None:
    """Best effort, when the sweep is interrupted: drop its queued trials and kill its running ones."""
    states = queue_states(root, env)
    for name in names:
        if states.get(name) == QUEUED:
            subprocess.run([sys.executable, "-m", "dvc", "queue", "remove", name], cwd=root, env=env, check=False)
        elif states.get(name) == RUNNING:
            subprocess.run([sys.executable, "-m", "dvc", "queue", "kill", name], cwd=root, env=env, check=False)


@dataclass
class LocalQueue:
    """`sweep.backend: local`: the trials in DVC's queue on this machine, `jobs` at a time, each in a temporary
    copy of the workspace `root` holding `copies` (ignored files the pipeline reads). flows/sweep.py drives a
    backend through prepare, submit (each trial), start, states until all finished, collect, failure, stop."""

    root: Path
    env: dict
    jobs: int
    copies: list[str]
    poll_seconds: float = 10.0  # `dvc queue status` takes ~3 s of CPU: poll gently

    def where(self) -> str:
        return f"DVC's queue on this machine, {self.jobs} at a time"

    def prepare(self) -> None:
        require_idle_queue(self.root, self.env)

    def submit(self, name: str, arguments: list[str]) -> None:
        queue_trial(self.root, self.env, name, arguments, self.copies)

    def start(self) -> None:
        start_workers(self.root, self.env, self.jobs)

    def states(self) -> dict[str, str]:
        return queue_states(self.root, self.env)

    def collect(self, names: list[str]) -> None:
        """Nothing to fetch: the queue's experiments are already in this repository."""

    def failure(self, name: str) -> str:
        return trial_log(self.root, self.env, name)

    def stop(self, names: list[str]) -> None:
        stop_trials(self.root, self.env, names)
