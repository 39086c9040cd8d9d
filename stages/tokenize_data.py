"""Stage `tokenize_data`: turn the train and validation splits into token ids with completion-only labels.

Uses the base model's tokenizer and params `prompt` (template, completion, max_length, add_eos). The rows'
fields give the shape (stages/common/shapes.py): a price row
becomes the prompt (the template with the description) followed by the completion (the price, e.g.
"99.00", then EOS); a prompt/completion row is used verbatim (completion then EOS); a chat row is rendered
with the base model's chat template. Prompt tokens (all but the assistant turns, for chat) are labelled
-100 so the loss covers the completion only. Examples too long for max_length are cut and counted.
Stops with an error naming the split file and line when an example keeps no label token.
A split is read, tokenized and written CHUNK_ROWS rows at a time (a batch for the tokenizer, columns built by
numpy), so memory stays flat at the course's 400k rows (docs/performance.md#data-at-the-courses-scale).
It writes both splits as a Hugging Face DatasetDict (arrow), the length metrics, and the length histogram as
plot data and as a chart. Inputs and outputs: `SPEC` below.

Run: `python -m stages.tokenize_data` (or `dvc repro tokenize_data`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from stages.common.charts import token_histogram
from stages.common.cli import run_stage
from stages.common.config import CHAT, Params, PromptConfig
from stages.common.errors import InputError, StageError
from stages.common.io import atomic_path, file_sha256, numbered_jsonl, write_csv, write_json
from stages.common.labels import IGNORE_INDEX
from stages.common.modeling import load_tokenizer
from stages.common.paths import Paths
from stages.common.prompts import encode_example, pair_token_ids
from stages.common.rows import TARGET_FIELD, numbered_shape
from stages.common.shapes import encode_rows, prompt_and_completion, require_chat_template
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
# Rows read, tokenized and written per step: big enough for the tokenizer's batch parallelism, small enough
# that memory stays flat however long the split (the course's 400k rows).
CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Result:
    examples: dict[str, int]
    truncated: dict[str, int]
    max_tokens: int


@dataclass
class SplitTokens:
    """What tokenizing one split gave: its examples' lengths (for the report) and how many were cut."""

    lengths: list[int]
    truncated: int = 0


def arrow_schema():
    """The columns' types: int32 ids (any vocabulary fits) and int64 labels, as `datasets` infers them."""
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64()))])


def numbered_chunks(path: Path, size: int) -> Iterator[list[tuple[int, dict]]]:
    """The file's (line, row) pairs, `size` at a time."""
    rows = numbered_jsonl(path)
    while chunk := list(islice(rows, size)):
        yield chunk


def encode_chunk(tokenizer, numbered: list[tuple[int, dict]], shape: str, cfg: PromptConfig, where: str):
    """Encoded rows of one chunk; StageError naming the file and line of a row whose completion cannot fit."""
    encoded = encode_rows(tokenizer, [row for _, row in numbered], shape, cfg)
    for (line, _), example in zip(numbered, encoded, strict=True):
        # ids are never negative, so the largest label is IGNORE_INDEX only when no token is labelled
        if not example.completion_fits or max(example.labels, default=IGNORE_INDEX) == IGNORE_INDEX:
            raise StageError(
                f"{where}:{line}: field {TARGET_FIELD[shape]!r} gives a completion that does not fit in "
                f"prompt.max_length={cfg.max_length} tokens, so the example would teach nothing; raise max_length"
            )
    return encoded


def token_columns(tokenizer, rows: list[dict], shape: str, cfg: PromptConfig):
    """([input_ids, labels] as Arrow list arrays, rows truncated) of a chunk of price or prompt/completion rows,
    assembled by numpy from the batched prompt and completion ids rather than row by row (at 400k rows the Python
    lists cost as much as the tokenizer). A row too long for max_length gets `encode_example`'s cut prompt. None
    when the chunk needs the row-by-row path: chat rows, or a completion that cannot fit (reported there)."""
    import numpy as np
    import pyarrow as pa

    if shape == CHAT:
        return None
    template, texts, completions = prompt_and_completion(rows, shape, cfg)
    prompts, endings = pair_token_ids(tokenizer, template, texts, completions, cfg.add_eos)
    too_long = [i for i, (p, c) in enumerate(zip(prompts, endings, strict=True)) if len(p) + len(c) > cfg.max_length]
    for i in too_long:
        cut = encode_example(tokenizer, template, texts[i], completions[i], cfg.max_length, cfg.add_eos)
        if not cut.completion_fits:
            return None
        prompts[i] = cut.input_ids[: len(cut.input_ids) - len(endings[i])]  # the cut prompt, then the completion
    input_type = arrow_schema().field("input_ids").type
    prompt_ids, completion_ids = pa.array(prompts, type=input_type), pa.array(endings, type=input_type)
    prompt_lengths = np.diff(prompt_ids.offsets.to_numpy())
    completion_lengths = np.diff(completion_ids.offsets.to_numpy())
    if completion_lengths.min(initial=1) == 0:
        return None
    lengths = prompt_lengths + completion_lengths
    # each row is its prompt then its completion: mark every output position as one or the other, then fill
    # the prompt positions with the prompt ids and the rest with the completion ids, both in row order
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    in_prompt = np.arange(offsets[-1]) - offsets[row_of] < prompt_lengths[row_of]
    ids = np.empty(offsets[-1], dtype=np.int32)
    ids[in_prompt] = prompt_ids.values.to_numpy()
    ids[~in_prompt] = completion_ids.values.to_numpy()
    labels = ids.astype(np.int64)
    labels[in_prompt] = IGNORE_INDEX
    starts = pa.array(offsets)
    columns = [pa.ListArray.from_arrays(starts, pa.array(ids)), pa.ListArray.from_arrays(starts, pa.array(labels))]
    return columns, len(too_long)


