"""Batched greedy price generation: left padding, and a stop as soon as every number is complete."""

from __future__ import annotations

import re

from stages.core.config import EvaluateConfig, PromptConfig
from stages.core.prompts import truncate_prompt

_NUMBER_START = re.compile(r"\d")
_NUMBER_BODY = re.compile(r"\d[\d,]*(?:\.\d*)?")


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


def generate(model, tokenizer, prompts: list[str], cfg: EvaluateConfig, desc: str) -> list[str]:
    """Greedy completions of `prompts` in batches of cfg.batch_size (left padded), with a progress bar."""
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch"):
        batch = tokenizer(prompts[start : start + cfg.batch_size], return_tensors="pt", padding=True)
        batch = batch.to(model.device)
        prompt_length = batch["input_ids"].shape[1]
        with torch.inference_mode():
            generated = model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([number_stopper(tokenizer, prompt_length)]),
            )
        outputs += tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
    return outputs
