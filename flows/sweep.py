"""Prefect flow `sweep`: try the values of params.yaml's `sweep` section as DVC experiments, side by side, and
apply the promotion gate once, to the best.

1. Plan the trials (sweeps/plan.py): every key and value is checked before anything starts; a bad one stops
   the sweep with a message naming it. Notes say when a trial is the params' own run again, or when the trials
   train on another budget than the params.
2. Open the sweep's parent MLflow run and hand each trial, `dvc exp run --name <sweep>-NN -S ...`, to the
   backend of `sweep.backend`. `local` (sweeps/queue.py): DVC's queue on this machine, `sweep.jobs` workers,
   each running one trial at a time in its own temporary workspace with cores / jobs torch threads. `prefect`
   (sweeps/workers.py): one flow run of the trial deployment per trial, on any worker of its pool, each in its
   own clone; the trials come back through the Git and DVC remotes. Each trial's record_run logs a child run
   under the parent (stages/record_run.py) and registers nothing, so trials ending together never race on the
   registry.
3. Watch the trials until every one ended; a failed trial is reported with its last lines, the others go on.
4. The best trial by `tracking.primary_metric` is registered and meets the gate the retrain uses (champion or
   challenger, stages/tracking/registry.py); with `sweep.register: all` the other trials get versions without
   an alias.
5. The report (sweeps/report.py): trials sorted by the metric, mean ± spread over seeds, minutes per trial,
   a note when trials trained on other budgets than each other or less than the champion, the decision, and
   a chart of the metric against each swept key; printed, published as the Prefect artifact `sweep-report`,
   logged on the parent run and written to reports/sweeps/<sweep>/.

Run: `make sweep` or `python -m flows.sweep [--jobs N]` from a git checkout with a commit (DVC experiments
start from one). `dvc exp show` then lists every trial; `dvc exp apply <name>` adopts one.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retrain import mlflow_hint, run_settings
from flows.workspace import PROJECT_ROOT, close_orphans, lock_committed, stage_environment, workspace_lock
from serving.champion import tell_servers
from stages.common.config import Params, load_params
from stages.common.errors import ConfigError, StageError
from stages.common.io import write_json, write_text
from stages.common.modeling import cores
from stages.common.paths import Paths
from stages.tracking.gate import Gate
from stages.tracking.names import SWEEP, TIMING, metric_name
from stages.tracking.runs import log_metrics
from stages.tracking.store import client_for, is_server, require_server, shown_uri, tracking_uri
from sweeps.plan import Trial, plan_notes, plan_trials
from sweeps.queue import SUCCESS, LocalQueue, Watch
from sweeps.report import closing_section, ranked, report_markdown, sweep_chart
from sweeps.tracking import gate_best, outcomes_of, register_others, save_view, start_parent_run
from sweeps.workers import WorkerPool

REPORT_KEY = "sweep-report"


def new_sweep_id() -> str:
    """A name for this sweep, unique per second: sweep-1129-163402 (its trials add -01, -02, ...)."""
    return f"sweep-{datetime.datetime.now():%m%d-%H%M%S}"


def require_commit(root: Path) -> None:
    """StageError unless `root` is a git checkout with a commit: DVC experiments start from one."""
    done = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, check=False)
    if done.returncode != 0:
        raise StageError(
            f"{root}: a sweep runs its trials as DVC experiments, which start from a git commit; commit the "
            "project first (`git add -A && git commit -m baseline`)"
        )


def copy_paths(paths: Paths, params: Params) -> list[str]:
    """Files the trials need that a git checkout lacks: a local base model folder inside the project."""
    source = Path(params.base_model.source)
    inside = (paths.root / source).resolve()
    if params.base_model.source.startswith("embedded:") or not inside.exists():
        return []
    try:
        return [str(inside.relative_to(paths.root.resolve()))]
    except ValueError:  # outside the project: every trial reads it where it is
        return []


def trial_environment(sweep_id: str, parent_run_id: str, trials: list[Trial], uri: str) -> dict[str, str]:
    """What every trial's stages need: the parent run, the swept keys and the store."""
    return {"SWEEP_ID": sweep_id, "SWEEP_PARENT_RUN_ID": parent_run_id, "SWEEP_KEYS": ",".join(trials[0].swept),
            "MLFLOW_TRACKING_URI": uri, "PIPELINE_STARTED_BY": "sweep"}  # fmt: skip


