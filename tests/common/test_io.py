"""Writes that never leave a half-written output, even after a writer killed mid-write."""

import os
import signal
import subprocess
import sys
import time

from stages.common.io import write_json

SLOW_WRITER = """
import sys, time
from pathlib import Path
from stages.common.io import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_the_old_file_and_its_leftovers_go_with_the_next_write(tmp_path):
    target = tmp_path / "metrics" / "eval.json"
    write_json(target, {"old": 1})
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert target.read_text().strip().startswith("{") and '"old": 1' in target.read_text()
    assert [p.name for p in target.parent.iterdir() if p.name != "eval.json"]  # the killed writer's folder
    time.sleep(0.01)
    write_json(target, {"new": 2})
    assert sorted(p.name for p in target.parent.iterdir()) == ["eval.json"]
    assert '"new": 2' in target.read_text()
