"""Prefect flow `sweep`: try the values of params.yaml's `sweep` section as DVC experiments, side by side, and
apply the promotion gate once, to the best.

1. Plan the trials (sweeps/plan.py): every key and value is checked before anything starts; a bad one stops
   the sweep with a message naming it.
2. Open the sweep's parent MLflow run, queue each trial with `dvc exp run --queue --name <sweep>-NN -S ...`
   and start `sweep.jobs` DVC queue workers (sweeps/queue.py). Each worker runs one trial at a time in its
   own temporary workspace with cores / jobs torch threads; its record_run logs a child run under the parent
   (stages/record_run.py) and registers nothing, so trials ending together never race on the registry.
3. Watch the queue until every trial ended; a failed trial is reported with its last lines, the others go on.
4. The best trial by `tracking.primary_metric` is registered and meets the gate the retrain uses (champion or
   challenger, stages/tracking/registry.py); with `sweep.register: all` the other trials get versions without
   an alias.
5. The report (sweeps/report.py): trials sorted by the metric, mean ± spread over seeds, minutes per trial,
   the decision, and a chart of the metric against each swept key; printed, published as the Prefect
   artifact `sweep-report`, logged on the parent run and written to reports/sweeps/<sweep>/.

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
from stages.tracking.store import client_for, require_server, shown_uri, tracking_uri
from sweeps.plan import Trial, plan_trials
from sweeps.queue import (
    SUCCESS,
    Watch,
    queue_states,
    queue_trial,
    require_idle_queue,
    start_workers,
    stop_trials,
)
from sweeps.report import closing_section, ranked, report_markdown, sweep_chart
from sweeps.tracking import gate_best, outcomes_of, register_others, save_view, start_parent_run

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


def trial_environment(sweep_id: str, parent_run_id: str, trials: list[Trial], uri: str, jobs: int) -> dict:
    """What the queue workers (and so every trial) inherit: the parent run, the swept keys and the store,
    and cores / jobs threads for torch."""
    env = stage_environment({
        "SWEEP_ID": sweep_id,
        "SWEEP_PARENT_RUN_ID": parent_run_id,
        "SWEEP_KEYS": ",".join(trials[0].swept),
        "MLFLOW_TRACKING_URI": uri,
        "PIPELINE_STARTED_BY": "sweep",
        "OMP_NUM_THREADS": str(max(cores() // jobs, 1)),
    })  # fmt: skip
    env.pop("MLFLOW_RUN_ID", None)
    return env


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="queue {trial.name}")
def queue_one(root: str, env: dict, trial: Trial, copies: list[str]) -> None:
    print(f"queued {trial.name}: {trial.label()}")
    queue_trial(Path(root), env, trial.name, trial.dvc_arguments(), copies)


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="run {n} trials, {jobs} at a time")
def run_queue(root: str, env: dict, names: list[str], jobs: int, n: int) -> Watch:
    """Start the workers and wait for every trial; the watch holds their states and times."""
    start_workers(Path(root), env, jobs)
    watch = Watch(names)
    watch.until_done(lambda: queue_states(Path(root), env), print)
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
        require_idle_queue(paths.root, stage_environment({}))
        close_orphans(paths, params, holding, closer=f"sweep {sweep_id}")
        client = client_for(paths, params)
        parent = start_parent_run(client, paths, params, sweep_id, trials, jobs)
        env = trial_environment(sweep_id, parent, trials, uri, jobs)
        print(f"{sweep_id}: {len(trials)} trials, {jobs} at a time, {env['OMP_NUM_THREADS']} thread(s) each")
        if not lock_committed(paths.root):
            print(
                "note: dvc.lock is not committed, so every trial re-runs every stage from scratch; commit it "
                "(`git add dvc.lock && git commit -m 'pipeline results'`) and trials reuse the outputs it names"
            )
        started = time.monotonic()
        try:
            for trial in trials:
                queue_one(str(paths.root), env, trial, copy_paths(paths, params))
            watch = run_queue(str(paths.root), env, [t.name for t in trials], jobs, len(trials))
        except BaseException:
            stop_trials(paths.root, env, [t.name for t in trials])
            client.set_terminated(parent, status="KILLED")
            raise
        wall = time.monotonic() - started
        return conclude(client, paths, params, (parent, sweep_id), trials, watch, wall, jobs, env)


def conclude(client, paths: Paths, params: Params, sweep, trials, watch: Watch, wall: float, jobs: int, env):
    """After the trials of `sweep` (its parent run id, its name): their outcomes, the gate on the best, the
    report, the parent run closed."""
    parent, sweep_id = sweep
    experiment = client.get_run(parent).info.experiment_id
    outcomes = outcomes_of(client, experiment, parent, sweep_id, trials, watch, paths.root, env)
    gate = Gate.from_params(params.tracking, params.data.shape)
    scored = [o for o in ranked(outcomes, gate) if o.value(gate.metric) is not None]
    best = scored[0] if scored else None
    decision = gate_best(client, paths, params, best, parent) if best else None
    registered = (
        register_others(client, params, outcomes, best, sweep_id) if best and params.sweep.register == "all" else []
    )
    uri = shown_uri(env["MLFLOW_TRACKING_URI"])
    view = save_view(client, uri, experiment, sweep_id, trials[0].swept, gate.metric, not gate.greater_is_better)
    saved = f"The comparison, saved in the experiment ({gate.metric} against the swept params): {view}"
    where = f"{mlflow_hint(uri, parent, experiment)}\n\n{saved}"
    closing = closing_section(decision, registered, wall, jobs, where)
    markdown = report_markdown(sweep_id, outcomes, gate, params.data.shape, closing)
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
