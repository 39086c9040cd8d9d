"""One retrain per workspace at a time, and reading `dvc status`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.workspace import DvcStatusFailed, WorkspaceBusy, busy_message, describe_changes, workspace_lock
from stages.common.paths import Paths

HOLD = """
import sys, time
from flows.workspace import workspace_lock
from stages.common.paths import Paths
with workspace_lock(Paths.at(sys.argv[1]), 0, owner="flow run first-run"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(root, seconds: float) -> subprocess.Popen:
    """Another process holding the workspace for `seconds`; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_retrain_stops_with_the_holder_named(tmp_path):
    holder = hold_lock(tmp_path, 30)
    try:
        busy = pytest.raises(WorkspaceBusy, match=rf"pid {holder.pid} .*flow run first-run.*let it finish")
        with busy, workspace_lock(Paths.at(tmp_path), 0, owner="second"):
            pass
        assert f"pid {holder.pid}" in busy_message(Paths.at(tmp_path))
    finally:
        holder.kill()
        holder.wait()


def test_a_second_retrain_waits_for_the_first_when_asked(tmp_path):
    holder = hold_lock(tmp_path, 1.5)
    started = time.monotonic()
    with workspace_lock(Paths.at(tmp_path), 30, owner="second") as holding:
        waited = time.monotonic() - started
        assert "second" in busy_message(Paths.at(tmp_path))
    holder.wait()
    assert 0.5 < waited < 30
    assert holding.waited  # so the flow asks DVC again rather than trust an answer from before the wait
    assert holding.stale is None  # the first let go
    with workspace_lock(Paths.at(tmp_path), 30, owner="third") as holding:
        assert not holding.waited


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = hold_lock(tmp_path, 30)
    holder.kill()
    holder.wait()
    assert busy_message(Paths.at(tmp_path)) is None
    with workspace_lock(Paths.at(tmp_path), 0, owner="after a crash") as holding:
        assert holding.stale["pid"] == holder.pid and holding.stale["owner"] == "flow run first-run"
    with workspace_lock(Paths.at(tmp_path), 0, owner="after that") as holding:
        assert holding.stale is None  # the one before let go


def test_flow_refuses_to_start_on_a_busy_workspace(tmp_path, capsys):
    from flows import retrain

    holder = hold_lock(tmp_path, 30)
    try:
        assert retrain.main(["--project-dir", str(tmp_path)]) == 1
    finally:
        holder.kill()
        holder.wait()
    assert "retrain not started: another retrain is running" in capsys.readouterr().err


def test_status_started_ahead_gives_what_dvc_status_gives(tmp_path):
    from flows.workspace import StatusAhead, pipeline_changes

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    assert StatusAhead(tmp_path, env).changes() == pipeline_changes(tmp_path, env) != {}
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=tmp_path, env=env, check=True)
    assert StatusAhead(tmp_path, env).changes() == {}
    (tmp_path / "dvc.yaml").write_text("not: [valid")
    with pytest.raises(DvcStatusFailed, match="`dvc status` failed in"):
        StatusAhead(tmp_path, env).changes()


def test_the_flow_asks_dvc_again_when_the_answer_ahead_may_be_stale(tmp_path, monkeypatch):
    from flows import retrain

    asked = []
    monkeypatch.setattr(retrain, "pipeline_changes", lambda root, env: asked.append(root) or {"stage": ["changed"]})
    ahead = retrain.StatusAhead(tmp_path, None)  # not a DVC project: this answer would be an error
    monkeypatch.setattr(retrain, "_status_ahead", ahead)
    assert retrain.workspace_changes(Paths.at(tmp_path), stale=True) == {"stage": ["changed"]}
    assert asked == [Paths.at(tmp_path).root] and ahead.process.returncode is not None
    assert retrain._status_ahead is None  # used up: a later flow run in this process asks DVC itself


def test_dvc_status_is_described_one_line_per_stage():
    status = {
        "train_qlora": [{"changed deps": {"params.yaml": {"train.learning_rate": "modified"}}}],
        "split_data": [{"changed deps": {"data/raw": "modified"}}, {"changed outs": {"data/splits": "deleted"}}],
        "export_hub": ["always changed"],
    }
    assert describe_changes(status).splitlines() == [
        "train_qlora: changed deps: params.yaml train.learning_rate modified",
        "split_data: changed deps: data/raw modified; changed outs: data/splits deleted",
        "export_hub: always changed",
    ]
