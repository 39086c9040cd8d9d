"""`sweep.backend: prefect`: each trial a flow run of the trial deployment (flows/trial.py), picked up by any
worker of its Prefect work pool and run in that worker's own clone of the repository, so a sweep spreads over
as many machines as there are workers.

The coordinator (`WorkerPool`, driven by flows/sweep.py):
1. pushes the sweep's commit to the Git remote as `refs/sweeps/<sweep>` and `dvc push --run-cache`es what it
   has (the data, the outputs dvc.lock names, DVC's run cache), so every worker starts from the same place;
2. creates one flow run per trial (`prefect.deployments.run_deployment`, not waiting) and reads their states;
3. fetches the finished trials' experiments (`dvc exp pull`): `dvc exp show` here lists every trial.

A trial on a worker (`run_trial`): check out the sweep's commit, `dvc pull --run-cache`, `dvc exp run --pull
--name <trial> -S ...` (record_run logs the child run in the shared MLflow server), then `dvc exp push --run-cache`
to the Git and DVC remotes. Stages another trial or sweep already ran come back from the run cache, so the
same sweep again reuses its finished trials. A worker that dies mid-trial leaves its flow run Crashed (the
heartbeat automation, flows/heartbeats.py): that trial is failed, not retried; the others land and the
report names it. Why not DVC's queue: it runs only on the machine that queued the trials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.errors import StageError
from sweeps.queue import FAILED, QUEUED, RUNNING, SUCCESS, dvc

# Prefect's state types, as a trial's state in the sweep's report.
TRIAL_STATES = {
    "SCHEDULED": QUEUED, "PENDING": QUEUED, "RUNNING": RUNNING, "PAUSED": RUNNING, "CANCELLING": RUNNING,
    "COMPLETED": SUCCESS, "FAILED": FAILED, "CRASHED": FAILED, "CANCELLED": FAILED,
}  # fmt: skip
FINAL_TYPES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
NO_WORKER_SECONDS = 120  # the trials wait for workers; after this long with none started, say how to start one


def git(root: Path, *args: str) -> str:
    """`git <args>` in `root`: its output; StageError with git's message when it fails."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise StageError(f"`git {' '.join(args)}` failed in {root}: {said[-1] if said else done.returncode}")
    return done.stdout.strip()


def remote_flag(dvc_remote: str | None) -> list[str]:
    return ["--remote", dvc_remote] if dvc_remote else []


def sweep_ref(sweep_id: str) -> str:
    """Where the sweep's commit waits on the Git remote for the workers: a ref of its own, no branch moved."""
    return f"refs/sweeps/{sweep_id}"


