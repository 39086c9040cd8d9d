"""Prefect flow `retrain`: every DVC stage in order, then one MLflow run for this execution.

Each stage is one Prefect task that runs `dvc repro <stage>` (serially, so DVC's repo lock is never
contended and dvc.lock stays the truth; DVC skips what is up to date), streaming its output to the
Prefect log. Then the execution is recorded in MLflow (params, metrics, loss curve, adapter, charts,
lineage tags), a Markdown report is attached to the flow run, and the comparison table is printed,
with a row for the MLflow registry's `champion` when it was scored on the same test set.
Prefect owns retries and logs only; DVC owns caching, so task results are never cached.

Run: `python -m flows.retrain` (Prefect starts a temporary local server when PREFECT_API_URL is unset).
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # read when prefect is imported
# The temporary server takes ~20 s to start on 2 busy cores; Prefect's default wait is 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from stages.core.config import load_params
from stages.core.io import read_json
from stages.core.paths import Paths
from stages.core.report import comparison_markdown, comparison_table
from stages.core.tracking import champion_metrics, record_pipeline_run, tracking_uri

STAGES = ("base_model", "split_data", "tokenize_data", "train_qlora", "evaluate_adapter", "export_hub")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def stage_environment() -> dict[str, str]:
    """The environment for `dvc repro`: this interpreter's bin folder first, so `python -m stages.*`
    in dvc.yaml runs with the same packages as the flow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stream_lines(stream, logger) -> None:
    """Send complete lines to the Prefect log; show progress-bar frames (text ending in \\r) live on a
    terminal, redrawn in place and cleared before the next log line, and never log them."""
    live = sys.stderr.isatty()
    pending = ""
    for chunk in iter(lambda: stream.read1(4096), b""):
        pending += chunk.decode("utf-8", errors="replace")
        *lines, pending = pending.split("\n")
        for line in lines:
            text = line.rsplit("\r", 1)[-1].rstrip()
            if text:
                if live:
                    sys.stderr.write("\r\033[K")
                logger.info(text)
        if "\r" in pending:
            done, pending = pending.rsplit("\r", 1)
            if live:
                sys.stderr.write("\r\033[K" + done.rsplit("\r", 1)[-1][:150])
                sys.stderr.flush()
    if pending.strip():
        logger.info(pending.strip())


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, project_dir: str) -> None:
    """Run `dvc repro <stage>` in `project_dir`; raise with the exit code if it fails."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", stage]
    logger.info("$ %s", " ".join(command[2:]))
    with subprocess.Popen(
        command, cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stage_environment()
    ) as process:
        stream_lines(process.stdout, logger)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"`dvc repro {stage}` exited with code {code}; the lines above say why")


@task(cache_policy=NO_CACHE, persist_result=False)
def record_in_mlflow(project_dir: str, stage_seconds: dict[str, float]) -> str:
    """Record this execution as one MLflow run, with each stage's wall time; return the run id."""
    paths = Paths.at(project_dir)
    params = load_params(paths.params)
    timings = {f"stage_seconds.{stage}": seconds for stage, seconds in stage_seconds.items()}
    run_id = record_pipeline_run(paths, params, started_by="prefect", extra_metrics=timings)
    get_run_logger().info("MLflow run %s in %s", run_id, tracking_uri(paths, params))
    return run_id


def report(metrics: dict, run_id: str, uri: str) -> str:
    return (
        f"# Retrain report\n\n{comparison_markdown(metrics)}\n\nMLflow run `{run_id}` in `{uri}`; open it with "
        f"`mlflow ui --backend-store-uri {uri}`.\n"
    )


@flow(name="retrain", log_prints=True)
def retrain(project_dir: str = str(PROJECT_ROOT)) -> dict:
    """Reproduce every stage with DVC, record the run in MLflow, report; return metrics and run id."""
    paths = Paths.at(project_dir)
    params = load_params(paths.params)
    stage_seconds = {}
    for stage in STAGES:
        started = time.perf_counter()
        repro_stage.with_options(
            retries=params.flow.stage_retries, retry_delay_seconds=params.flow.retry_delay_seconds
        )(stage, str(paths.root))
        stage_seconds[stage] = round(time.perf_counter() - started, 1)
    run_id = record_in_mlflow(str(paths.root), stage_seconds)
    metrics = read_json(paths.eval_metrics)
    champion = champion_metrics(paths, params)  # the registry's champion, if scored on this test set
    if champion:
        metrics["champion"] = champion
    create_markdown_artifact(
        report(metrics, run_id, tracking_uri(paths, params)),
        key="retrain-report",
        description="adapter vs base model vs mean price",
    )
    timings = ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in stage_seconds.items())
    print(
        f"\n{comparison_table(metrics)}\n\nstage times (dvc repro, skips included): {timings}\n"
        f"MLflow run {run_id}; `make mlflow-ui` to browse it."
    )
    return {"run_id": run_id, "metrics": metrics, "stage_seconds": stage_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the QLoRA pipeline through DVC and record it in MLflow.")
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="project root holding dvc.yaml")
    args = parser.parse_args(argv)
    try:
        retrain(project_dir=args.project_dir)
    except Exception as exc:  # the Prefect log above has the details; end with one clear line
        print(f"retrain failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
