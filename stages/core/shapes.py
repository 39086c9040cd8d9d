"""The three shapes of training data, as split_data writes them and tokenize/evaluate read them.

- `price`: {"text", "price"}: the prompt and completion are built from `prompt.template` and
  `prompt.completion` (the course's price task).
- `prompt_completion`: {"prompt", "completion"}: used verbatim (no template); any supervised task.
- `chat`: {"messages": [{"role", "content"}, ...]} ending with an assistant turn: rendered with the base
  model's chat template; the loss covers the assistant turns only.
A split file's shape follows from its rows' fields (`split_shape`), so the splits carry it themselves.
Each example is encoded with labels on the completion (or assistant) tokens only; prompt tokens get -100.
"""

from __future__ import annotations

import re

from stages.core.config import PromptConfig
from stages.core.io import InputError
from stages.core.prompts import IGNORE_INDEX, Encoded, encode_example, render_completion, truncate_prompt

PRICE, PAIR, CHAT = "price", "prompt_completion", "chat"
SHAPES = (PRICE, PAIR, CHAT)
ROLES = ("system", "user", "assistant")
VERBATIM = "{text}"  # the "template" of a prompt/completion row: its prompt as it is
TARGET_FIELD = {PRICE: "price", PAIR: "completion", CHAT: "messages"}  # named when a target does not fit


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: the key under which two texts count as the same."""
    return re.sub(r"\s+", " ", text).strip().lower()


def row_shape(row: dict) -> str | None:
    if "messages" in row:
        return CHAT
    if "prompt" in row and "completion" in row:
        return PAIR
    if "text" in row and "price" in row:
        return PRICE
    return None


def split_shape(rows: list[dict], where: str) -> str:
    """The one shape of every row in a split file; InputError naming the line of a row that differs."""
    first = None
    for line, row in enumerate(rows, start=1):
        shape = row_shape(row)
        if shape is None:
            raise InputError(
                f"{where}:{line}: fields {sorted(row)}; expected text+price, prompt+completion or messages"
            )
        if first is not None and shape != first:
            raise InputError(f"{where}:{line}: a {shape} row in a file of {first} rows")
        first = shape
    if first is None:
        raise InputError(f"{where}: no rows; run split_data first")
    return first


def row_key(row: dict) -> str:
    """What must not repeat across splits: the description, the prompt, or the conversation before its
    last (assistant) turn."""
    shape = row_shape(row)
    if shape == PRICE:
        return normalise(row["text"])
    if shape == PAIR:
        return normalise(row["prompt"])
    return normalise(" ".join(f"{turn['role']}: {turn['content']}" for turn in row["messages"][:-1]))


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


def encode_row(tokenizer, row: dict, shape: str, cfg: PromptConfig) -> Encoded:
    """Input ids and completion-only labels for one split row of `shape`."""
    if shape == PRICE:
        completion = render_completion(cfg.completion, row["price"])
        return encode_example(tokenizer, cfg.template, row["text"], completion, cfg.max_length, cfg.add_eos)
    if shape == PAIR:
        return encode_example(tokenizer, VERBATIM, row["prompt"], row["completion"], cfg.max_length, cfg.add_eos)
    return encode_chat(tokenizer, row["messages"], cfg.max_length)


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


def reference(row: dict, shape: str) -> str:
    """The completion a prompt/completion or chat row expects (the last assistant turn for chat)."""
    return row["completion"] if shape == PAIR else row["messages"][-1]["content"]
