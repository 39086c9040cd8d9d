"""Stage `tokenize_data`: turn the train and validation splits into token ids with completion-only labels.

Uses the base model's tokenizer and params `prompt` (template, completion, max_length, add_eos). The rows'
fields give the shape (stages/common/shapes.py): a price row
becomes the prompt (the template with the description) followed by the completion (the price, e.g.
"99.00", then EOS); a prompt/completion row is used verbatim (completion then EOS); a chat row is rendered
with the base model's chat template. Prompt tokens (all but the assistant turns, for chat) are labelled
-100 so the loss covers the completion only. Examples too long for max_length are cut and counted.
Stops with an error naming the split file and line when an example keeps no label token.
It writes both splits as a Hugging Face DatasetDict (arrow), the length metrics, and the length histogram as
plot data and as a chart. Inputs and outputs: `SPEC` below.

Run: `python -m stages.tokenize_data` (or `dvc repro tokenize_data`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from stages.common.charts import token_histogram
from stages.common.cli import run_stage
from stages.common.config import CHAT, Params, PromptConfig
from stages.common.errors import StageError
from stages.common.io import atomic_path, read_jsonl, write_csv, write_json
from stages.common.labels import IGNORE_INDEX
from stages.common.modeling import load_tokenizer
from stages.common.paths import Paths
from stages.common.rows import TARGET_FIELD, split_shape
from stages.common.shapes import encode_row, require_chat_template
from stages.common.spec import StageSpec

SPEC = StageSpec(
    "tokenize_data",
    params=("prompt",),
    reads=(Paths.base_model, Paths.train_split, Paths.val_split),
    writes=(Paths.tokenized, Paths.token_lengths_plot, Paths.token_histogram),
    metrics=(Paths.token_metrics,),
)
TOKENIZED_SPLITS = ("train", "val")
HISTOGRAM_BIN = 8  # tokens per bar of the DVC length plot


@dataclass(frozen=True)
class Result:
    examples: dict[str, int]
    truncated: dict[str, int]
    max_tokens: int


def encode_split(tokenizer, rows: list[dict], cfg: PromptConfig, where: str) -> tuple[dict[str, list], int]:
    """Columns input_ids/labels for `rows` (of any one shape), and how many were truncated; `where` names
    the file in errors."""
    shape = split_shape(rows, where)
    if shape == CHAT:
        require_chat_template(tokenizer, where)
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    truncated = 0
    for line, row in enumerate(rows, start=1):
        encoded = encode_row(tokenizer, row, shape, cfg)
        if not encoded.completion_fits or all(label == IGNORE_INDEX for label in encoded.labels):
            raise StageError(
                f"{where}:{line}: field {TARGET_FIELD[shape]!r} gives a completion that does not fit in "
                f"prompt.max_length={cfg.max_length} tokens, so the example would teach nothing; raise max_length"
            )
        columns["input_ids"].append(encoded.input_ids)
        columns["labels"].append(encoded.labels)
        truncated += encoded.truncated
    return columns, truncated


def length_rows(lengths: dict[str, list[int]]) -> list[dict]:
    """Rows of (split, length bin, examples) for the DVC bar plot."""
    rows = []
    for name, values in lengths.items():
        counts = Counter(v // HISTOGRAM_BIN * HISTOGRAM_BIN for v in values)
        rows += [{"split": name, "tokens": start, "examples": counts[start]} for start in sorted(counts)]
    return rows


def run(params: Params, paths: Paths) -> Result:
    """Tokenize the train and val splits; write the arrow datasets, the length report and plot."""
    from datasets import Dataset, DatasetDict

    cfg = params.prompt
    tokenizer = load_tokenizer(paths.base_model)
    encoded, truncated, lengths = {}, {}, {}
    for name in TOKENIZED_SPLITS:
        source = paths.split(name)
        columns, truncated[name] = encode_split(tokenizer, read_jsonl(source), cfg, str(source))
        encoded[name] = Dataset.from_dict(columns)
        lengths[name] = [len(ids) for ids in columns["input_ids"]]
    with atomic_path(paths.tokenized) as tmp:
        DatasetDict(encoded).save_to_disk(str(tmp))
    report = {
        name: {
            "examples": len(lengths[name]),
            "truncated": truncated[name],
            "tokens": sum(lengths[name]),
            "mean_tokens": sum(lengths[name]) / len(lengths[name]),
            "max_tokens": max(lengths[name]),
        }
        for name in TOKENIZED_SPLITS
    }
    write_json(paths.token_metrics, report)
    write_csv(paths.token_lengths_plot, length_rows(lengths))
    token_histogram(lengths, cfg.max_length, paths.token_histogram)
    for name, stats in report.items():
        print(
            f"{name}: {stats['examples']} examples, {stats['tokens']} tokens "
            f"(mean {stats['mean_tokens']:.1f}, max {stats['max_tokens']}), {stats['truncated']} truncated"
        )
    return Result(
        examples={n: r["examples"] for n, r in report.items()},
        truncated=truncated,
        max_tokens=max(r["max_tokens"] for r in report.values()),
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
