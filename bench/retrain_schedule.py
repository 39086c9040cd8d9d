"""Benchmark: scheduled retraining played out. The real diamonds arrive in deliveries, and the flow runs after each.

A fresh clone of this repository's committed HEAD in a temporary folder (the default params, the embedded base
model) reads its data from a folder, data/raw/diamonds/, tracked by `dvc add` as the docs say. The 53,940 diamonds
(plotnine's table, described as the embedded source describes them) are shuffled with a fixed seed and cut into
deliveries (`--shares`, default 80%, 12%, 8%). For each delivery: write it as one more CSV file into the folder,
`dvc add data/raw/diamonds`, commit, run `python -m flows`, commit dvc.lock. Then prints, per delivery, the test
items kept and added since the run before, the training rows new to the run, whom the gate compared with and
on how many items, its decision with the reason, and the flow's wall time; and the retrain history as
`python -m flows.history` prints it. Writes bench/results/retrain_schedule.json with the machine it ran on.

Each delivery is a whole default run (minutes on a 2-core CPU: docs/performance.md), plus the champion's
re-scoring when the test set grew by more than `tracking.min_shared` allows.

Run: `python -m bench.retrain_schedule [--shares 0.8,0.12,0.08] [--keep DIR]` (or `make bench-schedule`).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import machine
from stages.common.io import read_json, write_json
from stages.data.sources import read_diamonds
from tests.flow_workspace import commit, dvc, flow, run, set_param, workspace_env

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "retrain_schedule.json"
FOLDER = "data/raw/diamonds"
SHUFFLE_SEED = 0  # which diamonds arrive in which delivery


def deliveries(shares: list[float]) -> list[list[dict]]:
    """The diamonds as text/price rows, shuffled with SHUFFLE_SEED and cut into consecutive parts of `shares`."""
    rows = [record.values for record in read_diamonds()]
    random.Random(SHUFFLE_SEED).shuffle(rows)
    cuts = [round(sum(shares[:i]) / sum(shares) * len(rows)) for i in range(len(shares) + 1)]
    return [rows[start:end] for start, end in itertools.pairwise(cuts)]


def write_delivery(root: Path, number: int, rows: list[dict]) -> None:
    import pandas as pd

    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["text", "price"]).to_csv(folder / f"delivery-{number:02d}.csv", index=False)


def outcome(root: Path, seconds: float, rows: int) -> dict:
    """What one retrain left in the workspace: the data summary, the gate's record, the time."""
    data = read_json(root / "metrics" / "data.json")
    record = read_json(root / "reports" / "mlflow_run.json")
    since = data.get("since_last_run") or {}
    test, train = since.get("test") or {}, since.get("train") or {}
    comparison = record.get("comparison") or {}
    return {
        "delivered_rows": rows,
        "rows_in": data["rows_in"],
        "test_items": data["test"]["n"],
        "test_kept": test.get("kept"),
        "test_added": test.get("added"),
        "test_removed": test.get("removed"),
        "moved": since.get("moved"),
        "train_items": data["train"]["n"],
        "train_new": train.get("added"),
        "metric": comparison.get("metric"),
        "candidate": comparison.get("candidate"),
        "reference": comparison.get("reference"),
        "improvement": comparison.get("improvement"),
        "interval": [comparison.get("interval_low"), comparison.get("interval_high")],
        "compared_items": comparison.get("n_items"),
        "compared_with": compared_with(comparison),
        "version": record["version"],
        "alias": record["alias"],
        "promoted": record["promoted"],
        "reason": record["reason"],
        "seconds": round(seconds, 1),
    }


COLUMNS = (
    "delivery",
    "rows in",
    "test",
    "kept",
    "added",
    "train",
    "new",
    "compared",
    "with",
    "version",
    "decision",
    "time",
)


def compared_with(comparison: dict) -> str:
    """Whom the gate compared the candidate with, and how, in a few words: "base model", "v1, shared items",
    "v1, re-scored"."""
    against = comparison.get("against") or ""
    if not against.startswith("champion v"):
        return "base model" if "base model" in against else "-"
    how = "re-scored" if "re-scored" in comparison.get("basis", "") else "shared items"
    return f"{against.removeprefix('champion ')}, {how}"


def table(results: list[dict]) -> str:
    """One line per delivery: rows in, test items (kept and added since the run before), train items (new to
    this run's training: n_train keeps the size, new rows can take old ones' places), the items the gate
    compared and with what, the version registered, its alias, the flow's wall time."""

    def shown(value) -> str:
        return "-" if value is None else f"{value:,}"

    rows = []
    for number, r in enumerate(results, start=1):
        decision = "champion" if r["promoted"] else (r["alias"] or "none")
        minutes = f"{r['seconds'] // 60:.0f} m {r['seconds'] % 60:02.0f} s"
        counted = ("rows_in", "test_items", "test_kept", "test_added", "train_items", "train_new", "compared_items")
        counts = [shown(r[key]) for key in counted]
        rows.append((number, *counts, r["compared_with"], f"v{r['version']}", decision, minutes))
    widths = [max(len(str(cell)) for cell in column) for column in zip(COLUMNS, *rows, strict=True)]
    lines = ["  ".join(f"{cell:>{width}}" for cell, width in zip(row, widths, strict=True)) for row in [COLUMNS, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def play(root: Path, shares: list[float]) -> tuple[list[dict], str]:
    """Clone the project into `root`, deliver the diamonds part by part and retrain after each; the outcomes
    and the history as printed."""
    env = workspace_env(root, None)
    run(["git", "clone", "-q", str(REPO), str(root)], REPO, env)
    set_param(root, "data", "source", FOLDER)
    results = []
    for number, rows in enumerate(deliveries(shares), start=1):
        write_delivery(root, number, rows)
        dvc(["add", "-q", FOLDER], root, env)
        commit(root, env, f"delivery {number}: {len(rows):,} rows")
        print(f"delivery {number}: {len(rows):,} rows into {FOLDER}/; python -m flows ...", flush=True)
        started = time.perf_counter()
        flow(root, env)
        results.append(outcome(root, time.perf_counter() - started, len(rows)))
        print(f"  v{results[-1]['version']} {results[-1]['alias']}: {results[-1]['reason']}", flush=True)
        commit(root, env, f"retrain after delivery {number}")
    history = run([sys.executable, "-m", "flows.history"], root, env).stdout
    return results, history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0.8,0.12,0.08", help="each delivery's share of the diamonds, in order")
    parser.add_argument("--keep", default=None, help="play in this (new) folder and keep it, for a look afterwards")
    args = parser.parse_args(argv)
    shares = [float(share) for share in args.shares.split(",")]
    if len(shares) < 2 or min(shares) <= 0:
        parser.error("--shares: two or more positive shares, such as 0.8,0.12,0.08")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retrain-schedule-") as scratch:
        root = Path(args.keep).resolve() if args.keep else Path(scratch) / "workspace"
        results, history = play(root, shares)
    print(f"\n{table(results)}\n")
    for number, r in enumerate(results, start=1):
        print(f"delivery {number}: {r['reason']}")
    print(f"\n{history}")
    write_json(
        RESULTS,
        {
            "shares": shares,
            "shuffle_seed": SHUFFLE_SEED,
            "deliveries": results,
            "history": history.replace(str(root), "<workspace>"),  # the scratch clone's path means nothing later
            "seconds": round(time.perf_counter() - started, 1),
            "machine": machine(),
        },
    )
    print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
