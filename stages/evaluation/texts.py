"""Scoring a prompt/completion or chat adapter on the test set: loss per completion token, perplexity, exact match.

Every item is encoded as training encodes it (labels on the completion, or on the assistant turns for chat),
so the test loss is the loss training minimises; the greedy output of each prompt is compared with the
reference completion (whitespace stripped). The same items also go through the base with the adapter switched
off (zero-shot). Each prediction row keeps the item's completion token count, so the token-weighted loss can be
recomputed on any subset of items (the promotion gate's resamples).
"""

from __future__ import annotations

import time
from pathlib import Path

from stages.common.config import CHAT, Params
from stages.common.generation import completion_losses, generate
from stages.common.metrics import text_metrics
from stages.common.modeling import load_adapter_model, load_tokenizer
from stages.common.paths import Paths
from stages.common.rows import key_digest, reference, row_key
from stages.common.shapes import encode_rows, generation_prompt, require_chat_template

MODELS = ("adapter", "base_zero_shot")


def warn_short_generation(tokenizer, references: list[str], max_new_tokens: int) -> None:
    """Say when evaluate.max_new_tokens cannot hold some reference completions (no exact match possible)."""
    longer = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) > max_new_tokens for r in references)
    if longer:
        print(
            f"warning: {longer} of {len(references)} reference completions are longer than "
            f"evaluate.max_new_tokens={max_new_tokens} tokens, so they cannot match exactly; raise it to score them"
        )


def predict_text(
    paths: Paths, params: Params, shape: str, test: list[dict], adapter: Path, with_base: bool = True
) -> tuple[list[str], dict, dict, float]:
    """Generation prompts, and per model (the adapter in `adapter`, and with `with_base` the zero-shot base)
    greedy outputs and completion losses, and the adapter's generation speed (items per second)."""
    cfg = params.evaluate
    tokenizer = load_tokenizer(paths.base_model)
    if shape == CHAT:
        require_chat_template(tokenizer, str(paths.split("test")))
    encoded = encode_rows(tokenizer, test, shape, params.prompt)
    warn_short_generation(tokenizer, [reference(row, shape) for row in test], cfg.max_new_tokens)
    prompts = [generation_prompt(tokenizer, row, shape, params.prompt, cfg.max_new_tokens) for row in test]
    model = load_adapter_model(paths.base_model, adapter, params.quantization, cfg.dequantize_on_cpu)
    options = {"stop_at_number": False, "add_special_tokens": shape != CHAT}
    started = time.perf_counter()
    outputs = {"adapter": generate(model, tokenizer, prompts, cfg, "adapter", **options)}
    speed = len(test) / (time.perf_counter() - started)
    losses = {"adapter": completion_losses(model, encoded, tokenizer.pad_token_id, cfg.batch_size)}
    if with_base:
        with model.disable_adapter():
            outputs["base_zero_shot"] = generate(model, tokenizer, prompts, cfg, "base zero-shot", **options)
            losses["base_zero_shot"] = completion_losses(model, encoded, tokenizer.pad_token_id, cfg.batch_size)
    return prompts, outputs, losses, speed


def text_rows(test: list[dict], shape: str, prompts: list[str], outputs: dict, losses: dict) -> list[dict]:
    """One row per test item: its key's digest (what the gate pairs items by), prompt, reference, its
    completion token count, and per model scored its output, exact match and mean loss per completion token."""
    rows = []
    for index, (item, prompt) in enumerate(zip(test, prompts, strict=True)):
        expected = reference(item, shape)
        row = {
            "key": key_digest(row_key(item)), "prompt": prompt, "reference": expected,
            "completion_tokens": losses["adapter"][index][1],
        }  # fmt: skip
        for model in outputs:
            total, tokens = losses[model][index]
            row[f"{model}_output"] = outputs[model][index]
            row[f"{model}_exact"] = outputs[model][index].strip() == expected.strip()
            row[f"{model}_loss"] = total / max(tokens, 1)
        rows.append(row)
    return rows


def score_text(params: Params, paths: Paths, shape: str, test: list[dict]) -> tuple[dict, list[dict]]:
    """(metrics for metrics/eval.json, prediction rows) of the adapter and the zero-shot base."""
    prompts, outputs, losses, speed = predict_text(paths, params, shape, test, paths.adapter)
    references = [reference(row, shape) for row in test]
    metrics = {"shape": shape}
    for model in MODELS:
        metrics[model] = text_metrics(losses[model], outputs[model], references)
    metrics["items_per_second"] = round(speed, 3)
    return metrics, text_rows(test, shape, prompts, outputs, losses)


def item_lines(rows: list[dict]) -> list[str]:
    """One line per item: exact or not, the adapter's loss, its output and the expected completion."""
    return [
        f"{number}: {'exact' if row['adapter_exact'] else 'differs'}  loss {row['adapter_loss']:.3f}  "
        f"output {row['adapter_output'][:60]!r}  expected {row['reference'][:60]!r}"
        for number, row in enumerate(rows, start=1)
    ]
