"""Serve the retrain flow on a cron schedule against a Prefect server.

Registers the deployment `retrain/<flow.deployment>` (schedule `flow.schedule` in `flow.timezone`, or
--cron) and runs its flow runs in this process until stopped. At most one run of it at a time (a global
concurrency limit of 1: a run due while another runs waits for it); each run retrains only what DVC
says changed, and a run with nothing changed ends in seconds with an "up to date" report.

Stopping this process (Ctrl-C) pauses the deployment, so no runs pile up with nobody to execute them;
starting it again resumes the schedule. Meanwhile `prefect deployment run retrain/<name>` queues a run
that starts as soon as the deployment is served again.

Run: `prefect server start` in one terminal, then in another
`PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve [--cron "0 3 * * *"]` (or `make serve`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from flows.retrain import PROJECT_ROOT, retrain
from stages.common.config import load_params
from stages.common.errors import ConfigError
from stages.common.paths import Paths


def check_server() -> str | None:
    """Why serving cannot work here (no Prefect server configured), or None."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    return (
        "PREFECT_API_URL is not set: a schedule needs a Prefect server that outlives this process. "
        "Start one with `prefect server start` (or `make prefect-server`) and run "
        "`export PREFECT_API_URL=http://127.0.0.1:4200/api` before `python -m flows.serve`"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the retrain flow on a cron schedule.")
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="project root holding dvc.yaml")
    parser.add_argument("--cron", help="cron schedule; default: flow.schedule in params.yaml")
    parser.add_argument("--name", help="deployment name; default: flow.deployment in params.yaml")
    args = parser.parse_args(argv)
    problem = check_server()
    if problem:
        print(f"serve: {problem}", file=sys.stderr)
        return 1
    paths = Paths.at(args.project_dir)
    try:
        cfg = load_params(paths.params).flow
    except ConfigError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    schedule = args.cron or cfg.schedule
    name = args.name or cfg.deployment
    print(f"serving retrain/{name} on '{schedule}' ({cfg.timezone}) for {paths.root}")
    # A process started in the background by a non-interactive shell (`make serve &`, some CI runners and process
    # managers) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: Ctrl-C or `kill -INT`
    # would not stop serving nor pause the deployment. Take SIGINT back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from prefect.schedules import Cron

    retrain.serve(
        name=name,
        schedule=Cron(schedule, timezone=cfg.timezone),
        parameters={"project_dir": str(paths.root)},
        paused=False,  # serving again resumes a schedule that stopping paused
        pause_on_shutdown=True,
        global_limit=1,
        description="Retrain the QLoRA adapter when data, params or code changed; promote it if it is better.",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
