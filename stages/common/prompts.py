"""Prompt and completion text for the price task, and their token-level form with masked labels.

The template comes from params.yaml (`prompt.template`, with a `{text}` slot) and the completion from
`prompt.completion` (with a `{price}` slot). Only completion tokens carry labels; prompt tokens get -100.
"""

from __future__ import annotations

from typing import NamedTuple

from stages.common.labels import IGNORE_INDEX


def render_prompt(template: str, text: str) -> str:
    return template.format(text=text)


def render_completion(template: str, price: float) -> str:
    return template.format(price=price)


class Encoded(NamedTuple):  # a tuple, not a dataclass: tokenize_data makes one per row, 400k at a time
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    completion_fits: bool  # False when max_length cannot hold the whole completion


def _prompt_budget(tokenizer, template: str, completion_ids: list[int], max_length: int) -> int:
    """How many tokens the description itself may take so the completion still fits in max_length."""
    frame = len(tokenizer(render_prompt(template, ""), add_special_tokens=True)["input_ids"])
    return max_length - frame - len(completion_ids) - 2  # 2: merges at the text's borders


def encode_example(tokenizer, template: str, text: str, completion: str, max_length: int, add_eos: bool) -> Encoded:
    """Tokenize prompt + completion with labels on the completion only, truncating the description.

    A description too long for `max_length` is cut (by tokens) so that the template's ending
    ("Price is $") and the whole completion survive; `truncated` reports that it happened. If even the
    template does not fit, its beginning is dropped; if the completion does not fit, `completion_fits`
    is False and the caller must reject the example.
    """
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    prompt_ids = tokenizer(render_prompt(template, text), add_special_tokens=True)["input_ids"]
    truncated = len(prompt_ids) + len(completion_ids) > max_length
    if truncated:
        budget = max(_prompt_budget(tokenizer, template, completion_ids, max_length), 0)
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
        short_text = tokenizer.decode(text_ids, skip_special_tokens=True)
        prompt_ids = tokenizer(render_prompt(template, short_text), add_special_tokens=True)["input_ids"]
        room = max(max_length - len(completion_ids), 0)
        prompt_ids = prompt_ids[max(len(prompt_ids) - room, 0) :] if room else []  # keep "Price is $"
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return Encoded(
        input_ids=input_ids, labels=labels, truncated=truncated, completion_fits=len(completion_ids) <= max_length
    )


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The token ids of each text, as `tokenizer(texts)["input_ids"]` gives them. A fast tokenizer's Rust backend
    is called directly when it neither pads nor truncates: transformers' wrapper turns every encoding into Python
    dicts (masks, offsets), which costs as much as the tokenization itself (`make bench-data` profiles)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation or backend.padding or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def pair_token_ids(
    tokenizer, template: str, texts: list[str], completions: list[str], add_eos: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids with EOS when `add_eos`) of each row, untruncated, tokenized as two batches (a
    fast tokenizer encodes a batch in parallel, far faster than one call per row). The completion lists of equal
    completions are one shared list: prices repeat, and each distinct completion is tokenized once."""
    prompts = token_ids(tokenizer, [render_prompt(template, text) for text in texts], add_special_tokens=True)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    distinct = list(dict.fromkeys(completions))
    ending_of = {c: ids + eos for c, ids in zip(distinct, token_ids(tokenizer, distinct, False), strict=True)}
    return prompts, [ending_of[completion] for completion in completions]


def encode_examples(
    tokenizer, template: str, texts: list[str], completions: list[str], max_length: int, add_eos: bool
) -> list[Encoded]:
    """`encode_example` for many rows at once, with the same result row for row: tokenized as batches
    (`pair_token_ids`), and only the rows too long for `max_length` go through `encode_example`'s truncation
    one by one."""
    prompts, endings = pair_token_ids(tokenizer, template, texts, completions, add_eos)
    encoded = []
    for text, completion, prompt_ids, completion_ids in zip(texts, completions, prompts, endings, strict=True):
        if len(prompt_ids) + len(completion_ids) > max_length:
            encoded.append(encode_example(tokenizer, template, text, completion, max_length, add_eos))
            continue
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        encoded.append(Encoded(prompt_ids + completion_ids, labels, False, True))
    return encoded


def truncate_prompt(tokenizer, template: str, text: str, max_prompt_tokens: int) -> str:
    """The prompt for generation, with the description cut so the prompt fits in `max_prompt_tokens`."""
    prompt = render_prompt(template, text)
    if len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) <= max_prompt_tokens:
        return prompt
    budget = max(_prompt_budget(tokenizer, template, [], max_prompt_tokens), 0)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
    return render_prompt(template, tokenizer.decode(text_ids, skip_special_tokens=True))
