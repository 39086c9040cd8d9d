"""Benchmark: split_data and tokenize_data at the course's data scale (about 400,000 items), and how they grow.

The data: the diamonds table (53,940 rows, described as the embedded source describes them) written `--copies`
times into one JSONL file, each text ending " Lot <copy>-<row>." so that every text is distinct (431,520 rows
for 8 copies). For each size in `--sizes` (the file's first rows), a scratch workspace reads that file with
data.test_fraction and val_fraction set for about 2,000 rows each, n_train -1 (the rest as in params.yaml),
and `python -m stages.split_data` then `python -m stages.tokenize_data` run there, each as its own process.
Prints the wall seconds and peak RSS of each stage per size, and the seconds per 100,000 rows (flat when the
cost grows linearly); writes bench/results/data_scale.json with the machine. Needs models/base for the
tokenizer (`make demo` first).

Run: `python -m bench.data_scale [--copies 8] [--sizes 53940 107880 215760 431520]` (or `make bench-data`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.machine import describe, machine
from stages.common.io import write_json
from stages.common.paths import Paths

RESULTS = Path(__file__).resolve().parent / "results" / "data_scale.json"
HELD_OUT = 2000  # test and val items each, as the course's 2,000 test items
STAGES = ("split_data", "tokenize_data")


def write_lots(path: Path, copies: int) -> int:
    """Write the diamonds table `copies` times as JSONL with distinct texts; the number of rows written."""
    from stages.data.sources import read_diamonds

    diamonds = read_diamonds()
    with path.open("w", encoding="utf-8") as out:
        for copy in range(1, copies + 1):
            for number, record in enumerate(diamonds, start=1):
                row = {"text": f"{record.values['text']} Lot {copy}-{number}.", "price": record.values["price"]}
                out.write(json.dumps(row) + "\n")
    return copies * len(diamonds)


def scratch_workspace(folder: Path, source: Path, rows: int, project: Paths) -> Path:
    """A workspace reading the first `rows` rows of `source`, with this project's params and base model."""
    folder.mkdir()
    raw = folder / "data" / "raw" / "lots.jsonl"
    raw.parent.mkdir(parents=True)
    with source.open(encoding="utf-8") as lines, raw.open("w", encoding="utf-8") as out:
        for _ in range(rows):
            out.write(next(lines))
    params = yaml.safe_load(project.params.read_text(encoding="utf-8"))
    share = HELD_OUT / rows  # about HELD_OUT test and val rows each: the membership rule draws shares
    params["data"].update(source="data/raw/lots.jsonl", test_fraction=share, val_fraction=share, n_train=-1)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (folder / "models").mkdir()
    (folder / "models" / "base").symlink_to(project.base_model.resolve())
    return folder


def run_stage(stage: str, root: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of `python -m stages.<stage>` run in `root` as its own process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    started = time.perf_counter()
    with (root / f"{stage}.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed in {root}:\n{(root / f'{stage}.log').read_text()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # Linux: KiB


def measure(source: Path, rows: int, scratch: Path, project: Paths) -> dict:
    """Both stages on the first `rows` rows: {"rows", stage: {"seconds", "peak_rss_mb"}, "examples"}."""
    root = scratch_workspace(scratch / f"rows-{rows}", source, rows, project)
    result = {"rows": rows, **{stage: run_stage(stage, root) for stage in STAGES}}
    tokens = json.loads(Paths.at(root).token_metrics.read_text(encoding="utf-8"))
    result["examples"] = {name: split["examples"] for name, split in tokens.items()}
    result["max_tokens"] = max(split["max_tokens"] for split in tokens.values())
    return result


def print_table(results: list[dict]) -> None:
    print(f"\n{'rows':>8} {'split s':>8} {'split MiB':>10} {'tokenize s':>11} {'tokenize MiB':>13} {'both s':>7} "
          f"{'s per 100k rows':>16}")  # fmt: skip
    for r in results:
        both = r["split_data"]["seconds"] + r["tokenize_data"]["seconds"]
        print(
            f"{r['rows']:>8,} {r['split_data']['seconds']:>8.1f} {r['split_data']['peak_rss_mb']:>10.0f} "
            f"{r['tokenize_data']['seconds']:>11.1f} {r['tokenize_data']['peak_rss_mb']:>13.0f} {both:>7.1f} "
            f"{both / r['rows'] * 1e5:>16.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="times the diamonds table is written (8: 431,520 rows)")
    parser.add_argument("--sizes", type=int, nargs="+", help="rows per measurement (default: 1, 2, 4 and 8 copies)")
    args = parser.parse_args(argv)
    project = Paths.at(Path(__file__).resolve().parent.parent)
    if not (project.base_model / "tokenizer.json").is_file():
        raise SystemExit(f"{project.base_model} has no tokenizer: run `make demo` first")
    with tempfile.TemporaryDirectory(prefix="data-scale-") as scratch:
        source = Path(scratch) / "lots.jsonl"
        total = write_lots(source, args.copies)
        sizes = args.sizes or [total * n // args.copies for n in (1, 2, 4, 8) if n <= args.copies]
        if max(sizes) > total:
            raise SystemExit(f"--sizes asks for {max(sizes):,} rows; {args.copies} copies hold {total:,}")
        results = []
        for rows in sorted(sizes):
            results.append(measure(source, rows, Path(scratch), project))
            print(f"{rows:,} rows: {results[-1]}", flush=True)
    info = machine()
    print(
        f"\nsplit_data and tokenize_data, about {HELD_OUT:,} test and val rows each, n_train = the rest; "
        f"{describe(info)}"
    )
    print_table(results)
    write_json(RESULTS, {"machine": info, "held_out": HELD_OUT, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
