"""Benchmark: a no-op retrain (nothing changed) through the Prefect flow, against a bare `dvc status`.

Needs a finished pipeline (`make demo`), so DVC finds everything up to date. Uses the Prefect server in
PREFECT_API_URL, or starts one on loopback for the measurement (its start-up is not counted). Each command
runs `--repeats` times as a fresh process, as a scheduled or manual run would; the flow's runs are
checked to end "up to date". Prints the median wall time of each and the flow's overhead over `dvc
status`; writes bench/results/pipeline_overhead.json.

Run: `python -m bench.pipeline_overhead [--repeats 5]` (or `make bench-overhead`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.servers import prefect_server
from stages.common.io import write_json
from stages.common.paths import Paths

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_overhead.json"


def timed(command: list[str], root: Path, env: dict, expect: str) -> float:
    """Wall seconds of one run of `command`; stop if its output lacks `expect` (something was not up to date)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    if done.returncode != 0 or expect not in output:
        raise SystemExit(
            f"`{' '.join(command[2:])}` did not report '{expect}' (run `make demo` first):\n{output[-2000:]}"
        )
    return seconds


@contextlib.contextmanager
def prefect_api(env: dict):
    """The Prefect server to use: PREFECT_API_URL's, or one started here for the benchmark."""
    if env.get("PREFECT_API_URL"):
        yield env["PREFECT_API_URL"], "given in PREFECT_API_URL"
        return
    with tempfile.TemporaryDirectory() as home, prefect_server(Path(home), env) as url:
        yield url, "started on loopback by the benchmark"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    paths = Paths.at(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    status = [sys.executable, "-m", "dvc", "status"]
    flow = [sys.executable, "-m", "flows", "--project-dir", str(paths.root)]  # what `make demo` runs
    with prefect_api(env) as (url, where):
        env["PREFECT_API_URL"] = url
        timed(flow, paths.root, env, "up to date")  # warm-up: first contact with the server
        dvc_seconds = [timed(status, paths.root, env, "up to date") for _ in range(args.repeats)]
        flow_seconds = [timed(flow, paths.root, env, "up to date") for _ in range(args.repeats)]
    dvc_median, flow_median = statistics.median(dvc_seconds), statistics.median(flow_seconds)
    print(f"Prefect server: {url} ({where}); {args.repeats} runs each, fresh processes, median wall time")
    print(f"{'command':<40} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, values in (("dvc status", dvc_seconds), ("python -m flows (up to date)", flow_seconds)):
        print(f"{name:<40} {statistics.median(values):>9.2f} {min(values):>7.2f} {max(values):>7.2f}")
    print(f"flow overhead over dvc status: {flow_median - dvc_median:+.2f} s (target: at most +3 s)")
    write_json(
        RESULTS,
        {
            "repeats": args.repeats,
            "prefect_server": where,
            "dvc_status_seconds": dvc_seconds,
            "flow_up_to_date_seconds": flow_seconds,
            "dvc_status_median": round(dvc_median, 2),
            "flow_up_to_date_median": round(flow_median, 2),
            "overhead_seconds": round(flow_median - dvc_median, 2),
        },
    )
    print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
