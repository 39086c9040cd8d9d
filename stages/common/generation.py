"""Batched greedy generation (left padding; for prices a stop as soon as every number is complete) and
per-example completion losses for the prompt/completion and chat shapes."""

from __future__ import annotations

import re

from stages.common.config import EvaluateConfig, PromptConfig
from stages.common.prompts import truncate_prompt

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NUMBER_START = re.compile(r"\d")
_NUMBER_BODY = re.compile(r"\d[\d,]*(?:\.\d*)?")


def parse_price(generated: str) -> float | None:
    """The first number in a model's output ("1,234.00 dollars" -> 1234.0), or None if there is none."""
    match = _NUMBER.search(generated)
    if not match:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def number_complete(text: str) -> bool:
    """True once `text` holds a number followed by something that cannot continue it ("99.00\\n", "1.20.")."""
    start = _NUMBER_START.search(text)
    if start is None:
        return False
    rest = text[start.start() :]
    return _NUMBER_BODY.match(rest).end() < len(rest)


def number_stopper(tokenizer, prompt_length: int):
    """A StoppingCriteria that marks each row done when its generated text holds a complete number."""
    import torch
    from transformers import StoppingCriteria

    class NumberComplete(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([number_complete(t) for t in texts], dtype=torch.bool, device=input_ids.device)

    return NumberComplete()


def build_prompts(tokenizer, rows: list[dict], cfg: PromptConfig, max_new_tokens: int) -> list[str]:
    """Generation prompts for `rows`, each cut to leave room for `max_new_tokens` within max_length."""
    return [truncate_prompt(tokenizer, cfg.template, r["text"], cfg.max_length - max_new_tokens) for r in rows]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    cfg: EvaluateConfig,
    desc: str,
    stop_at_number: bool = True,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy completions of `prompts` in batches of cfg.batch_size (left padded), with a progress bar.

    `stop_at_number` ends a row once it holds a complete number (prices); otherwise rows end at EOS or
    cfg.max_new_tokens. `add_special_tokens=False` for prompts that carry them already (chat templates).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch"):
        batch = tokenizer(
            prompts[start : start + cfg.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=add_special_tokens,
        )
        batch = batch.to(model.device)
        prompt_length = batch["input_ids"].shape[1]
        stoppers = [number_stopper(tokenizer, prompt_length)] if stop_at_number else []
        with torch.inference_mode():
            generated = model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList(stoppers),
            )
        outputs += tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
    return outputs


def single_token_share(tokenizer, prices: list[float]) -> float:
    """Share of `prices` whose whole-dollar digits the tokenizer encodes as one token (after "$")."""
    if not prices:
        return 0.0
    single = sum(len(tokenizer(f"{price:.0f}", add_special_tokens=False)["input_ids"]) == 1 for price in prices)
    return single / len(prices)


def topk_estimates(model, tokenizer, prompts: list[str], k: int, batch_size: int) -> list[float | None]:
    """The course's fast estimate: one forward pass per prompt, the top-k next tokens that are whole
    numbers, and their probability-weighted mean (None when no top-k token is a number).

    Valid only when prices are single tokens (see `single_token_share`); with digit-by-digit tokenizers
    it would only guess the first digit.
    """
    import torch

    tokenizer.padding_side = "left"
    estimates: list[float | None] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            probabilities = model(**batch).logits[:, -1, :].float().softmax(dim=-1)
        top = probabilities.topk(k, dim=-1)
        for values, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            numeric = [
                (float(text), p)
                for text, p in zip(tokenizer.batch_decode([[i] for i in ids]), values, strict=True)
                if text.strip().isdigit()
            ]
            total = sum(p for _, p in numeric)
            estimates.append(sum(v * p for v, p in numeric) / total if total > 0 else None)
    return estimates


def completion_losses(model, encoded: list, pad_token_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed cross-entropy, label tokens) per encoded example (`stages.common.prompts.Encoded`): the loss
    training minimises, on the completion (or assistant) tokens only, computed in right-padded batches."""
    import torch

    from stages.common.labels import IGNORE_INDEX

    results: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [pad_token_id] * (width - len(e.input_ids)) for e in chunk])
        labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in chunk])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        targets = labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counted = targets != IGNORE_INDEX
        for row_loss, row_counted in zip(losses, counted, strict=True):
            results.append((float(row_loss[row_counted].sum()), int(row_counted.sum())))
    return results
