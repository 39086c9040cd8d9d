"""Stage `evaluate_adapter`: score the adapter on the test set against baselines, as the data's shape asks.

Uses params `prompt`, `quantization` and `evaluate`. The base is loaded in 4 bits with the adapter on top,
and the same test items also go through the base with the adapter switched off (zero-shot). Generation is
greedy, in batches (left padding).
Price rows (text + price): the first number of each output is parsed, and a constant prediction of the
mean training price is scored too. Generation of a batch stops once every row has a complete number.
Outputs without a number are counted as `unparsed` and scored as $0, never dropped. With
`evaluate.show_items` each item gets a line, coloured by band on a terminal, as in the course.
metrics/eval.json holds average absolute error with a bootstrap 95% interval, RMSLE, hit rate, band
shares, MSE, R², unparsed, for each of the three; adapter items per second.
Prompt/completion and chat rows: the loss per completion (assistant) token on the test set, its
perplexity, and the share of greedy outputs equal to the reference completion (exact match), for the
adapter and the zero-shot base; metrics/eval.json says `"shape"` and holds `loss`, `perplexity`,
`exact_match` under `adapter` and `base_zero_shot`; the chart plots each item's loss, base against adapter.
It writes the metrics, one prediction row per test item, and the chart with its plot data. Inputs and
outputs: `SPEC` below.

Run: `python -m stages.evaluate_adapter` (or `dvc repro evaluate_adapter`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from stages.common.cli import run_stage
from stages.common.config import CHAT, PRICE, Params
from stages.common.errors import StageError
from stages.common.generation import (
    build_prompts,
    completion_losses,
    generate,
    parse_price,
    single_token_share,
    topk_estimates,
)
from stages.common.io import read_jsonl, write_csv, write_json, write_jsonl
from stages.common.metrics import GREEN, ORANGE, band, price_metrics, text_metrics
from stages.common.modeling import load_adapter_model, load_tokenizer, set_threads
from stages.common.paths import Paths
from stages.common.report import comparison_table
from stages.common.rows import reference, split_shape
from stages.common.shapes import encode_row, generation_prompt, require_chat_template
from stages.common.spec import StageSpec
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
    mean_baseline: dict


MIN_SINGLE_TOKEN_SHARE = 0.95  # the top-k estimate needs nearly every price to be one token


@dataclass
class Predictions:
    adapter: list[str]
    base: list[str]
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


def predict_all(paths: Paths, params: Params, rows: list[dict]) -> Predictions:
    """Adapter and zero-shot base outputs for `rows` (one model load), adapter items per second, and the
    top-k estimate when params ask for it and the tokenizer allows it."""
    cfg = params.evaluate
    tokenizer = load_tokenizer(paths.base_model)
    model = load_adapter_model(paths.base_model, paths.adapter, params.quantization)
    prompts = build_prompts(tokenizer, rows, params.prompt, cfg.max_new_tokens)
    started = time.perf_counter()
    adapter_outputs = generate(model, tokenizer, prompts, cfg, "adapter")
    result = Predictions(adapter_outputs, [], len(rows) / (time.perf_counter() - started))
    if cfg.topk_estimate and topk_applies(tokenizer, rows):
        started = time.perf_counter()
        result.topk = topk_estimates(model, tokenizer, prompts, cfg.topk, cfg.batch_size)
        result.topk_items_per_second = len(rows) / (time.perf_counter() - started)
    with model.disable_adapter():
        result.base = generate(model, tokenizer, prompts, cfg, "base zero-shot")
    return result


def prediction_rows(test: list[dict], adapter_out: list[str], base_out: list[str]) -> list[dict]:
    """One row per test item: text, truth, raw outputs, parsed predictions and the adapter's band."""
    rows = []
    for item, adapter_text, base_text in zip(test, adapter_out, base_out, strict=True):
        guess = parse_price(adapter_text)
        rows.append({
            "text": item["text"], "truth": item["price"],
            "adapter_output": adapter_text, "adapter_prediction": guess, "band": band(item["price"], guess or 0.0),
            "base_output": base_text, "base_prediction": parse_price(base_text),
        })  # fmt: skip
    return rows


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


MODELS = ("adapter", "base_zero_shot")


def warn_short_generation(tokenizer, references: list[str], max_new_tokens: int) -> None:
    """Say when evaluate.max_new_tokens cannot hold some reference completions (no exact match possible)."""
    longer = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) > max_new_tokens for r in references)
    if longer:
        print(
            f"warning: {longer} of {len(references)} reference completions are longer than "
            f"evaluate.max_new_tokens={max_new_tokens} tokens, so they cannot match exactly; raise it to score them"
        )


