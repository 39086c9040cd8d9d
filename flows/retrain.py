"""Prefect flow `retrain`: ask DVC what changed, rebuild it stage by stage, record it in MLflow, report.

1. Take the workspace (flows/workspace.py): a second retrain on the same folder waits
   `flow.lock_wait_seconds`, then stops with a message naming the first. The MLflow runs that processes of this
   workspace left RUNNING when they died are closed then (stages/tracking/orphans.py) and listed in the report.
2. `dvc status`: when nothing changed (data, params, code), end within seconds with an "up to date"
   report: no training, no MLflow run.
3. Open one MLflow run and run each stage as a Prefect task, `dvc repro <stage>` (serially, so DVC's lock
   is never contended and dvc.lock stays the truth). The run's id goes to the stages in $MLFLOW_RUN_ID:
   train_qlora streams its curves into it live, and the last stage, record_run, logs everything else,
   registers the adapter and applies the promotion gate. A stage is retried `flow.stage_retries` times
   when its failure may pass (killed process, OS error, DVC lock), never on bad input, params or code.
4. With `flow.push: true`, `dvc push` the outputs to the DVC remote (flows/remote.py) after every successful
   run, retrained or up to date (DVC sends only what the remote lacks, so a run also finishes an earlier failed
   push). A remote that is missing stops the run before training; a failed push fails the run, keeps the
   outputs here and says how to push them by hand.
5. Publish a Markdown report (Prefect artifact `retrain-report`): the new adapter beside the previous
   champion and the base model, promoted or not and why, the MLflow run with the command to open it, and
   what was pushed where.

Run: `python -m flows` (flows/__main__.py: it starts `dvc status` before Prefect is imported, so the two
overlap) or `python -m flows.retrain`; Prefect starts a temporary local server when PREFECT_API_URL is unset.
`python -m flows.serve` puts the flow on a schedule.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from flows.remote import PushFailed, push_outputs, push_target
from flows.workspace import (
    PROJECT_ROOT,
    Holding,
    StatusAhead,
    busy_message,
    close_orphans,
    command_line,
    describe_changes,
    lock_committed,
    pipeline_changes,
    stage_environment,
    workspace_lock,
)
from serving.champion import tell_servers
from stages import STAGES
from stages.common.config import Params, load_params, params_by_key
from stages.common.errors import TRANSIENT_EXIT
from stages.common.io import read_json
from stages.common.paths import Paths
from stages.common.report import comparison_markdown, comparison_table, data_markdown, promotion_markdown
from stages.tracking import history
from stages.tracking.names import TIMING, metric_name
from stages.tracking.orphans import Closed, closed_markdown
from stages.tracking.runs import log_metrics, run_name, start_pipeline_run
from stages.tracking.store import (
    TrackingUnreachable,
    client_for,
    is_server,
    require_server,
    shown_uri,
    tracking_uri,
)

REPORT_KEY = "retrain-report"
DVC_LOCK_BUSY = "Unable to acquire lock"


class StageFailed(RuntimeError):
    """`dvc repro <stage>` failed; `transient` says whether running it again may succeed."""

    def __init__(self, stage: str, message: str, transient: bool):
        super().__init__(message)
        self.stage = stage
        self.transient = transient


def stage_exit_status(output: str) -> int | None:
    """The stage command's exit status, from DVC's "failed to run: ..., exited with N" line."""
    found = re.findall(r"exited with (-?\d+)", output)
    return int(found[-1]) if found else None


def is_transient(status: int | None, output: str) -> bool:
    """Whether a failure may pass on a retry: the stage was killed by a signal (a lost worker, the OOM
    killer), hit an OS error (exit 75), or DVC's lock was held. Bad input, bad params and bugs exit 1."""
    if status is None:
        return DVC_LOCK_BUSY in output
    return status < 0 or status == TRANSIENT_EXIT or status > 128


def retry_when_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a stage or a push only when its failure may pass."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, (StageFailed, PushFailed)) and error.transient


ANSI_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves of nested tqdm bars
PROGRESS_FRAME = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # " 40%|████      | 2/5 [00:01<00:02]"


def loggable(line: str) -> str:
    """The text of an output line worth a log entry: its last carriage-return frame without terminal
    control codes; "" for a progress-bar frame, which only a terminal should show."""
    text = ANSI_CONTROL.sub("", line.rsplit("\r", 1)[-1]).rstrip()
    return "" if PROGRESS_FRAME.search(text) else text


