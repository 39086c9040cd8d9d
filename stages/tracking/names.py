"""How the project names its MLflow metrics: `<section>/<name>`, which the MLflow UI reads as chart sections
(eval, train, data, tokens, curves, timing, sweep) instead of one flat list of a hundred dotted names.

A metrics file's numbers are named after the file (`eval/adapter.avg_error` from metrics/eval.json), per-step
series go under `curves/` (`curves/val_loss`, streamed live by train_qlora), stage times under `timing/`.
"""

from __future__ import annotations

CURVES = "curves"
TIMING = "timing"
SWEEP = "sweep"
ADAPTER_TEST_METRICS = "eval/adapter."  # the adapter's test metrics: metrics/eval.json's "adapter" block
LEGACY_ADAPTER_TEST_METRICS = "eval.adapter."  # how runs recorded before the sections named them


def metric_name(section: str, name: str) -> str:
    return f"{section}/{name}"


def curve(column: str) -> str:
    """A per-step series: curves/train_loss, curves/val_loss, curves/learning_rate, ..."""
    return metric_name(CURVES, column)


def adapter_test_metrics(logged: dict[str, float]) -> dict[str, float]:
    """{avg_error: ..., hit_rate: ...} from a run's metrics, whichever convention recorded it."""
    found = {}
    for prefix in (LEGACY_ADAPTER_TEST_METRICS, ADAPTER_TEST_METRICS):
        found.update({key.removeprefix(prefix): value for key, value in logged.items() if key.startswith(prefix)})
    return found
