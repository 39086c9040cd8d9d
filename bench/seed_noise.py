"""Benchmark: how far the default pipeline's results move with the training seed alone, and what the gate says.

For each of `--seeds` seeds (train.seed = the params' seed + 0, 1, 2, ...), train_qlora runs with the
workspace's params on its base model and tokenized data (after `make demo`), in a scratch project, so nothing
in the workspace changes, and its adapter is scored on the test split as evaluate_adapter scores it. Same data,
same settings, same code: whatever differs between the seeds is noise, and the promotion gate should promote
none of them over another.

Prints, per metric (avg_error, rmsle, hit_rate, validation loss), each seed's value, the mean, the standard
deviation and the range; then, for every ordered pair (candidate seed, champion seed), the gate's decision
with the paired improvement and its interval (params `tracking`: metric, confidence, margin, resamples).
`--steps N` trains N optimizer steps instead of the params' epochs (faster; say so beside its figures).
Writes bench/results/seed_noise.json (or --output).

Run: `python -m bench.seed_noise [--seeds 3] [--steps N]` (or `make bench-noise`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from bench.machine import describe, machine

RESULTS = Path(__file__).resolve().parent / "results" / "seed_noise.json"
METRICS = ("avg_error", "rmsle", "hit_rate", "val_loss")


def seed_params(params, offset: int, steps: int | None):
    """The workspace's params with train.seed + `offset`, `steps` optimizer steps when given (one validation
    at the end), no samples or intermediate checkpoints, and no per-item lines printed."""
    train = dataclasses.replace(params.train, seed=params.train.seed + offset, sample_prompts=0)
    if steps:
        train = dataclasses.replace(
            train, max_steps=steps, eval_steps=steps, save_steps=steps, early_stopping_patience=0
        )
    return dataclasses.replace(params, train=train, evaluate=dataclasses.replace(params.evaluate, show_items=False))


def scratch_project(folder: Path):
    """Paths of a throwaway project in `folder` that reads this workspace's base, tokenized data and splits."""
    from stages.common.paths import Paths

    here, there = Paths.at("."), Paths.at(folder)
    for name in ("base_model", "tokenized", "splits"):
        source, link = getattr(here, name), getattr(there, name)
        if not source.exists():
            raise SystemExit(f"{source}: missing; run the pipeline first (make demo)")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return there


def run_seed(params, offset: int, steps: int | None) -> dict:
    """Train one seed and score its adapter on the test split as evaluate_adapter does (the adapter's rows
    only: the base model and baselines do not depend on the seed); its metrics, seconds and rows."""
    from stages import train_qlora
    from stages.common.io import read_json
    from stages.common.metrics import price_metrics
    from stages.evaluate_adapter import adapter_rows

    chosen = seed_params(params, offset, steps)
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as folder:
        paths = scratch_project(Path(folder))
        started = time.perf_counter()
        train_qlora.run(chosen, paths)
        rows = adapter_rows(chosen, paths, paths.adapter)
        trained = read_json(paths.train_metrics)
    scores = price_metrics([r["truth"] for r in rows], [r["adapter_prediction"] for r in rows])
    return {
        "seed": chosen.train.seed,
        "steps": trained["steps"],
        "seconds": round(time.perf_counter() - started, 1),
        **{name: scores[name] for name in ("avg_error", "rmsle", "hit_rate")},
        "val_loss": trained["val_loss"],
        "rows": rows,
    }


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def pairwise_decisions(params, runs: list[dict]) -> list[dict]:
    """The gate's decision for every ordered pair of seeds: the first as candidate, the second as champion."""
    from stages.tracking.gate import Champion, Gate, Items, Provenance, decide

    gate = Gate.from_params(params.tracking, "price")
    decisions = []
    for candidate, champion in itertools.permutations(runs, 2):
        held = Champion(
            str(champion["seed"]), Provenance("same"), Items.from_rows(champion["rows"], "adapter"),
            label=f"the champion of seed {champion['seed']}",
        )  # fmt: skip
        decision = decide(gate, Items.from_rows(candidate["rows"], "adapter"), held, None, Provenance("same"))
        decisions.append({
            "candidate_seed": candidate["seed"], "champion_seed": champion["seed"], "promoted": decision.promoted,
            "reason": decision.reason, **(decision.comparison.record() if decision.comparison else {}),
        })  # fmt: skip
    return decisions


def print_report(result: dict) -> None:
    runs, spreads = result["runs"], result["spread"]
    print(f"\n{describe(result['machine'])}; {runs[0]['steps']} optimizer steps per seed")
    print(f"\n{'seed':>6} {'steps':>6} {'avg error':>10} {'RMSLE':>7} {'hit rate':>9} {'val loss':>9} {'seconds':>8}")
    for r in runs:
        print(
            f"{r['seed']:>6} {r['steps']:>6} {r['avg_error']:>10,.2f} {r['rmsle']:>7.3f} {r['hit_rate']:>9.1%} "
            f"{r['val_loss']:>9.4f} {r['seconds']:>8.0f}"
        )
    for name in METRICS:
        s = spreads[name]
        print(f"{name}: mean {s['mean']:.4g}, stdev {s['stdev']:.3g}, range {s['min']:.4g} to {s['max']:.4g}")
    promoted = [d for d in result["decisions"] if d["promoted"]]
    print(f"\ngate ({result['gate']}): {len(promoted)} of {len(result['decisions'])} seed pairs promoted")
    for d in result["decisions"]:
        print(f"  seed {d['candidate_seed']} over champion seed {d['champion_seed']}: {d['reason']}")


def main(argv: list[str] | None = None) -> int:
    from stages.common.config import load_params
    from stages.common.io import write_json
    from stages.common.modeling import set_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per seed (default: the params')")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"result file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds: at least 2, to compare seeds with each other")
    params = load_params("params.yaml")
    if params.data.shape != "price":
        raise SystemExit("bench.seed_noise measures the price task (data.shape: price)")
    set_threads(params.train.threads)
    runs = []
    for offset in range(args.seeds):
        runs.append(run_seed(params, offset, args.steps))
        r = runs[-1]
        print(
            f"seed {r['seed']}: avg error ${r['avg_error']:,.2f}, val loss {r['val_loss']:.4f} ({r['seconds']:.0f} s)"
        )
    t = params.tracking
    result = {
        "machine": machine(),
        "steps": args.steps,
        "gate": f"{t.primary_metric}, confidence {t.confidence}, min_improvement {t.min_improvement}, "
        f"{t.bootstrap_samples} resamples",
        "runs": runs,
        "spread": {name: spread([r[name] for r in runs]) for name in METRICS},
        "decisions": pairwise_decisions(params, runs),
    }
    print_report(result)
    write_json(args.output, {**result, "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs]})
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
