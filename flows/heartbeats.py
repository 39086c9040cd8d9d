"""The Prefect automation that marks a retrain, sweep or sweep-trial flow run Crashed when its heartbeats stop.

A flow run whose process is killed with SIGKILL (the OOM killer, a lost machine) cannot report its end, so on a
long-lived Prefect server it stays Running until someone acts. Prefect's flow runs emit a heartbeat event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (180 by default, 30 at least), a first one as they start. This
automation is Prefect's recipe for such "zombie" runs (docs.prefect.io, "Detect zombie flows"), scoped to this
project's flows: after a heartbeat of a `retrain`, `sweep` or `sweep-trial` flow run, when neither another
heartbeat nor a final state follows within MISSED_BEATS heartbeat periods, it sets the flow run Crashed. The
period is the frequency this process's Prefect settings say: give the workers (which run the flow runs) the
same setting.

Run: `PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.heartbeats` (`make deploy` and `make serve` run
it). Running it again updates the automation of the same name rather than adding one.
"""

from __future__ import annotations

import sys
from datetime import timedelta

AUTOMATION_NAME = "qlora-pipeline: crash flow runs whose heartbeats stopped"
FLOW_NAMES = ("retrain", "sweep", "sweep-trial")
MISSED_BEATS = 2  # a heartbeat a period late (a busy machine, a slow server) is not a dead run
FINAL_EVENTS = tuple(f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed"))


def heartbeat_seconds() -> int:
    """The heartbeat period of flow runs, from this process's Prefect settings (at least Prefect's minimum)."""
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency
    if frequency is None:
        raise ValueError(
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset, so flow runs send no heartbeats for this automation to "
            "watch: set it (seconds, 30 or more; Prefect's default is 180)"
        )
    return max(frequency, MINIMUM_HEARTBEAT_INTERVAL)


def zombie_automation(period: int):
    """The automation, for heartbeats every `period` seconds."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = period * MISSED_BEATS
    return Automation(
        name=AUTOMATION_NAME,
        description=f"Marks a {' or '.join(FLOW_NAMES)} flow run Crashed when {within} s pass after a heartbeat "
        "with neither another heartbeat nor a final state: its process died (flows/heartbeats.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within} s ({MISSED_BEATS} periods of {period} s): its process died",
            )
        ],
    )


def ensure_automation(period: int | None = None):
    """Create the automation on the Prefect server in PREFECT_API_URL, or update the one of the same name; return
    it and whether it was created."""
    from prefect.automations import Automation

    wanted = zombie_automation(period or heartbeat_seconds())
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # none of that name
        return wanted.create(), True
    wanted.id = existing.id
    wanted.update()
    return wanted, False


def main() -> int:
    from flows.serve import check_server

    problem = check_server()
    if problem:
        print(f"heartbeats: {problem}", file=sys.stderr)
        return 1
    try:
        automation, created = ensure_automation()
    except ValueError as exc:
        print(f"heartbeats: {exc}", file=sys.stderr)
        return 1
    print(f"{'created' if created else 'updated'} the automation {automation.name!r}: {automation.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
