"""sweeps/queue.py: reading `dvc queue status`, and timing trials from its states."""

from __future__ import annotations

from sweeps import queue
from sweeps.queue import Watch


def test_queue_status_lines_become_states(monkeypatch):
    printed = (
        "Task     Name       Created    Status\n"
        "5f55b82  sw-01      04:40 PM   Running\n"
        "bad2475  sw-02      04:40 PM   Queued\n"
        "a04b5b9  sw-03      Nov 28, 2026   Failed\n\n"
        "Worker status: 1 active, 0 idle\n"
    )
    monkeypatch.setattr(queue, "dvc", lambda root, env, *args: printed)
    assert queue.queue_states(None, {}) == {"sw-01": "Running", "sw-02": "Queued", "sw-03": "Failed"}


def test_the_watch_times_each_trial_from_running_to_done(monkeypatch):
    polls = iter([
        {"a": "Running", "b": "Queued"},
        {"a": "Running", "b": "Running"},
        {"a": "Success", "b": "Running"},
        {"b": "Failed"},  # a finished trial may drop out of the listing: it keeps its state
    ])  # fmt: skip
    clock = iter([0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(queue.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(queue.time, "sleep", lambda seconds: None)
    said = []
    watch = Watch(["a", "b"], interval=0)
    assert watch.until_done(lambda: next(polls), said.append) == {"a": "Success", "b": "Failed"}
    assert (watch.seconds("a"), watch.offset("a")) == (20.0, 0.0)
    assert (watch.seconds("b"), watch.offset("b")) == (20.0, 10.0)
    assert said[-1] == "[2/2 done] b: failed after 0.3 min"
