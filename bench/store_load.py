"""Benchmark: many trials finishing at once against one MLflow tracking server, with its store on PostgreSQL
(what `make servers` runs) and, for comparison, on SQLite (what `make mlflow-server` runs).

`--trials` threads (default 32) wait at a barrier, then each does what a sweep trial's record_run and a
registration do, all at the same moment: a child run under one parent run, 30 params, the same dataset input
as every other trial (the splits a sweep's trials share, logged as record_run logs them), 8 metrics x 50 steps
(one log_batch per metric), a small artifact uploaded through the server, the run closed; then a registry
version of one registered model for that run, and the `challenger` alias moved to it. Afterwards the bench
reads everything back and checks that no write was lost: every run FINISHED with all its params, its dataset, its metric
points and its artifact, one version per run with versions numbered 1..N, and the alias on one of them.
Prints, per store, the wall time, the errors the clients saw (after MLflow's own retries) and the checks; writes
bench/results/store_load.json with the machine.

Run: `python -m bench.store_load [--trials 32]` (or `make bench-store`); needs PostgreSQL (docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.machine import describe, machine
from infra import servers
from infra.servers import mlflow_server, postgres_server
from stages.common.io import write_json
from stages.tracking.runs import log_inputs_once_stored

RESULTS = Path(__file__).resolve().parent / "results" / "store_load.json"
MODEL, ALIAS = "load-test-model", "challenger"
PARAMS, METRICS, STEPS = 30, 8, 50


def one_trial(client, experiment: str, parent: str, index: int, barrier: threading.Barrier, folder: Path) -> str:
    """A trial's writes, started together with the others: its run id."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    barrier.wait()
    tags = {"mlflow.parentRunId": parent, "trial": str(index)}
    run_id = client.create_run(experiment, run_name=f"trial-{index:02d}", tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(f"p{k}", str(index * k)) for k in range(PARAMS)])
    shared = Dataset(name="prices-train", digest="0123456789abcdef", source_type="local", source="{}")
    log_inputs_once_stored(client, run_id, [DatasetInput(shared, tags=[InputTag("mlflow.data.context", "train")])])
    now = int(time.time() * 1000)
    for m in range(METRICS):
        points = [Metric(f"m{m}", float(index + step), now + step, step) for step in range(STEPS)]
        client.log_batch(run_id, metrics=points)
    artifact = folder / f"trial-{index}.txt"
    artifact.write_text(f"trial {index}\n" * 64)
    client.log_artifact(run_id, str(artifact), "record")
    client.set_terminated(run_id, status="FINISHED")
    version = client.create_model_version(MODEL, f"runs:/{run_id}/record", run_id=run_id)
    client.set_registered_model_alias(MODEL, ALIAS, version.version)
    return run_id


def checks(client, experiment: str, parent: str, made: list[str]) -> dict:
    """What was read back: runs, params and points, artifacts, versions and the alias; `made`: the runs of the
    trials that saw no error."""
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    complete = [
        r for r in finished
        if len(r.data.params) == PARAMS and len(r.data.metrics) == METRICS and len(r.inputs.dataset_inputs) == 1
    ]  # fmt: skip
    points = sum(len(client.get_metric_history(r.info.run_id, f"m{m}")) for r in runs for m in range(METRICS))
    artifacts = sum(bool(client.list_artifacts(r.info.run_id, "record")) for r in runs)
    versions = client.search_model_versions(f"name = '{MODEL}'", max_results=1000)
    numbers = sorted(int(v.version) for v in versions)
    holder = client.get_model_version_by_alias(MODEL, ALIAS)
    return {
        "trials_without_error": len(made),
        "runs_read_back_finished_and_complete": len(complete),
        "metric_points": points,
        "metric_points_expected": len(runs) * METRICS * STEPS,
        "runs_with_artifact": artifacts,
        "versions": len(versions),
        "versions_numbered_1_to_n": numbers == list(range(1, len(numbers) + 1)),
        "one_version_per_run": sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs),
        "alias_on_a_version_of_a_run": holder.run_id in {r.info.run_id for r in runs},
    }


def load(uri: str, trials: int, folder: Path) -> dict:
    """All trials at once against the server at `uri`: seconds, errors and the checks."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"load-{time.time_ns()}")
    parent = client.create_run(experiment, run_name="load parent").info.run_id
    client.create_registered_model(MODEL)
    barrier, errors, made = threading.Barrier(trials), [], []
    started = time.monotonic()
    with ThreadPoolExecutor(trials) as pool:
        futures = [pool.submit(one_trial, client, experiment, parent, i, barrier, folder) for i in range(trials)]
        for future in futures:
            try:
                made.append(future.result())
            except Exception as exc:  # counted and shown: a lost write is what this bench looks for
                errors.append("".join(traceback.format_exception_only(exc)).strip()[:300])
    seconds = time.monotonic() - started
    return {"seconds": round(seconds, 1), "errors": len(errors), "first_errors": errors[:3],
            **checks(client, experiment, parent, made)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=32, help="trials finishing at once")
    parser.add_argument(
        "--default-pool", action="store_true", help="the servers with MLflow's default store connection pool, not "
        "infra.servers.STORE_POOL (to see why it is raised)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.default_pool:
        servers.STORE_POOL = {}
    info, results = machine(), {}
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="store-load-") as scratch:
        scratch = Path(scratch)
        postgres_folder = Path(tempfile.mkdtemp(prefix="qlora-postgres-"))
        try:
            with postgres_server(postgres_folder) as postgres:
                postgres.create_database("mlflow")
                with mlflow_server(scratch / "pg", env, postgres.url("mlflow")) as uri:
                    results["postgresql"] = load(uri, args.trials, scratch)
        finally:
            shutil.rmtree(postgres_folder, ignore_errors=True)
        with mlflow_server(scratch / "sqlite", env) as uri:
            results["sqlite"] = load(uri, args.trials, scratch)
    pool = "MLflow's default connection pool" if args.default_pool else f"pool {servers.STORE_POOL}"
    print(f"\n{describe(info)}; {args.trials} trials at once against one `mlflow server` (one worker, {pool})")
    for store, result in results.items():
        print(f"\n{store}: {result['seconds']} s, {result['errors']} client errors")
        for key, value in result.items():
            if key not in ("seconds", "errors"):
                print(f"  {key}: {value}")
    write_json(RESULTS, {"machine": info, "trials": args.trials, "default_pool": args.default_pool, "results": results})
    print(f"\nwritten: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