def predict_text(paths: Paths, params: Params, shape: str, test: list[dict]) -> tuple[list[str], dict, dict, float]:
    """Generation prompts, greedy outputs and completion losses of adapter and zero-shot base for
    prompt/completion or chat rows, and the adapter's generation speed (items per second)."""
    cfg = params.evaluate
    tokenizer = load_tokenizer(paths.base_model)
    if shape == CHAT:
        require_chat_template(tokenizer, str(paths.split("test")))
    encoded = [encode_row(tokenizer, row, shape, params.prompt) for row in test]
    warn_short_generation(tokenizer, [reference(row, shape) for row in test], cfg.max_new_tokens)
    prompts = [generation_prompt(tokenizer, row, shape, params.prompt, cfg.max_new_tokens) for row in test]
    model = load_adapter_model(paths.base_model, paths.adapter, params.quantization)
    options = {"stop_at_number": False, "add_special_tokens": shape != CHAT}
    started = time.perf_counter()
    outputs = {"adapter": generate(model, tokenizer, prompts, cfg, "adapter", **options)}
    speed = len(test) / (time.perf_counter() - started)
    losses = {"adapter": completion_losses(model, encoded, tokenizer.pad_token_id, cfg.batch_size)}
    with model.disable_adapter():
        outputs["base_zero_shot"] = generate(model, tokenizer, prompts, cfg, "base zero-shot", **options)
        losses["base_zero_shot"] = completion_losses(model, encoded, tokenizer.pad_token_id, cfg.batch_size)
    return prompts, outputs, losses, speed


def text_rows(prompts: list[str], references: list[str], outputs: dict, losses: dict) -> list[dict]:
    """One row per test item: prompt, reference, and per model its output, exact match and mean loss."""
    rows = []
    for index, (prompt, expected) in enumerate(zip(prompts, references, strict=True)):
        row = {"prompt": prompt, "reference": expected}
        for model in MODELS:
            total, tokens = losses[model][index]
            row[f"{model}_output"] = outputs[model][index]
            row[f"{model}_exact"] = outputs[model][index].strip() == expected.strip()
            row[f"{model}_loss"] = total / max(tokens, 1)
        rows.append(row)
    return rows


def run_text(params: Params, paths: Paths, shape: str, test: list[dict]) -> Result:
    """Score a prompt/completion or chat test split: loss, perplexity, exact match; write the outputs."""
    prompts, outputs, losses, speed = predict_text(paths, params, shape, test)
    references = [reference(row, shape) for row in test]
    metrics = {"shape": shape}
    for model in MODELS:
        metrics[model] = text_metrics(losses[model], outputs[model], references)
    metrics["items_per_second"] = round(speed, 3)
    rows = text_rows(prompts, references, outputs, losses)
    write_json(paths.eval_metrics, metrics)
    write_jsonl(paths.predictions, rows)
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
    loss_scatter(
        [r["base_zero_shot_loss"] for r in rows], [r["adapter_loss"] for r in rows], title, paths.scatter_chart
    )
    if params.evaluate.show_items:
        for number, row in enumerate(rows, start=1):
            verdict = "exact" if row["adapter_exact"] else "differs"
            print(f"{number}: {verdict}  loss {row['adapter_loss']:.3f}  output {row['adapter_output'][:60]!r}  "
                  f"expected {row['reference'][:60]!r}")  # fmt: skip
    print(comparison_table(metrics))
    return Result(adapter=a, base_zero_shot=metrics["base_zero_shot"], mean_baseline={})


def run(params: Params, paths: Paths) -> Result:
    """Score the adapter on the test split as its shape asks (price: also zero-shot base and mean price;
    prompt/completion and chat: also zero-shot base); write metrics, predictions, chart."""
    set_threads(0)
    test, train = read_jsonl(paths.split("test")), read_jsonl(paths.split("train"))
    if not test or not train:
        raise StageError(f"{paths.splits}: empty train or test split; run split_data first")
    shape = split_shape(test, str(paths.split("test")))
    if shape != PRICE:
        return run_text(params, paths, shape, test)
    predicted = predict_all(paths, params, test)
    rows = prediction_rows(test, predicted.adapter, predicted.base)
    truths = [r["truth"] for r in rows]
    mean_price = sum(r["price"] for r in train) / len(train)
    samples = params.evaluate.bootstrap_samples
    metrics = {
        "adapter": price_metrics(truths, [r["adapter_prediction"] for r in rows], samples),
        "base_zero_shot": price_metrics(truths, [r["base_prediction"] for r in rows], samples),
        "mean_baseline": price_metrics(truths, [mean_price] * len(truths), samples),
        "items_per_second": round(predicted.items_per_second, 3),
    }
    if predicted.topk is not None:
        metrics["adapter_topk"] = price_metrics(truths, predicted.topk, samples)
        metrics["topk_items_per_second"] = round(predicted.topk_items_per_second, 3)
    write_json(paths.eval_metrics, metrics)
    write_jsonl(paths.predictions, rows)
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
        print("\n".join(item_lines(rows, colour=sys.stdout.isatty())))
    print(comparison_table(metrics))
    return Result(adapter=a, base_zero_shot=metrics["base_zero_shot"], mean_baseline=metrics["mean_baseline"])


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