def row_columns(tokenizer, numbered: list[tuple[int, dict]], shape: str, cfg: PromptConfig, where: str):
    """([input_ids, labels] as Arrow list arrays, rows truncated) of a chunk encoded row by row (`encode_chunk`):
    the path for chat rows, and the one that names the line of a completion that cannot fit."""
    import pyarrow as pa

    ids, labels, truncated, _ = zip(*encode_chunk(tokenizer, numbered, shape, cfg, where), strict=True)
    types = [field.type for field in arrow_schema()]
    return [pa.array(ids, type=types[0]), pa.array(labels, type=types[1])], sum(truncated)


def tokenize_split(tokenizer, source: Path, cfg: PromptConfig, arrow_file: Path) -> SplitTokens:
    """Tokenize the split file `source` chunk by chunk into the Arrow stream `arrow_file` (columns input_ids and
    labels); its lengths and truncation count. Errors name the file and line (shape, JSON, completion fit)."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    where, shape, result = str(source), None, SplitTokens(lengths=[])
    schema = arrow_schema()
    with (
        pa.ipc.new_stream(str(arrow_file), schema) as writer,
        tqdm(desc=f"tokenizing {source.name}", unit=" rows", unit_scale=True) as progress,
    ):
        for numbered in numbered_chunks(source, CHUNK_ROWS):
            if shape is None and numbered_shape(numbered[:1], where) == CHAT:
                require_chat_template(tokenizer, where)
            shape = numbered_shape(numbered, where, expected=shape)
            encoded = token_columns(tokenizer, [row for _, row in numbered], shape, cfg)
            columns, truncated = encoded or row_columns(tokenizer, numbered, shape, cfg, where)
            result.truncated += truncated
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            result.lengths += columns[0].value_lengths().to_pylist()
            progress.update(len(numbered))
    if shape is None:
        raise InputError(f"{where}: no rows; run split_data first")
    return result


def length_rows(lengths: dict[str, list[int]]) -> list[dict]:
    """Rows of (split, length bin, examples) for the DVC bar plot."""
    rows = []
    for name, values in lengths.items():
        counts = Counter(v // HISTOGRAM_BIN * HISTOGRAM_BIN for v in values)
        rows += [{"split": name, "tokens": start, "examples": counts[start]} for start in sorted(counts)]
    return rows


def memory_mapped(arrow_file: Path):
    """The Dataset over `arrow_file`, memory-mapped, fingerprinted by the file's sha256. `Dataset.from_file`
    derives its fingerprint from the file's path, a random scratch folder here: the same rows then saved with
    another fingerprint on every run and every machine, so DVC hashed the output differently each time and a
    run cache filled on one machine never matched on another (a sweep's trials on several workers)."""
    from datasets import Dataset
    from datasets.table import MemoryMappedTable

    return Dataset(MemoryMappedTable.from_file(str(arrow_file)), fingerprint=file_sha256(arrow_file)[:16])


def run(params: Params, paths: Paths) -> Result:
    """Tokenize the train and val splits; write the arrow datasets, the length report and plot."""
    from datasets import DatasetDict

    cfg = params.prompt
    tokenizer = load_tokenizer(paths.base_model)
    paths.tokenized.parent.mkdir(parents=True, exist_ok=True)
    # the Arrow streams are written as the rows are read, then saved as the dataset; the scratch folder sits
    # beside the output so both are on one disk, and goes away whatever happens
    with tempfile.TemporaryDirectory(prefix=".tokenize-", dir=paths.tokenized.parent) as scratch:
        splits, datasets = {}, {}
        for name in TOKENIZED_SPLITS:
            arrow_file = Path(scratch) / f"{name}.arrow"
            splits[name] = tokenize_split(tokenizer, paths.split(name), cfg, arrow_file)
            datasets[name] = memory_mapped(arrow_file)
        with atomic_path(paths.tokenized) as tmp:
            DatasetDict(datasets).save_to_disk(str(tmp))
        del datasets  # memory-mapped from the scratch files: released before they are removed
    lengths = {name: split.lengths for name, split in splits.items()}
    report = {
        name: {
            "examples": len(split.lengths),
            "truncated": split.truncated,
            "tokens": sum(split.lengths),
            "mean_tokens": sum(split.lengths) / len(split.lengths),
            "max_tokens": max(split.lengths),
        }
        for name, split in splits.items()
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
        truncated={n: r["truncated"] for n, r in report.items()},
        max_tokens=max(r["max_tokens"] for r in report.values()),
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
