"""How a row of each shape (stages/common/rows.py) becomes tokens, as tokenize_data and evaluate_adapter read it.

- `price`: the prompt and completion are built from `prompt.template` and `prompt.completion`.
- `prompt_completion`: used verbatim (no template).
- `chat`: rendered with the base model's chat template; the loss covers the assistant turns only.
Each example is encoded with labels on the completion (or assistant) tokens only; prompt tokens get
IGNORE_INDEX. `generation_prompt` is the text a model continues at evaluation.
"""

from __future__ import annotations

from stages.common.config import CHAT, PAIR, PRICE, PromptConfig
from stages.common.errors import InputError
from stages.common.labels import IGNORE_INDEX
from stages.common.prompts import Encoded, encode_examples, render_completion, truncate_prompt

VERBATIM = "{text}"  # the "template" of a prompt/completion row: its prompt as it is


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where}: chat rows need a chat template, and the base model's tokenizer has none; "
            "use an instruct base model or data.shape: prompt_completion"
        )


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (with the template's
    end-of-turn marks), found by rendering each prefix: the text after "...<assistant prompt>" up to the
    end of that turn. InputError when the template does not render a prefix as a prefix."""
    full = render_chat(tokenizer, messages)
    spans = []
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: index + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise InputError(
                "the chat template renders a conversation's beginning differently from the whole conversation, "
                "so its assistant turns cannot be located for the loss mask"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> Encoded:
    """Token ids of the rendered conversation with labels on assistant-turn tokens only, cut at max_length."""
    full, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return Encoded(input_ids=ids[:max_length], labels=labels[:max_length], truncated=truncated, completion_fits=True)


def prompt_and_completion(rows: list[dict], shape: str, cfg: PromptConfig) -> tuple[str, list[str], list[str]]:
    """(template, texts, completions) of price rows (the prompt's template, the rendered prices) or of
    prompt/completion rows (verbatim)."""
    if shape == PRICE:
        completions = [render_completion(cfg.completion, row["price"]) for row in rows]
        return cfg.template, [row["text"] for row in rows], completions
    return VERBATIM, [row["prompt"] for row in rows], [row["completion"] for row in rows]


def encode_rows(tokenizer, rows: list[dict], shape: str, cfg: PromptConfig) -> list[Encoded]:
    """Input ids and completion-only labels for split rows of `shape`, one Encoded per row; price and
    prompt/completion rows are tokenized as batches (see `encode_examples`)."""
    if shape == CHAT:
        return [encode_chat(tokenizer, row["messages"], cfg.max_length) for row in rows]
    template, texts, completions = prompt_and_completion(rows, shape, cfg)
    return encode_examples(tokenizer, template, texts, completions, cfg.max_length, cfg.add_eos)


def generation_prompt(tokenizer, row: dict, shape: str, cfg: PromptConfig, max_new_tokens: int) -> str:
    """The text a model continues at evaluation, cut so it leaves `max_new_tokens` within max_length.

    A chat prompt is every turn before the last, with the template's assistant prompt; a long one keeps
    its end.
    """
    budget = cfg.max_length - max_new_tokens
    if shape == PRICE:
        return truncate_prompt(tokenizer, cfg.template, row["text"], budget)
    if shape == PAIR:
        return truncate_prompt(tokenizer, VERBATIM, row["prompt"], budget)
    prompt = render_chat(tokenizer, row["messages"][:-1], add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= budget else tokenizer.decode(ids[-max(budget, 1) :])