def stream_lines(stream, logger, tail: deque) -> None:
    """Send complete lines to the Prefect log (and keep the last ones in `tail`); show progress-bar frames
    live on a terminal, redrawn in place and cleared before the next log line, and never log them."""
    live = sys.stderr.isatty()
    pending = ""
    for chunk in iter(lambda: stream.read1(4096), b""):
        pending += chunk.decode("utf-8", errors="replace")
        *lines, pending = pending.split("\n")
        for line in lines:
            text = loggable(line)
            if text:
                if live:
                    sys.stderr.write("\r\033[K")
                logger.info(text)
                tail.append(text)
        if "\r" in pending:
            done, pending = pending.rsplit("\r", 1)
            if live:
                sys.stderr.write("\r\033[K" + done.rsplit("\r", 1)[-1][:150])
                sys.stderr.flush()
    if loggable(pending):
        logger.info(loggable(pending))
        tail.append(loggable(pending))


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, project_dir: str, extra_env: dict[str, str]) -> None:
    """Run `dvc repro <stage>` in `project_dir`; raise StageFailed, saying whether a retry may help."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", stage]
    logger.info("$ %s", " ".join(command[2:]))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stage_environment(extra_env)
    ) as process:
        stream_lines(process.stdout, logger, tail)
        code = process.wait()
    if code != 0:
        output = "\n".join(tail)
        status = stage_exit_status(output)
        transient = is_transient(status, output)
        errors = [line for line in tail if "error" in line.lower()]
        why = errors[-1] if errors else f"exit code {code}"
        kind = "may pass on a retry" if transient else "will not pass by retrying"
        raise StageFailed(stage, f"`dvc repro {stage}` failed ({kind}): {why}", transient)


def mlflow_hint(uri: str, run_id: str, experiment_id: str) -> str:
    """Where the run is and how to open it: a tracking server's page for the run, or for a store opened
    directly (sqlite, postgresql, ...) the `mlflow ui` command and the page it serves."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if is_server(uri):
        return f"MLflow run `{run_id}` on the tracking server: {uri.rstrip('/')}/{page}"
    return f"MLflow run `{run_id}` in `{uri}`: `mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def timings(stage_seconds: dict[str, float]) -> str:
    return ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stage_seconds.items())


def trained_report(
    metrics: dict, record: dict, data: dict, changes: str, hint: str, stage_seconds: dict, past: str
) -> str:
    """The report of a run that trained: comparison, promotion, data, the history of retrains (`past`, Markdown),
    what changed and the stage times."""
    return (
        f"# Retrain report: retrained\n\n## Comparison on the test set\n\n{comparison_markdown(metrics)}\n\n"
        f"## Promotion\n\n{promotion_markdown(record)}\n\n{hint}\n\n## Data\n\n{data_markdown(data)}\n\n"
        f"## History\n\n{past}\n\n"
        f"## What changed\n\n```\n{changes}\n```\n\nStage times (dvc repro, skips included): {timings(stage_seconds)}\n"
    )


def closed_section(closed: list[Closed]) -> str:
    """The report's section on the runs closed when this run took the workspace ("" when none)."""
    return f"\n## Runs closed\n\n{closed_markdown(closed)}" if closed else ""


def past_retrains(client, experiment: str) -> str:
    """The history of retrains as Markdown: the table, and how many runs were closed after their process died."""
    table = history.markdown_table(history.retrains(client, experiment))
    note = history.closed_note(client, experiment)
    return f"{table}\n\n{note}" if note else table


def publish(markdown: str, description: str) -> None:
    create_markdown_artifact(markdown, key=REPORT_KEY, description=description)


def orphans_closed(paths: Paths, params: Params, holding: Holding) -> list[Closed]:
    return close_orphans(paths, params, holding, closer=f"retrain flow run {flow_run.get_name()}")


@dataclass(frozen=True)
class Shared:
    """What `flow.push` did: the report section, the line for the result, and the failure to raise."""

    section: str = ""
    line: str | None = None
    failure: PushFailed | None = None

    def publish(self, markdown: str, description: str) -> None:
        """Publish the report with this section; then raise the push failure, if any, to fail the run."""
        publish(markdown + self.section, f"{description}, push failed" if self.failure else description)
        if self.failure:
            raise self.failure


