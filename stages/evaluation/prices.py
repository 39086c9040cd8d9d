"""Scoring a price adapter on the test set: greedy outputs, parsed prices, baselines and the course's lines.

The base is loaded in 4 bits with the adapter on top; the same items also go through the base with the
adapter switched off (zero-shot). Generation is greedy, in batches (left padding), and a batch stops once
every row holds a complete number. The first number of each output is the prediction; an output without
one is `unparsed` and scored as $0, never dropped. Baselines (stages/evaluation/baselines.py): the mean
training price and a TF-IDF ridge regression. With `evaluate.topk_estimate`, the course's one-pass estimate
is scored too where prices are single tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import Params
from stages.common.generation import build_prompts, generate, parse_price, single_token_share, topk_estimates
from stages.common.metrics import GREEN, ORANGE, band, price_metrics
from stages.common.modeling import load_adapter_model, load_tokenizer
from stages.common.paths import Paths
from stages.common.rows import key_digest, row_key
from stages.evaluation.baselines import mean_price, tfidf_ridge

MIN_SINGLE_TOKEN_SHARE = 0.95  # the top-k estimate needs nearly every price to be one token


@dataclass
class Predictions:
    adapter: list[str]
    base: list[str] | None
    items_per_second: float
    topk: list[float | None] | None = None  # the top-k estimate, when asked for and applicable
    topk_items_per_second: float | None = None


def topk_applies(tokenizer, rows: list[dict]) -> bool:
    share = single_token_share(tokenizer, [r["price"] for r in rows])
    if share < MIN_SINGLE_TOKEN_SHARE:
        print(
            f"evaluate.topk_estimate skipped: this tokenizer writes only {share:.0%} of the test prices as one "
            f"token (needs {MIN_SINGLE_TOKEN_SHARE:.0%}); the estimate would only see the first digit"
        )
        return False
    return True


def predict_prices(
    paths: Paths, params: Params, rows: list[dict], adapter: Path, with_base: bool = True
) -> Predictions:
    """Outputs of the adapter in `adapter` for `rows` (one model load), its items per second, and, with
    `with_base`, the zero-shot base's outputs and the top-k estimate when params ask and the tokenizer allows."""
    cfg = params.evaluate
    tokenizer = load_tokenizer(paths.base_model)
    model = load_adapter_model(paths.base_model, adapter, params.quantization, cfg.dequantize_on_cpu)
    prompts = build_prompts(tokenizer, rows, params.prompt, cfg.max_new_tokens)
    started = time.perf_counter()
    result = Predictions(generate(model, tokenizer, prompts, cfg, "adapter"), None, 0.0)
    result.items_per_second = len(rows) / (time.perf_counter() - started)
    if not with_base:
        return result
    if cfg.topk_estimate and topk_applies(tokenizer, rows):
        started = time.perf_counter()
        result.topk = topk_estimates(model, tokenizer, prompts, cfg.topk, cfg.batch_size)
        result.topk_items_per_second = len(rows) / (time.perf_counter() - started)
    with model.disable_adapter():
        result.base = generate(model, tokenizer, prompts, cfg, "base zero-shot")
    return result


def prediction_rows(test: list[dict], adapter_out: list[str], base_out: list[str] | None = None) -> list[dict]:
    """One row per test item: its key's digest (what the gate pairs items by), text, truth, raw outputs, parsed
    predictions and the adapter's band (the base's fields are None when it was not run)."""
    rows = []
    for index, item in enumerate(test):
        guess = parse_price(adapter_out[index])
        base_text = base_out[index] if base_out is not None else None
        rows.append({
            "key": key_digest(row_key(item)), "text": item["text"], "truth": item["price"],
            "adapter_output": adapter_out[index], "adapter_prediction": guess,
            "band": band(item["price"], guess or 0.0),
            "base_output": base_text, "base_prediction": parse_price(base_text) if base_text is not None else None,
        })  # fmt: skip
    return rows


def score_prices(params: Params, paths: Paths, test: list[dict], train: list[dict]) -> tuple[dict, list[dict]]:
    """(metrics for metrics/eval.json, prediction rows) of the adapter, the zero-shot base and the baselines."""
    predicted = predict_prices(paths, params, test, paths.adapter)
    rows = prediction_rows(test, predicted.adapter, predicted.base)
    for row, price in zip(rows, tfidf_ridge(train, test), strict=True):
        row["tfidf_prediction"] = price
    truths = [r["truth"] for r in rows]
    samples = params.evaluate.bootstrap_samples
    metrics = {
        "adapter": price_metrics(truths, [r["adapter_prediction"] for r in rows], samples),
        "base_zero_shot": price_metrics(truths, [r["base_prediction"] for r in rows], samples),
        "tfidf_ridge": price_metrics(truths, [r["tfidf_prediction"] for r in rows], samples),
        "mean_baseline": price_metrics(truths, [mean_price(train)] * len(truths), samples),
        "items_per_second": round(predicted.items_per_second, 3),
    }
    if predicted.topk is not None:
        metrics["adapter_topk"] = price_metrics(truths, predicted.topk, samples)
        metrics["topk_items_per_second"] = round(predicted.topk_items_per_second, 3)
    return metrics, rows


COLOURS = {GREEN: "\033[92m", ORANGE: "\033[93m"}  # anything else is red
RED_COLOUR, RESET = "\033[91m", "\033[0m"


def item_lines(rows: list[dict], colour: bool) -> list[str]:
    """The course tester's line per item: guess, truth, error, squared log error, start of the text."""
    lines = []
    for number, row in enumerate(rows, start=1):
        guess = row["adapter_prediction"] or 0.0
        sle = (math.log1p(max(guess, 0.0)) - math.log1p(row["truth"])) ** 2
        text = row["text"].replace("\n", " ")[:40]
        line = (
            f"{number}: guess ${guess:,.2f}  truth ${row['truth']:,.2f}  error ${abs(guess - row['truth']):,.2f}  "
            f"SLE {sle:.2f}  {text}"
        )
        if row["adapter_prediction"] is None:
            line += f"  (unparsed: {row['adapter_output']!r})"
        lines.append(f"{COLOURS.get(row['band'], RED_COLOUR)}{line}{RESET}" if colour else line)
    return lines
