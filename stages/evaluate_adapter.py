"""Stage `evaluate_adapter`: score the adapter on the test set against two baselines.

Reads models/base/, models/adapter/, data/splits/{train,test}.jsonl and params `prompt`,
`quantization` and `evaluate`. The base is loaded in 4 bits with the adapter on top; prices are
generated greedily in batches (left padding) and the first number of each output is parsed. The same
prompts go through the base model with the adapter switched off (zero-shot), and a constant
prediction of the mean training price is scored too. Outputs without a number are counted as
`unparsed` and scored as $0, never dropped.
Writes metrics/eval.json (average absolute error, RMSLE, hit rate, band shares, MSE, R², unparsed,
for each of the three), eval/predictions.jsonl, plots/predictions.csv and reports/scatter.png.

Run: `python -m stages.evaluate_adapter` (or `dvc repro evaluate_adapter`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from stages.core.charts import price_scatter
from stages.core.cli import StageError, run_stage
from stages.core.config import EvaluateConfig, Params, PromptConfig
from stages.core.io import read_jsonl, write_csv, write_json, write_jsonl
from stages.core.metrics import band, price_metrics
from stages.core.modeling import load_base, load_tokenizer, set_threads
from stages.core.paths import Paths
from stages.core.prompts import parse_price, truncate_prompt
from stages.core.report import comparison_table


@dataclass(frozen=True)
class Result:
    adapter: dict
    base_zero_shot: dict
    mean_baseline: dict


def load_adapter_model(paths: Paths, params: Params):
    """The 4-bit base with the trained adapter attached, in eval mode."""
    from peft import PeftModel

    if not (paths.adapter / "adapter_config.json").is_file():
        raise StageError(f"{paths.adapter}: no adapter_config.json; run train_qlora first")
    model = PeftModel.from_pretrained(load_base(paths.base_model, params.quantization), paths.adapter)
    model.eval()
    return model


def generate(model, tokenizer, prompts: list[str], cfg: EvaluateConfig, desc: str) -> list[str]:
    """Greedy completions of `prompts`, in batches of cfg.batch_size, with left padding."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch"):
        batch = tokenizer(prompts[start : start + cfg.batch_size], return_tensors="pt", padding=True)
        batch = batch.to(model.device)
        with torch.inference_mode():
            generated = model.generate(
                **batch, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def build_prompts(tokenizer, rows: list[dict], cfg: PromptConfig, max_new_tokens: int) -> list[str]:
    return [truncate_prompt(tokenizer, cfg.template, r["text"], cfg.max_length - max_new_tokens) for r in rows]


def predict_all(paths: Paths, params: Params, rows: list[dict]) -> tuple[list[str], list[str], float]:
    """Adapter and zero-shot base outputs for `rows` (one model load), and adapter items per second."""
    tokenizer = load_tokenizer(paths.base_model)
    model = load_adapter_model(paths, params)
    prompts = build_prompts(tokenizer, rows, params.prompt, params.evaluate.max_new_tokens)
    started = time.perf_counter()
    adapter_outputs = generate(model, tokenizer, prompts, params.evaluate, "adapter")
    items_per_second = len(rows) / (time.perf_counter() - started)
    with model.disable_adapter():
        base_outputs = generate(model, tokenizer, prompts, params.evaluate, "base zero-shot")
    return adapter_outputs, base_outputs, items_per_second


def run(params: Params, paths: Paths) -> Result:
    """Score adapter, zero-shot base and mean price on the test split; write metrics, predictions, chart."""
    set_threads(0)
    test = read_jsonl(paths.split("test"))
    train = read_jsonl(paths.split("train"))
    if not test or not train:
        raise StageError(f"{paths.splits}: empty train or test split; run split_data first")
    truths = [r["price"] for r in test]
    adapter_out, base_out, items_per_second = predict_all(paths, params, test)
    adapter_pred = [parse_price(o) for o in adapter_out]
    base_pred = [parse_price(o) for o in base_out]
    mean_price = sum(r["price"] for r in train) / len(train)
    metrics = {
        "adapter": price_metrics(truths, adapter_pred),
        "base_zero_shot": price_metrics(truths, base_pred),
        "mean_baseline": price_metrics(truths, [mean_price] * len(truths)),
        "items_per_second": round(items_per_second, 3),
    }
    write_json(paths.eval_metrics, metrics)
    shown = [p or 0.0 for p in adapter_pred]
    bands = [band(t, p) for t, p in zip(truths, shown, strict=True)]
    write_jsonl(
        paths.predictions,
        [
            {
                "text": r["text"],
                "truth": t,
                "adapter_output": ao,
                "adapter_prediction": ap,
                "band": b,
                "base_output": bo,
                "base_prediction": bp,
            }
            for r, t, ao, ap, b, bo, bp in zip(
                test, truths, adapter_out, adapter_pred, bands, base_out, base_pred, strict=True
            )
        ],
    )
    write_csv(
        paths.predictions_plot,
        [{"truth": t, "prediction": p, "band": b} for t, p, b in zip(truths, shown, bands, strict=True)],
    )
    a = metrics["adapter"]
    price_scatter(
        truths,
        shown,
        bands,
        f"Adapter: error ${a['avg_error']:,.0f}, RMSLE {a['rmsle']:.2f}, hits {a['hit_rate']:.1%}",
        paths.scatter_chart,
    )
    print(comparison_table(metrics))
    return Result(adapter=a, base_zero_shot=metrics["base_zero_shot"], mean_baseline=metrics["mean_baseline"])


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate_adapter", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
