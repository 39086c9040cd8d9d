"""A sweep's side of MLflow: its parent run, what each trial's child run holds, the gate on the best trial, the
versions of the others (`sweep.register: all`), and the comparison saved in the experiment as a view of the
MLflow UI's runs page. flows/sweep.py calls these in order; MLflow is imported by the client it hands in.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

from stages.common.config import PRICE, Params
from stages.common.paths import Paths
from stages.record_run import rescorer
from stages.tracking import history
from stages.tracking.names import ADAPTER_TEST_METRICS, adapter_test_metrics
from stages.tracking.orphans import origin_tags
from stages.tracking.registry import (
    MODEL_URI_TAG,
    TEST_HASH_TAG,
    adapter_sha256,
    create_version,
    find_version,
    logged_budget,
    logged_rows,
    logged_test_set,
    register_adapter,
)
from stages.tracking.runs import experiment_id, git_tags, log_metrics, source_tags
from stages.tracking.store import store_root
from sweeps.plan import Trial
from sweeps.queue import FAILED, SUCCESS, Watch, restored_records
from sweeps.report import Outcome


def start_parent_run(client, paths: Paths, params: Params, sweep_id: str, trials: list[Trial], jobs: int) -> str:
    """The sweep's MLflow run, which its trials' runs are children of: what was swept, how, on which commit."""
    keys = ", ".join(key.rsplit(".", 1)[-1] for key in trials[0].swept)
    run = client.create_run(
        experiment_id(client, paths, params.tracking.experiment),
        run_name=f"{sweep_id}: {keys}",
        tags={"started_by": "sweep", "sweep.id": sweep_id, "sweep.keys": ",".join(trials[0].swept),
              **source_tags("sweep"), **git_tags(paths.root), **origin_tags(store_root(paths))},
    )  # fmt: skip
    sweep = params.sweep
    for key, value in {
        "sweep.method": sweep.method, "sweep.grid": json.dumps(sweep.grid), "sweep.fixed": json.dumps(sweep.fixed),
        "sweep.seeds": json.dumps(sweep.seeds), "sweep.jobs": jobs, "sweep.trials": len(trials),
    }.items():  # fmt: skip
        client.log_param(run.info.run_id, key, str(value)[:250])
    return run.info.run_id


def outcomes_of(client, experiment: str, sweep: tuple[str, str], trials: list[Trial], watch: Watch, repo, failure_of):
    """Each trial's state, time, child run (of the sweep's run; `sweep` is its run id and name) and test metrics;
    a failed one with `failure_of(name)` (its last lines of output). `repo`: (root, env) of the repository
    holding the trials' experiments."""
    parent, sweep_id = sweep
    root, env = repo
    runs = {
        run.data.tags.get("dvc.exp_name"): run
        for run in client.search_runs([experiment], filter_string=f"tags.`sweep.id` = '{sweep_id}'")
    }
    reused = [t.name for t in trials if watch.states.get(t.name) == SUCCESS and t.name not in runs]
    records = restored_records(root, env, reused)
    outcomes = []
    for trial in trials:
        state, run = watch.states.get(trial.name, FAILED), runs.get(trial.name)
        timing = (watch.seconds(trial.name), watch.offset(trial.name))
        if state == SUCCESS and run is None:
            outcomes.append(
                reused_outcome(client, experiment, (parent, sweep_id), trial, timing, records.get(trial.name))
            )
        elif state != SUCCESS:
            failure = failure_of(trial.name)
            outcomes.append(Outcome(trial, state, *timing, run.info.run_id if run else None, failure=failure))
        else:
            metrics = adapter_test_metrics(run.data.metrics)
            outcomes.append(Outcome(trial, state, *timing, run.info.run_id, metrics, budget=logged_budget(run)))
    return outcomes


def reused_outcome(client, experiment: str, sweep: tuple[str, str], trial: Trial, timing, record) -> Outcome:
    """A trial DVC restored from its run cache: its stages, record_run included, did not run again, so it left
    no child run. The run that recorded those very outputs (named in the restored run record) stands in: this
    sweep (its run id, its name) gets a child run pointing at it (`sweep.reused_run`) with its params and
    metrics. `record` is the trial's restored run record, or None."""
    from mlflow.exceptions import MlflowException

    parent, sweep_id = sweep
    try:
        original = client.get_run(record["run_id"]) if record else None
    except MlflowException:
        original = None
    if original is None:
        return Outcome(trial, FAILED, *timing, failure="the trial left no MLflow run, and no earlier run it reused")
    tags = {key: value for key, value in original.data.tags.items() if not key.startswith("mlflow.")}
    tags.update({
        "mlflow.parentRunId": parent, "sweep.id": sweep_id,
        "dvc.exp_name": trial.name, "sweep.reused_run": original.info.run_id,
    })  # fmt: skip
    child = client.create_run(experiment, run_name=f"{trial.name} {trial.label()} (reused)", tags=tags)
    log_metrics(client, child.info.run_id, original.data.metrics)
    for key, value in original.data.params.items():
        client.log_param(child.info.run_id, key, value)
    client.set_terminated(child.info.run_id, status="FINISHED")
    metrics = adapter_test_metrics(original.data.metrics)
    return Outcome(
        trial, SUCCESS, *timing, original.info.run_id, metrics, reused_from=original.info.run_id,
        budget=logged_budget(original),
    )  # fmt: skip