def share_outputs(paths: Paths, params: Params, target: tuple[str, str] | None) -> Shared:
    """`dvc push` to `target` (remote name, masked URL) as a Prefect task retried on transient failures;
    nothing when flow.push is off (`target` None)."""
    if target is None:
        return Shared()
    remote, url = target
    pushing = push_outputs.with_options(
        retries=params.flow.stage_retries,
        retry_delay_seconds=params.flow.retry_delay_seconds,
        retry_condition_fn=retry_when_transient,
    )
    try:
        pushed = pushing(str(paths.root), remote, url)
    except PushFailed as exc:
        failure = PushFailed(
            f"push failed: {exc}. The run itself succeeded: its outputs stay in this workspace and its DVC cache; "
            f"push them by hand with `dvc push -r {remote}` once the remote works (or let the next run do it)",
            exc.transient,
        )
        return Shared(f"\n## Shared outputs\n\n**{failure}**\n", None, failure)
    print(pushed.line())
    return Shared(f"\n## Shared outputs\n\n{pushed.line()}.\n", pushed.line())


def up_to_date(paths: Paths, params: Params, target: tuple[str, str] | None, holding: Holding) -> dict:
    """Report that nothing changed, naming the last recorded run; start nothing but the push (flow.push), and
    close the runs left RUNNING when the last holder of the workspace was killed."""
    closed = []
    if holding.stale:  # only then: a no-op retrain need not start MLflow
        try:
            require_server(tracking_uri(paths, params))
            closed = orphans_closed(paths, params, holding)
        except TrackingUnreachable as exc:
            print(f"runs left RUNNING by dead processes stay open for now: {exc}")
    last = read_json(paths.run_record) if paths.run_record.is_file() else {}
    since = f" The last recorded run is `{last['run_id']}` in `{last['tracking_uri']}`." if last else ""
    print("up to date: data, params and code match dvc.lock; nothing to retrain")
    shared = share_outputs(paths, params, target)
    shared.publish(
        "# Retrain report: up to date\n\nNothing changed since dvc.lock was written (data, params and code "
        f"all match), so nothing was trained and no MLflow run was started.{since}\n{closed_section(closed)}",
        "up to date",
    )
    return {
        "state": "up to date", "run_id": None, "last_run_id": last.get("run_id"), "pushed": shared.line,
        "closed_runs": [run.run_id for run in closed],
    }  # fmt: skip


def run_stages(paths: Paths, params: Params, run_id: str) -> dict[str, float]:
    """Every stage in order through DVC, with the MLflow run id in their environment; seconds per stage."""
    extra_env = {
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_TRACKING_URI": tracking_uri(paths, params),
        "PIPELINE_STARTED_BY": "prefect",
    }
    retrying = repro_stage.with_options(
        retries=params.flow.stage_retries,
        retry_delay_seconds=params.flow.retry_delay_seconds,
        retry_condition_fn=retry_when_transient,
    )
    stage_seconds = {}
    for stage in STAGES:
        started = time.perf_counter()
        retrying(stage, str(paths.root), extra_env)
        stage_seconds[stage] = round(time.perf_counter() - started, 1)
    return stage_seconds


