"""Benchmark: batched evaluation (the evaluate_adapter path) against a one-item-at-a-time generate loop.

Both use the 4-bit base with the trained adapter from a finished pipeline (models/base, models/adapter,
data/splits/test.jsonl; run `make demo` first) and the same prompts. The batched path pads on the left,
generates `evaluate.batch_size` prompts at once and stops a batch once every number is complete; the loop
calls `generate` once per prompt for `evaluate.max_new_tokens` tokens, as the course's tester does.
Prints items per second for each, the speed-up, and whether the parsed predictions are identical;
writes bench/results/eval_throughput.json.

Run: `python -m bench.eval_throughput [--items 64]` (or `make bench-eval`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stages.common.config import load_params
from stages.common.generation import build_prompts, generate, parse_price
from stages.common.io import read_jsonl, write_json
from stages.common.modeling import load_adapter_model, load_tokenizer, set_threads
from stages.common.paths import Paths

RESULTS = Path(__file__).resolve().parent / "results" / "eval_throughput.json"


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The plain loop: one prompt, one `generate` call, no padding, no early stop."""
    import torch

    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            generated = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        outputs.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return outputs


def timed(function, *args) -> tuple[list[str], float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="test items to predict (default 64)")
    args = parser.parse_args(argv)
    paths = Paths.at(".")
    params = load_params(paths.params)
    set_threads(0)
    rows = read_jsonl(paths.split("test"))[: args.items]
    tokenizer = load_tokenizer(paths.base_model)
    model = load_adapter_model(paths.base_model, paths.adapter, params.quantization, params.evaluate.dequantize_on_cpu)
    prompts = build_prompts(tokenizer, rows, params.prompt, params.evaluate.max_new_tokens)
    generate(model, tokenizer, prompts[:2], params.evaluate, "warm-up")
    batched, batched_seconds = timed(generate, model, tokenizer, prompts, params.evaluate, "batched")
    looped, looped_seconds = timed(one_at_a_time, model, tokenizer, prompts, params.evaluate.max_new_tokens)
    batched_prices, looped_prices = [parse_price(o) for o in batched], [parse_price(o) for o in looped]
    differing = [i for i, (a, b) in enumerate(zip(batched_prices, looped_prices, strict=True)) if a != b]
    result = {
        "items": len(prompts),
        "batch_size": params.evaluate.batch_size,
        "batched_items_per_second": round(len(prompts) / batched_seconds, 3),
        "one_at_a_time_items_per_second": round(len(prompts) / looped_seconds, 3),
        "speedup": round(looped_seconds / batched_seconds, 2),
        "identical_predictions": len(prompts) - len(differing),
        "differing_items": [
            {"item": i, "batched": batched_prices[i], "one_at_a_time": looped_prices[i]} for i in differing
        ],
    }
    print(
        f"\n{'path':<16} {'items/s':>8}\n{'batched':<16} {result['batched_items_per_second']:>8.2f}\n"
        f"{'one at a time':<16} {result['one_at_a_time_items_per_second']:>8.2f}\n"
        f"speed-up {result['speedup']}x; identical predictions {result['identical_predictions']}/{len(prompts)}"
    )
    write_json(RESULTS, result)
    print(f"written to {RESULTS}")
    print(json.dumps(result["differing_items"][:5]) if differing else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
