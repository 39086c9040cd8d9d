"""tokenize_data: completion-only labels, truncation report, clear failure when no label survives."""

import json
import shutil

import pytest

from stages import tokenize_data
from stages.common.config import params_from_dict
from stages.common.labels import IGNORE_INDEX


def test_labels_mask_the_prompt(pipeline_project):
    from datasets import load_from_disk

    paths, _, results = pipeline_project
    data = load_from_disk(str(paths.tokenized))
    assert results["tokenize_data"].examples == {"train": 48, "val": 8}
    for example in data["train"]:
        labels = example["labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:first])
        assert labels[first:] == example["input_ids"][first:]
    report = json.loads(paths.token_metrics.read_text())
    assert report["train"]["examples"] == 48 and report["train"]["truncated"] == 0
    assert paths.token_histogram.stat().st_size > 0 and paths.token_lengths_plot.is_file()


def test_truncation_is_counted(pipeline_project, tmp_path):
    paths, _params, _ = pipeline_project
    tokenizer_params = params_from_dict({"prompt": {"max_length": 90}})
    from stages.common.io import read_jsonl
    from stages.common.modeling import load_tokenizer

    rows = [{"text": "A silver kettle with a long description. " * 10, "price": 12.0}, *read_jsonl(paths.split("val"))]
    columns, truncated = tokenize_data.encode_split(
        load_tokenizer(paths.base_model), rows, tokenizer_params.prompt, "val.jsonl"
    )
    assert truncated >= 1 and max(len(ids) for ids in columns["input_ids"]) <= 90


def test_no_label_left_names_file_and_line(pipeline_project):
    paths, _, _ = pipeline_project
    from stages.common.io import read_jsonl
    from stages.common.modeling import load_tokenizer

    cfg = params_from_dict({"prompt": {"max_length": 3, "add_eos": False}}).prompt
    with pytest.raises(tokenize_data.StageError, match=r"train.jsonl:1: field 'price'"):
        tokenize_data.encode_split(
            load_tokenizer(paths.base_model), read_jsonl(paths.split("train")), cfg, "train.jsonl"
        )


def test_broken_jsonl_line_exits_1_naming_file_and_line(project, tiny_model_dir, capsys):
    shutil.copytree(tiny_model_dir, project / "models" / "base")
    splits = project / "data" / "splits"
    splits.mkdir(parents=True)
    (splits / "train.jsonl").write_text('{"text": "a lamp", "price": 1}\n{"text": broken\n', encoding="utf-8")
    (splits / "val.jsonl").write_text('{"text": "a lamp", "price": 1}\n', encoding="utf-8")
    assert tokenize_data.main([]) == 1
    assert "train.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (project / "data" / "tokenized").exists()