@dataclass
class WorkerPool:
    """The coordinator's side: the trials of sweep `sweep_id` as flow runs of `deployment`, from the commit
    checked out in `root`, shared through Git remote `git_remote` and DVC remote `dvc_remote` (None: the
    default one). `environment`: what every trial's stages need (the parent run, the tracking server)."""

    root: Path
    env: dict
    sweep_id: str
    deployment: str
    git_remote: str
    dvc_remote: str | None
    environment: dict
    poll_seconds: float = 3.0  # reading flow runs is cheap
    flow_runs: dict[str, str] = field(default_factory=dict)  # trial name -> flow run id
    commit: str = ""
    git_url: str = ""
    pool: str = ""
    waiting_since: float | None = None  # when the trials were submitted, until one is picked up

    def where(self) -> str:
        return f"flow runs of {self.deployment} on its work pool's workers"

    def prepare(self) -> None:
        """Check the deployment and the remotes; publish the commit and the DVC cache the trials start from."""
        self.pool = pool = read_deployment(self.deployment)
        self.git_url = git(self.root, "remote", "get-url", self.git_remote)
        self.commit = git(self.root, "rev-parse", "HEAD")
        git(self.root, "push", "--quiet", self.git_remote, f"{self.commit}:{sweep_ref(self.sweep_id)}")
        dvc(self.root, self.env, "push", "--run-cache", *remote_flag(self.dvc_remote))
        print(f"{self.sweep_id}: commit {self.commit[:12]} on {self.git_url}; trials go to work pool {pool}")

    def submit(self, name: str, arguments: list[str]) -> None:
        from prefect.deployments import run_deployment

        parameters = {
            "trial": name, "arguments": arguments, "commit": self.commit, "ref": sweep_ref(self.sweep_id),
            "git_url": self.git_url, "dvc_remote": self.dvc_remote, "environment": self.environment,
        }  # fmt: skip
        flow_run = run_deployment(
            self.deployment, parameters=parameters, timeout=0, flow_run_name=name, tags=["sweep", self.sweep_id]
        )
        self.flow_runs[name] = str(flow_run.id)
        self.waiting_since = self.waiting_since or time.monotonic()

    def start(self) -> None:
        """Nothing to start: the pool's workers pick the flow runs up."""

    def flow_run(self, name: str):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(self.flow_runs[name])

    def states(self) -> dict[str, str]:
        states = {name: TRIAL_STATES.get(self.flow_run(name).state_type.value, QUEUED) for name in self.flow_runs}
        if self.waiting_since is not None and any(state != QUEUED for state in states.values()):
            self.waiting_since = None
        elif self.waiting_since is not None and time.monotonic() - self.waiting_since > NO_WORKER_SECONDS:
            print(
                f"no worker of work pool {self.pool} has picked up a trial in {NO_WORKER_SECONDS} s; start one in a "
                'clone of the project with `make trial-worker` (docs/sweeps.md, "Across machines")'
            )
            self.waiting_since = None  # said once
        return states

    def collect(self, names: list[str]) -> None:
        """`dvc exp pull` the finished trials: their experiments (refs/exps) and the outputs they name."""
        if names:
            dvc(self.root, self.env, "exp", "pull", *remote_flag(self.dvc_remote), self.git_url, *names)

    def failure(self, name: str) -> str:
        """Why a trial failed: its flow run's state message, and which worker ran it."""
        flow_run = self.flow_run(name)
        state = flow_run.state
        message = (state.message if state else "") or "no message"
        where = f" (flow run {flow_run.name}, {flow_run.infrastructure_pid or 'never picked up'})"
        return f"{state.type.value if state else 'UNKNOWN'}: {message}{where}"

    def stop(self, names: list[str]) -> None:
        """Best effort, when the sweep is interrupted: cancel its flow runs that have not ended."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            for name in names:
                flow_run_id = self.flow_runs.get(name)
                if flow_run_id and client.read_flow_run(flow_run_id).state_type.value not in FINAL_TYPES:
                    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)


def read_deployment(name: str) -> str:
    """The work pool of deployment `name`; StageError naming the fix when the Prefect server lacks it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name(name).work_pool_name
    except ObjectNotFound:
        raise StageError(
            f"sweep.backend prefect: the Prefect server has no deployment {name!r}; create it with "
            '`make deploy-trials` and start workers with `make trial-worker` (docs/sweeps.md, "Across machines")'
        ) from None


def streamed(command: list[str], root: Path, env: dict, lines: int = 20) -> None:
    """Run `command` in `root`, printing its output line by line (the flow run's log); StageError with its last
    `lines` lines when it fails."""
    tail: list[str] = []
    with subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        for line in process.stdout:
            print(line.rstrip())
            tail = [*tail[-(lines - 1) :], line.rstrip()]
    if process.returncode != 0:
        shown = "\n".join(line for line in tail if line.strip())
        raise StageError(f"`{' '.join(command[2:5])} ...` exited {process.returncode}; its last lines:\n{shown}")


def run_trial(root: Path, trial: dict, env: dict) -> dict:
    """A trial on this worker, in the clone `root`: the sweep's commit checked out, `dvc exp run` with the
    trial's `arguments`, and the experiment pushed back. `trial` holds the trial deployment's parameters
    (trial, arguments, commit, ref, git_url, dvc_remote). Returns where it ran and its commit."""
    name, remote = trial["trial"], remote_flag(trial["dvc_remote"])
    git(root, "fetch", "--quiet", trial["git_url"], trial["ref"])
    git(root, "checkout", "--quiet", "--force", "--detach", trial["commit"])  # a clone for trials: nothing to keep
    dvc(root, env, "pull", "--run-cache", "--allow-missing", *remote)
    print(f"{name}: running at {trial['commit'][:12]} in {root} on {socket.gethostname()}")
    # --pull: a stage found in the run cache needs its outputs, which `dvc pull --run-cache` does not fetch
    experiment = [sys.executable, "-m", "dvc", "exp", "run", "--pull", "--name", name, *trial["arguments"]]
    streamed(experiment, root, env)
    dvc(root, env, "exp", "push", "--run-cache", *remote, trial["git_url"], name)
    print(f"{name}: pushed to {trial['git_url']} (refs/exps) and the DVC remote")
    return {"trial": name, "host": socket.gethostname(), "workspace": str(root), "pid": os.getpid()}
