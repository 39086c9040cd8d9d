"""tokenize_data: completion-only labels, truncation report, clear failure when no label survives."""

import json
import shutil

import pytest

from stages import tokenize_data
from stages.common.config import params_from_dict
from stages.common.io import read_jsonl
from stages.common.labels import IGNORE_INDEX


def test_labels_mask_the_prompt(pipeline_project):
    from datasets import load_from_disk

    paths, _, results = pipeline_project
    data = load_from_disk(str(paths.tokenized))
    assert results["tokenize_data"].examples == {"train": 48, "val": len(read_jsonl(paths.split("val")))}
    for example in data["train"]:
        labels = example["labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:first])
        assert labels[first:] == example["input_ids"][first:]
    report = json.loads(paths.token_metrics.read_text())
    assert report["train"]["examples"] == 48 and report["train"]["truncated"] == 0
    assert paths.token_histogram.stat().st_size > 0 and paths.token_lengths_plot.is_file()


def test_truncation_is_counted(pipeline_project, tmp_path):
    from datasets import Dataset

    from stages.common.io import read_jsonl, write_jsonl
    from stages.common.modeling import load_tokenizer

    paths, _params, _ = pipeline_project
    cfg = params_from_dict({"prompt": {"max_length": 90}}).prompt
    source = tmp_path / "val.jsonl"
    long_row = {"text": "A silver kettle with a long description. " * 10, "price": 12.0}
    write_jsonl(source, [long_row, *read_jsonl(paths.split("val"))])
    split = tokenize_data.tokenize_split(load_tokenizer(paths.base_model), source, cfg, tmp_path / "val.arrow")
    assert split.truncated == 1 and max(split.lengths) <= 90
    written = Dataset.from_file(str(tmp_path / "val.arrow"))["input_ids"]
    assert [len(ids) for ids in written] == split.lengths and len(written) == 1 + len(read_jsonl(paths.split("val")))


def test_no_label_left_names_file_and_line(pipeline_project, tmp_path):
    from stages.common.modeling import load_tokenizer

    paths, _, _ = pipeline_project
    cfg = params_from_dict({"prompt": {"max_length": 3, "add_eos": False}}).prompt
    with pytest.raises(tokenize_data.StageError, match=r"train.jsonl:1: field 'price'"):
        tokenize_data.tokenize_split(load_tokenizer(paths.base_model), paths.split("train"), cfg, tmp_path / "a")


def test_chunks_give_the_dataset_one_pass_gives(pipeline_project, tmp_path, monkeypatch):
    """Read in chunks of 5 rows, train.jsonl tokenizes to the same columns, types and lengths as in one chunk."""
    from datasets import Dataset

    from stages.common.modeling import load_tokenizer

    paths, params, _ = pipeline_project
    tokenizer = load_tokenizer(paths.base_model)
    whole = tokenize_data.tokenize_split(tokenizer, paths.split("train"), params.prompt, tmp_path / "whole.arrow")
    monkeypatch.setattr(tokenize_data, "CHUNK_ROWS", 5)
    chunked = tokenize_data.tokenize_split(tokenizer, paths.split("train"), params.prompt, tmp_path / "chunks.arrow")
    first, second = (Dataset.from_file(str(tmp_path / name)) for name in ("whole.arrow", "chunks.arrow"))
    assert first.to_dict() == second.to_dict() and len(first) == 48
    assert first.features == second.features and str(first.features["input_ids"].feature.dtype) == "int32"
    assert whole == chunked


@pytest.mark.parametrize("add_eos", [True, False])
def test_the_column_path_gives_the_row_path_s_ids_and_labels(pipeline_project, add_eos):
    """token_columns (numpy over batched ids) against encode_rows (one Encoded per row): the same lists, a row to
    truncate included; a completion that cannot fit is left to the row path, which names its line."""
    from stages.common.io import read_jsonl
    from stages.common.modeling import load_tokenizer
    from stages.common.shapes import encode_rows

    paths, _, _ = pipeline_project
    tokenizer = load_tokenizer(paths.base_model)
    cfg = params_from_dict({"prompt": {"add_eos": add_eos}}).prompt
    long_row = {"text": "A silver kettle with a long description. " * 40, "price": 12.0}
    rows = [*read_jsonl(paths.split("train")), long_row]
    (ids, labels), truncated = tokenize_data.token_columns(tokenizer, rows, "price", cfg)
    encoded = encode_rows(tokenizer, rows, "price", cfg)
    assert ids.to_pylist() == [e.input_ids for e in encoded] and labels.to_pylist() == [e.labels for e in encoded]
    assert truncated == 1 == sum(e.truncated for e in encoded) and len(ids[-1]) <= cfg.max_length
    pairs = [{"prompt": r["text"], "completion": f" {r['price']:.0f} dollars"} for r in rows]
    (ids, labels), _ = tokenize_data.token_columns(tokenizer, pairs, "prompt_completion", cfg)
    assert ids.to_pylist() == [e.input_ids for e in encode_rows(tokenizer, pairs, "prompt_completion", cfg)]
    tight = params_from_dict({"prompt": {"max_length": 3, "add_eos": False}}).prompt
    assert tokenize_data.token_columns(tokenizer, rows, "price", tight) is None


def test_a_row_of_another_shape_in_a_later_chunk_is_named_by_its_line(pipeline_project, tmp_path, monkeypatch):
    from stages.common.io import read_jsonl, write_jsonl
    from stages.common.modeling import load_tokenizer

    paths, params, _ = pipeline_project
    rows = read_jsonl(paths.split("train"))[:7]
    source = tmp_path / "train.jsonl"
    write_jsonl(source, [*rows, {"prompt": "a lamp", "completion": "yes"}])
    monkeypatch.setattr(tokenize_data, "CHUNK_ROWS", 3)
    with pytest.raises(tokenize_data.InputError, match=r"train.jsonl:8: a prompt_completion row in a file of price"):
        tokenize_data.tokenize_split(load_tokenizer(paths.base_model), source, params.prompt, tmp_path / "a.arrow")


def test_broken_jsonl_line_exits_1_naming_file_and_line(project, tiny_model_dir, capsys):
    shutil.copytree(tiny_model_dir, project / "models" / "base")
    splits = project / "data" / "splits"
    splits.mkdir(parents=True)
    (splits / "train.jsonl").write_text('{"text": "a lamp", "price": 1}\n{"text": broken\n', encoding="utf-8")
    (splits / "val.jsonl").write_text('{"text": "a lamp", "price": 1}\n', encoding="utf-8")
    assert tokenize_data.main([]) == 1
    assert "train.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (project / "data" / "tokenized").exists()


def test_the_same_splits_tokenize_to_the_same_bytes_in_another_folder(pipeline_project, tmp_path):
    """Every file of data/tokenized is the same when tokenized again elsewhere (another clone, another machine), so
    DVC hashes it the same and a run cache filled by one machine's trial serves another's."""
    from tests.conftest import copy_outputs

    paths, params, _ = pipeline_project
    again = copy_outputs(paths, tmp_path)
    shutil.rmtree(again.tokenized)
    tokenize_data.run(params, again)
    files = sorted(p.relative_to(paths.tokenized) for p in paths.tokenized.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.tokenized) for p in again.tokenized.rglob("*") if p.is_file())
    assert all((paths.tokenized / f).read_bytes() == (again.tokenized / f).read_bytes() for f in files)