def downloaded_adapter(client, run_id: str, folder: str) -> Path:
    return Path(client.download_artifacts(run_id, "adapter", folder))


def logged_model(client, run):
    return client.get_logged_model(run.data.tags[MODEL_URI_TAG].removeprefix("models:/"))


def gate_best(client, paths: Paths, params: Params, best: Outcome, parent: str) -> dict:
    """Register the best trial's adapter and apply the promotion gate to it, as a retrain would; tag the sweep's
    run `parent` with the decision. Returns the record promotion_markdown reads."""
    run = client.get_run(best.run_id)
    with tempfile.TemporaryDirectory(prefix="sweep-best-") as folder:
        decision = register_adapter(
            client, params.tracking, best.run_id, downloaded_adapter(client, best.run_id, folder),
            run.data.params.get("data.shape", PRICE), logged_rows(client, run) or [],
            logged_test_set(client, run), rescorer(params, paths, client), logged_model(client, run),
        )  # fmt: skip
    if decision["new_version"]:
        history.publish(client, params.tracking, best.run_id)
    tags = {"best_trial": best.trial.name, "version": decision["version"], "alias": decision["alias"] or "none"}
    for key, value in {**tags, "reason": decision["reason"]}.items():
        client.set_tag(parent, f"promotion.{key}", str(value))
    return {"registered_model": params.tracking.registered_model, **decision}


def register_others(client, params: Params, outcomes: list[Outcome], best: Outcome, sweep_id: str) -> list[str]:
    """`sweep.register: all`: a version without an alias for every other successful trial; the versions made."""
    made = []
    name = params.tracking.registered_model
    for outcome in outcomes:
        if outcome is best or outcome.state != SUCCESS:
            continue
        run = client.get_run(outcome.run_id)
        with tempfile.TemporaryDirectory(prefix="sweep-trial-") as folder:
            sha256 = adapter_sha256(downloaded_adapter(client, outcome.run_id, folder))
        if find_version(client, name, sha256) is not None:
            continue
        reason = f"trial {outcome.trial.name} of {sweep_id} ({outcome.trial.label()}); not the best, not gated"
        version = create_version(
            client, name, outcome.run_id, sha256, run.data.tags.get(TEST_HASH_TAG), logged_model(client, run),
            {"sweep.id": sweep_id}, reason,
        )  # fmt: skip
        made.append(str(version.version))
    return made


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a view of the runs page the MLflow UI restores from the store


def chart(kind: str, section: str, title: str, **fields) -> dict:
    """One chart card of the MLflow UI's runs page, as its shared view state holds it."""
    card = {"uuid": str(uuid.uuid4()), "type": kind, "metricSectionId": section, "displayName": title}
    return {**card, "runsCountToCompare": 100, "deleted": False, "isGenerated": False, **fields}


def saved_view(sweep_id: str, swept: tuple[str, ...], metric: str, ascending: bool) -> dict:
    """The sweep's comparison as a view of MLflow's runs page: only this sweep's runs, sorted by the primary
    metric, the swept params and the metric as table columns, and a parallel-coordinates chart of the swept
    params against it with one scatter chart per key."""
    key = f"{ADAPTER_TEST_METRICS}{metric}"
    section = str(uuid.uuid4())
    charts = [chart("PARALLEL", section, f"{metric} against the swept params", selectedParams=list(swept),
                    selectedMetrics=[key], showAllRuns=False)]  # fmt: skip
    charts += [
        chart("SCATTER", section, f"{metric} against {name}", xaxis={"key": name, "type": "PARAM"},
              yaxis={"key": key, "type": "METRIC"})
        for name in swept
    ]  # fmt: skip
    return {
        "searchFilter": f"tags.`sweep.id` = '{sweep_id}'",
        "orderByKey": f"metrics.`{key}`",
        "orderByAsc": ascending,
        "selectedColumns": [f"params.`{name}`" for name in swept] + [f"metrics.`{key}`"],  # the table's columns
        "compareRunCharts": charts,
        "compareRunSections": [
            {
                "uuid": section,
                "name": sweep_id,
                "display": True,
                "isReordered": False,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "isAccordionReordered": True,  # keeps this section first, above the sections the UI adds per prefix
    }


def save_view(client, uri: str, experiment: str, sweep_id: str, swept, metric: str, ascending: bool) -> str:
    """Save the sweep's comparison in the experiment (the UI's "share view" tag); the link that opens it."""
    client.set_experiment_tag(
        experiment, f"{SHARED_VIEW_TAG}{sweep_id}", json.dumps(saved_view(sweep_id, swept, metric, ascending))
    )
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    query = f"viewStateShareKey={sweep_id}&compareRunsMode=CHART&workflowType=machine_learning"  # charts, ML view
    return f"{base}/#/experiments/{experiment}/runs?{query}"