def retrain_changed(
    paths: Paths, params: Params, changes: str, target: tuple[str, str] | None, holding: Holding
) -> dict:
    """Check the MLflow server (a down one stops the run before training), close the runs dead processes left
    RUNNING, run the stages into one MLflow run, close it, push the outputs (flow.push) and publish the report."""
    require_server(tracking_uri(paths, params))
    closed = orphans_closed(paths, params, holding)
    client = client_for(paths, params)
    lock = paths.root / "dvc.lock"  # still the last run's: no stage has run yet
    name = run_name("retrain", lock.read_text(encoding="utf-8") if lock.is_file() else None, params_by_key(params))
    run_id = start_pipeline_run(paths, params, started_by="prefect", run_name=name)
    client.set_tag(run_id, "prefect.flow_run_id", str(flow_run.get_id()))
    client.set_tag(run_id, "prefect.flow_run_name", flow_run.get_name())
    client.set_tag(run_id, "prefect.deployment", deployment.get_name() or "none (python -m flows.retrain)")
    uri = shown_uri(tracking_uri(paths, params))
    hint = mlflow_hint(uri, run_id, client.get_run(run_id).info.experiment_id)
    try:
        stage_seconds = run_stages(paths, params, run_id)
    except Exception as exc:
        client.set_terminated(run_id, status="FAILED")
        publish(
            f"# Retrain report: failed\n\n{exc}\n\n{hint}\n\n## What changed\n\n```\n{changes}\n```\n"
            f"{closed_section(closed)}",
            "failed",
        )
        raise
    record = read_json(paths.run_record)
    if record["run_id"] != run_id:  # record_run was up to date: nothing it reads changed
        client.delete_run(run_id)
        shared = share_outputs(paths, params, target)
        shared.publish(
            f"# Retrain report: outputs unchanged\n\n```\n{changes}\n```\n{closed_section(closed)}", "outputs unchanged"
        )
        return {
            "state": "outputs unchanged",
            "run_id": record["run_id"],
            "stage_seconds": stage_seconds,
            "pushed": shared.line,
            "closed_runs": [run.run_id for run in closed],
        }
    times = {metric_name(TIMING, f"{stage}_seconds"): seconds for stage, seconds in stage_seconds.items()}
    log_metrics(client, run_id, times)
    client.set_terminated(run_id, status="FINISHED")  # the training succeeded, whatever the push does
    metrics = read_json(paths.eval_metrics)
    if record.get("previous_champion"):
        metrics["champion"] = record["previous_champion"]
    data = read_json(paths.data_metrics)
    print(
        f"\n{comparison_table(metrics)}\n\n{promotion_markdown(record)}\n"
        f"stage times (dvc repro, skips included): {timings(stage_seconds)}\n{hint}"
    )
    if not lock_committed(paths.root):
        print(
            "to compare later runs, experiments and sweeps with this one (dvc metrics diff, dvc exp show, make "
            "sweep), commit it: git add dvc.lock && git commit -m 'pipeline results'"
        )
    shared = share_outputs(paths, params, target)
    past = past_retrains(client, params.tracking.experiment)
    print(f"\nretrain history (python -m flows.history):\n{past}")
    report = trained_report(metrics, record, data, changes, hint, stage_seconds, past) + closed_section(closed)
    shared.publish(report, "retrained")
    if record.get("promoted"):
        print(tell_servers(params.serve))
    return {
        "state": "retrained",
        "run_id": run_id,
        "metrics": metrics,
        "promotion": record,
        "stage_seconds": stage_seconds,
        "pushed": shared.line,
        "closed_runs": [run.run_id for run in closed],
    }


# `dvc status` started by `main` before the flow run (flows/__main__.py starts it before importing Prefect);
# one answer for one flow run.
_status_ahead: StatusAhead | None = None


def workspace_changes(paths: Paths, stale: bool) -> dict:
    """What `dvc status` says changed: the answer started ahead when there is one for this workspace and
    nothing could have changed since (`stale`: the lock had to wait for another retrain)."""
    global _status_ahead
    ahead, _status_ahead = _status_ahead, None
    if ahead is not None and ahead.root == paths.root and not stale:
        return ahead.changes()
    if ahead is not None:
        ahead.discard()
    return pipeline_changes(paths.root, stage_environment({}))


@flow(name="retrain", log_prints=True)
def retrain(project_dir: str = str(PROJECT_ROOT)) -> dict:
    """Retrain what changed in `project_dir`, record it and report; return the state, run id and metrics."""
    paths = Paths.at(project_dir)
    params = load_params(paths.params)
    with workspace_lock(paths, params.flow.lock_wait_seconds, owner=f"flow run {flow_run.get_name()}") as holding:
        target = push_target(paths.root, params.flow.remote) if params.flow.push else None  # before training
        changes = workspace_changes(paths, stale=holding.waited)
        if not changes:
            return up_to_date(paths, params, target, holding)
        summary = describe_changes(changes)
        print(f"changed since the last run:\n{summary}")
        return retrain_changed(paths, params, summary, target, holding)


def run_settings(quick: bool):
    """Prefect settings for this process's flow run: no analytics, and more time for the temporary server to
    start than Prefect's default 20 s (on 2 busy cores it can take about that), unless the environment says
    otherwise; and, for a run DVC already said has nothing to do (`quick`), no heartbeat thread: heartbeats
    tell the server a long run is alive, and joining their thread at the end costs a short run up to a second."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    updates = {}
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 120
    if quick:
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    return temporary_settings(updates)


def main(argv: list[str] | None = None, ahead: StatusAhead | None = None) -> int:
    """Run the retrain flow once on --project-dir; `ahead` is a `dvc status` already started there."""
    global _status_ahead
    args = command_line(argv)
    busy = busy_message(Paths.at(args.project_dir))  # fail fast, before Prefect starts a server
    if busy:
        if ahead is not None:
            ahead.discard()
        print(f"retrain not started: {busy}", file=sys.stderr)
        return 1
    _status_ahead = ahead
    quick = ahead is not None and ahead.root == Path(args.project_dir).resolve() and ahead.says_up_to_date()
    try:
        with run_settings(quick):
            retrain(project_dir=args.project_dir)
    except Exception as exc:  # the Prefect log above has the details; end with one clear line
        print(f"retrain failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
