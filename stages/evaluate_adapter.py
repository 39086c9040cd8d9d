"""Stage `evaluate_adapter`: score the adapter on the test set against baselines, as the data's shape asks.

Uses params `prompt`, `quantization` and `evaluate`.
- Price rows (text + price), stages/evaluation/prices.py: the adapter against the zero-shot base, a TF-IDF
  ridge regression fit on the train split and the mean training price. metrics/eval.json holds, for each,
  the average absolute error with a bootstrap 95% interval, RMSLE, hit rate, band shares, MSE, R² and
  unparsed outputs; and the adapter's items per second. With `evaluate.show_items` each item gets the
  course's line, coloured by band on a terminal.
- Prompt/completion and chat rows, stages/evaluation/texts.py: the loss per completion (assistant) token,
  its perplexity and the exact-match rate of the adapter and the zero-shot base; metrics/eval.json says
  `"shape"`; the chart plots each item's loss, base against adapter.
The prediction rows (one per test item) are the per-item results the promotion gate compares item by item
(stages/tracking/gate.py); `adapter_rows` gives the same rows for any adapter folder, which record_run uses
to re-score a champion registered without them. Inputs and outputs: `SPEC` below.

Run: `python -m stages.evaluate_adapter` (or `dvc repro evaluate_adapter`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from stages.common.cli import run_stage
from stages.common.config import PRICE, Params
from stages.common.errors import StageError
from stages.common.io import read_jsonl, write_csv, write_json, write_jsonl
from stages.common.modeling import set_threads
from stages.common.paths import Paths
from stages.common.report import comparison_table
from stages.common.rows import split_shape
from stages.common.spec import StageSpec
from stages.evaluation import prices, texts
from stages.evaluation.charts import loss_scatter, price_scatter

SPEC = StageSpec(
    "evaluate_adapter",
    params=("prompt", "quantization", "evaluate"),
    reads=(Paths.base_model, Paths.adapter, Paths.train_split, Paths.test_split),
    writes=(Paths.predictions, Paths.predictions_plot, Paths.scatter_chart),
    metrics=(Paths.eval_metrics,),
)


@dataclass(frozen=True)
class Result:
    adapter: dict
    base_zero_shot: dict
    baselines: dict


def write_price_outputs(params: Params, paths: Paths, metrics: dict, rows: list[dict]) -> None:
    truths = [r["truth"] for r in rows]
    shown = [r["adapter_prediction"] or 0.0 for r in rows]
    bands = [r["band"] for r in rows]
    write_csv(
        paths.predictions_plot,
        [{"truth": t, "prediction": p, "band": b} for t, p, b in zip(truths, shown, bands, strict=True)],
    )
    a = metrics["adapter"]
    title = f"Adapter: error ${a['avg_error']:,.0f}, RMSLE {a['rmsle']:.2f}, hits {a['hit_rate']:.1%}"
    price_scatter(truths, shown, bands, title, paths.scatter_chart)
    if params.evaluate.show_items:
        print("\n".join(prices.item_lines(rows, colour=sys.stdout.isatty())))


def write_text_outputs(params: Params, paths: Paths, metrics: dict, rows: list[dict]) -> None:
    write_csv(
        paths.predictions_plot,
        [
            {"item": i, "base_loss": r["base_zero_shot_loss"], "adapter_loss": r["adapter_loss"],
             "exact_match": int(r["adapter_exact"])}
            for i, r in enumerate(rows, start=1)
        ],
    )  # fmt: skip
    a = metrics["adapter"]
    title = f"Adapter: loss {a['loss']:.3f}, perplexity {a['perplexity']:.2f}, exact match {a['exact_match']:.1%}"
    base, adapter = [r["base_zero_shot_loss"] for r in rows], [r["adapter_loss"] for r in rows]
    loss_scatter(base, adapter, title, paths.scatter_chart)
    if params.evaluate.show_items:
        print("\n".join(texts.item_lines(rows)))


def read_splits(paths: Paths) -> tuple[list[dict], list[dict], str]:
    """(test rows, train rows, the data's shape); StageError when a split is empty."""
    test, train = read_jsonl(paths.split("test")), read_jsonl(paths.split("train"))
    if not test or not train:
        raise StageError(f"{paths.splits}: empty train or test split; run split_data first")
    return test, train, split_shape(test, str(paths.split("test")))


def run(params: Params, paths: Paths) -> Result:
    """Score the adapter on the test split as its shape asks; write metrics, prediction rows, chart."""
    set_threads(0)
    test, train, shape = read_splits(paths)
    if shape == PRICE:
        metrics, rows = prices.score_prices(params, paths, test, train)
        write_price_outputs(params, paths, metrics, rows)
    else:
        metrics, rows = texts.score_text(params, paths, shape, test)
        write_text_outputs(params, paths, metrics, rows)
    write_json(paths.eval_metrics, metrics)
    write_jsonl(paths.predictions, rows)
    print(comparison_table(metrics))
    baselines = {key: metrics[key] for key in ("tfidf_ridge", "mean_baseline") if key in metrics}
    return Result(adapter=metrics["adapter"], base_zero_shot=metrics["base_zero_shot"], baselines=baselines)


def adapter_rows(params: Params, paths: Paths, adapter: Path) -> list[dict]:
    """Prediction rows of the adapter in `adapter` alone on this workspace's test split, as `run` writes them
    (no baselines): how record_run re-scores a champion registered without per-item results."""
    test, _, shape = read_splits(paths)
    if shape == PRICE:
        return prices.prediction_rows(
            test, prices.predict_prices(paths, params, test, adapter, with_base=False).adapter
        )
    prompts, outputs, losses, _ = texts.predict_text(paths, params, shape, test, adapter, with_base=False)
    return texts.text_rows(test, shape, prompts, outputs, losses)


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
