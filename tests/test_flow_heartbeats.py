"""The automation that marks a retrain or sweep flow run Crashed when its heartbeats stop (flows/heartbeats.py);
tests/test_flow_chaos.py runs it against a Prefect server on loopback with flow runs killed by SIGKILL."""

from datetime import timedelta

import pytest

from flows.heartbeats import FLOW_NAMES, MISSED_BEATS, heartbeat_seconds, zombie_automation


def test_the_automation_waits_missed_beats_after_a_heartbeat_of_this_projects_flows_then_crashes_the_run():
    automation = zombie_automation(60)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.within == timedelta(seconds=60 * MISSED_BEATS) and trigger.for_each == {"prefect.resource.id"}
    related = trigger.match_related if isinstance(trigger.match_related, list) else [trigger.match_related]
    assert any(spec.get("prefect.resource.name") == list(FLOW_NAMES) for spec in related)
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"


def test_the_period_comes_from_prefects_setting_and_an_unset_one_is_refused():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45}):
        assert heartbeat_seconds() == 45
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), pytest.raises(ValueError, match="unset"):
        heartbeat_seconds()