def local_environment(trial_env: dict[str, str], jobs: int) -> dict:
    """What DVC's queue workers (and so every local trial) inherit: `trial_env` and cores / jobs torch threads."""
    env = stage_environment({**trial_env, "OMP_NUM_THREADS": str(max(cores() // jobs, 1))})
    env.pop("MLFLOW_RUN_ID", None)
    return env


def trial_backend(paths: Paths, params: Params, sweep_id: str, trial_env: dict[str, str], jobs: int):
    """Where the trials run (`sweep.backend`): DVC's queue here, or flow runs on a Prefect work pool's workers
    (which need a tracking server and a Prefect server every machine reaches)."""
    if params.sweep.backend == "local":
        return LocalQueue(paths.root, local_environment(trial_env, jobs), jobs, copy_paths(paths, params))
    store = trial_env["MLFLOW_TRACKING_URI"]
    if not is_server(store):
        raise StageError(
            f"sweep.backend prefect: trials on other machines would record into {shown_uri(store)}, which only "
            "this machine opens; point MLFLOW_TRACKING_URI at a tracking server (docs/operations.md)"
        )
    if urlsplit(store).password:  # the URI becomes a flow-run parameter, which Prefect stores and shows
        raise StageError(
            f"sweep.backend prefect: the tracking URI {shown_uri(store)} holds a password, which the trials' flow "
            "runs would store on the Prefect server; give the workers MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in their environment instead"
        )
    env = stage_environment({})
    return WorkerPool(paths.root, env, sweep_id, params.sweep.deployment, params.sweep.git_remote,
                      params.flow.remote, trial_env)  # fmt: skip


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="submit {trial.name}")
def submit_one(backend, trial: Trial) -> None:
    print(f"submitted {trial.name}: {trial.label()}")
    backend.submit(trial.name, trial.dvc_arguments())


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="run {n} trials")
def run_trials(backend, names: list[str], n: int) -> Watch:
    """Start the backend and wait for every trial; the watch holds their states and times."""
    backend.start()
    watch = Watch(names, interval=backend.poll_seconds)
    watch.until_done(backend.states, print)
    return watch


def publish(client, paths: Paths, parent_run_id: str, sweep_id: str, markdown: str, outcomes, gate: Gate) -> Path:
    """The report and chart on the parent run, as the Prefect artifact, and under reports/sweeps/<sweep>/."""
    folder = paths.root / "reports" / "sweeps" / sweep_id
    write_text(folder / "report.md", markdown)
    sweep_chart(outcomes, gate, folder / "chart.png")
    write_json(folder / "trials.json", [
        {"name": o.trial.name, "values": o.trial.overrides, "state": o.state, "seconds": o.seconds,
         "started": o.started, "run_id": o.run_id, "metrics": o.metrics, "failure": o.failure}
        for o in outcomes
    ])  # fmt: skip
    client.log_artifacts(parent_run_id, str(folder), "sweep")
    client.set_tag(parent_run_id, "mlflow.note.content", markdown)
    create_markdown_artifact(markdown, key=REPORT_KEY, description=f"{sweep_id}: {len(outcomes)} trials")
    return folder


@flow(name="sweep", log_prints=True)
def sweep(project_dir: str = str(PROJECT_ROOT), jobs: int | None = None) -> dict:
    """Run params.yaml's sweep in `project_dir` (`jobs` overrides sweep.jobs); return the trials' outcomes and
    the gate's decision."""
    paths = Paths.at(project_dir)
    params = load_params(paths.params)
    sweep_id = new_sweep_id()
    trials = plan_trials(yaml.safe_load(paths.params.read_text(encoding="utf-8")), params, sweep_id)
    jobs = jobs or params.sweep.jobs
    require_commit(paths.root)
    uri = tracking_uri(paths, params)
    require_server(uri)
    with workspace_lock(paths, params.flow.lock_wait_seconds, owner=f"sweep {sweep_id}") as holding:
        close_orphans(paths, params, holding, closer=f"sweep {sweep_id}")
        client = client_for(paths, params)
        parent = start_parent_run(client, paths, params, sweep_id, trials, jobs)
        names = [t.name for t in trials]
        try:
            backend = trial_backend(paths, params, sweep_id, trial_environment(sweep_id, parent, trials, uri), jobs)
            backend.prepare()
        except BaseException:
            client.set_terminated(parent, status="FAILED")
            raise
        print(f"{sweep_id}: {len(trials)} trials, as {backend.where()}")
        for note in plan_notes(params, trials):
            print(f"note: {note}")
        if not lock_committed(paths.root):
            print(
                "note: dvc.lock is not committed, so every trial re-runs every stage from scratch; commit it "
                "(`git add dvc.lock && git commit -m 'pipeline results'`) and trials reuse the outputs it names"
            )
        started = time.monotonic()
        try:
            for trial in trials:
                submit_one(backend, trial)
            watch = run_trials(backend, names, len(trials))
        except BaseException:
            backend.stop(names)
            client.set_terminated(parent, status="KILLED")
            raise
        wall = time.monotonic() - started
        backend.collect([name for name in names if watch.states.get(name) == SUCCESS])
        return conclude(client, paths, params, (parent, sweep_id), trials, watch, wall, backend)


def conclude(client, paths: Paths, params: Params, sweep, trials, watch: Watch, wall: float, backend):
    """After the trials of `sweep` (its parent run id, its name) ran on `backend`: their outcomes, the gate on
    the best, the report, the parent run closed."""
    parent, sweep_id = sweep
    experiment = client.get_run(parent).info.experiment_id
    env = stage_environment({})
    outcomes = outcomes_of(client, experiment, (parent, sweep_id), trials, watch, (paths.root, env), backend.failure)
    gate = Gate.from_params(params.tracking, params.data.shape)
    scored = [o for o in ranked(outcomes, gate) if o.value(gate.metric) is not None]
    best = scored[0] if scored else None
    decision = gate_best(client, paths, params, best, parent) if best else None
    registered = (
        register_others(client, params, outcomes, best, sweep_id) if best and params.sweep.register == "all" else []
    )
    uri = shown_uri(tracking_uri(paths, params))
    view = save_view(client, uri, experiment, sweep_id, trials[0].swept, gate.metric, not gate.greater_is_better)
    saved = f"The comparison, saved in the experiment ({gate.metric} against the swept params): {view}"
    where = f"{mlflow_hint(uri, parent, experiment)}\n\n{saved}"
    closing = closing_section(decision, registered, wall, backend.where(), where)
    markdown = report_markdown(sweep_id, outcomes, gate, params.data.shape, closing, (decision or {}).get("trained"))
    folder = publish(client, paths, parent, sweep_id, markdown, outcomes, gate)
    summary = {
        metric_name(TIMING, "sweep_seconds"): wall,
        metric_name(SWEEP, "trials_succeeded"): sum(o.state == SUCCESS for o in outcomes),
    }
    if best:
        summary[metric_name(SWEEP, f"best_{gate.metric}")] = best.value(gate.metric)
    log_metrics(client, parent, summary)
    client.set_terminated(parent, status="FINISHED" if best else "FAILED")
    print(f"\n{markdown}\nreport and chart: {folder}")
    if decision and decision.get("promoted"):
        print(tell_servers(params.serve))
    if best is None:
        raise StageError(f"{sweep_id}: every trial failed; their last lines are in the report ({folder})")
    return {
        "sweep_id": sweep_id, "best": best.trial.name, "decision": decision, "seconds": wall,
        "states": {o.trial.name: o.state for o in outcomes}, "report": str(folder),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description="Run params.yaml's sweep.")
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="project root holding dvc.yaml")
    parser.add_argument("--jobs", type=int, default=None, help="trials side by side (default: sweep.jobs)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: expected a number of at least 1, got {args.jobs}")
    paths = Paths.at(args.project_dir)
    try:  # bad params stop here, before Prefect or DVC start anything
        plan_trials(yaml.safe_load(paths.params.read_text(encoding="utf-8")), load_params(paths.params), "check")
        require_commit(paths.root)
    except (ConfigError, StageError) as exc:
        print(f"sweep not started: {exc}", file=sys.stderr)
        return 1
    try:
        with run_settings(quick=False):
            sweep(project_dir=args.project_dir, jobs=args.jobs)
    except Exception as exc:  # the Prefect log above has the details; end with one clear line
        print(f"sweep failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
