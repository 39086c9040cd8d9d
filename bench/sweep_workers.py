"""Benchmark: the tiny 2 x 2 sweep of tests/sweeps/test_workers.py with `sweep.backend: prefect` on 1 and on 2
Prefect workers, each worker in its own clone, against MLflow and Prefect servers on PostgreSQL.

For each worker count: fresh servers, a fresh coordinator project and clones (tests/sweep_machines.py), then one
`python -m flows.sweep`, timed from start to exit (the trials, the `dvc exp pull`, the gate, the report). The
"machines" share this machine's cores: each worker's trials get cores / workers torch threads, so two workers
on 2 cores measure how well trials overlap their waiting (DVC, git, MLflow uploads), not two machines' worth of
compute. Prints the wall time per count and writes bench/results/sweep_workers.json with the machine.

Run: `python -m bench.sweep_workers [--workers 1 2]` (or `make bench-sweep-workers`); needs PostgreSQL
(docs/operations.md, "Servers on PostgreSQL").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

from bench.machine import describe, machine
from infra.servers import shared_servers
from stages.common.io import write_json
from tests.conftest import TINY_LLAMA, save_random_llama
from tests.sweep_machines import run_sweep, sweep_machines

RESULTS = Path(__file__).resolve().parent / "results" / "sweep_workers.json"


def one_count(workers: int, folder: Path, tiny_model: Path) -> dict:
    """The sweep on `workers` workers, everything under `folder`: its wall time and where each trial ran."""
    postgres_folder = Path(tempfile.mkdtemp(prefix="qlora-postgres-"))  # reachable by the postgres user
    try:
        with (
            shared_servers(folder / "servers", dict(os.environ), postgres_folder) as servers,
            sweep_machines(folder / "machines", servers, tiny_model, workers) as machines,
        ):
            _, seconds, report = run_sweep(machines)
    finally:
        shutil.rmtree(postgres_folder, ignore_errors=True)
    succeeded = re.search(r"(\d+) of (\d+) trials succeeded", (report / "report.md").read_text())
    return {"workers": workers, "seconds": round(seconds, 1), "trials": succeeded.group(0) if succeeded else "?"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    args = parser.parse_args(argv)
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep-workers-") as scratch:
        tiny_model = save_random_llama(Path(scratch) / "tiny-llama", TINY_LLAMA)
        for workers in args.workers:
            rows.append(one_count(workers, Path(scratch) / f"workers-{workers}", tiny_model))
            print(f"{workers} worker(s): {rows[-1]['seconds']:.1f} s ({rows[-1]['trials']})", flush=True)
    print(f"\n{describe(info)}; the tiny 2 x 2 sweep (4 steps a trial), sweep.backend prefect")
    print(f"{'workers':>7}  {'wall s':>7}  trials")
    for row in rows:
        print(f"{row['workers']:>7}  {row['seconds']:>7.1f}  {row['trials']}")
    write_json(RESULTS, {"machine": info, "rows": rows})
    print(f"written: {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
