"""Prompt/completion and chat data through every stage, from a local JSONL file to an exported adapter.

The tiny BPE tokenizer has no chat template, so the chat project sets a simple Jinja one on the base
model's source tokenizer (as an instruct model ships it); the loss mask finds the assistant turns.
"""

import json
import math

import pytest

from stages import base_model, evaluate_adapter, export_hub, split_data, tokenize_data, train_qlora
from stages.common.config import load_params
from stages.common.io import read_jsonl
from stages.common.labels import IGNORE_INDEX
from stages.common.paths import Paths
from tests.conftest import write_project

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
COLOURS = ["red", "blue", "green", "black", "white", "silver"]
THINGS = ["kettle", "lamp", "chair", "speaker", "backpack", "watch", "drill"]


def item(i: int) -> tuple[str, str]:
    return COLOURS[i % len(COLOURS)], THINGS[i % len(THINGS)]


def pair_rows(n: int) -> list[dict]:
    return [
        {"question": f"A {c} {t}, model {i}. Colour:", "answer": f" {c}"}
        for i, (c, t) in enumerate(map(item, range(n)))
    ]


def chat_rows(n: int) -> list[dict]:
    return [
        {"conversation": [
            {"role": "system", "content": "Answer with the colour only."},
            {"role": "user", "content": f"What colour is the {t}, model {i}? It is {c}."},
            {"role": "assistant", "content": c},
        ]}
        for i, (c, t) in enumerate(map(item, range(n)))
    ]  # fmt: skip


def set_chat_template(folder) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def run_every_stage(root, tiny_model_dir, data: dict, rows: list[dict], chat: bool):
    """A tiny project on `rows` (written as data/raw/instructions.jsonl) through all six stages."""
    write_project(root, tiny_model_dir, {"data": {"source": "data/raw/instructions.jsonl", **data}})
    body = "".join(json.dumps(row) + "\n" for row in rows)
    (root / "data" / "raw" / "instructions.jsonl").write_text(body, encoding="utf-8")
    if chat:
        set_chat_template(root / "models" / "tiny-source")
    paths = Paths.at(root)
    params = load_params(paths.params)
    for module in (base_model, split_data, tokenize_data, train_qlora, evaluate_adapter, export_hub):
        module.run(params, paths)
    return paths, params


@pytest.fixture(scope="module")
def pair_project(tmp_path_factory, tiny_model_dir):
    data = {"shape": "prompt_completion", "prompt_column": "question", "completion_column": "answer"}
    return run_every_stage(tmp_path_factory.mktemp("pairs"), tiny_model_dir, data, pair_rows(90), chat=False)


@pytest.fixture(scope="module")
def chat_project(tmp_path_factory, tiny_model_dir):
    data = {"shape": "chat", "messages_column": "conversation"}
    return run_every_stage(tmp_path_factory.mktemp("chat"), tiny_model_dir, data, chat_rows(90), chat=True)


@pytest.fixture(params=["pair", "chat"])
def shaped_project(request):
    return request.getfixturevalue(f"{request.param}_project")


def test_splits_carry_the_shape(pair_project, chat_project):
    pair_paths, _ = pair_project
    assert set(read_jsonl(pair_paths.split("train"))[0]) == {"prompt", "completion"}
    assert json.loads(pair_paths.data_metrics.read_text())["shape"] == "prompt_completion"
    chat_paths, _ = chat_project
    (row, *_) = read_jsonl(chat_paths.split("test"))
    assert [turn["role"] for turn in row["messages"]] == ["system", "user", "assistant"]
    report = json.loads(chat_paths.data_metrics.read_text())
    assert report["shape"] == "chat" and "price" not in report["test"]


def test_prompt_completion_labels_cover_the_completion_and_eos(pair_project):
    from datasets import load_from_disk

    from stages.common.modeling import load_tokenizer

    paths, _ = pair_project
    tokenizer = load_tokenizer(paths.base_model)
    first = read_jsonl(paths.split("train"))[0]
    example = load_from_disk(str(paths.tokenized))["train"][0]
    labelled = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == first["completion"] + tokenizer.eos_token


def test_chat_labels_cover_assistant_turns_only(chat_project):
    from stages.common.modeling import load_tokenizer
    from stages.common.shapes import encode_chat

    paths, _ = chat_project
    tokenizer = load_tokenizer(paths.base_model)
    messages = [
        {"role": "user", "content": "Colour of the red lamp?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the blue chair?"},
        {"role": "assistant", "content": "blue"},
    ]
    encoded = encode_chat(tokenizer, messages, max_length=128)
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs += [tokenizer.decode(current)] if current else []
    assert runs == ["red<|endoftext|>\n", "blue<|endoftext|>\n"]


def test_evaluation_reports_loss_perplexity_and_exact_match(shaped_project):
    paths, _ = shaped_project
    metrics = json.loads(paths.eval_metrics.read_text())
    rows = read_jsonl(paths.predictions)
    assert len(rows) == len(read_jsonl(paths.split("test")))
    for model in ("adapter", "base_zero_shot"):
        m = metrics[model]
        assert m["n"] == len(rows) and "avg_error" not in m
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert m["exact_matches"] == sum(r[f"{model}_exact"] for r in rows)
    assert metrics["adapter"]["loss"] < metrics["base_zero_shot"]["loss"]  # training taught the completions
    assert paths.scatter_chart.read_bytes()[:4] == b"\x89PNG"
    assert paths.predictions_plot.read_text().splitlines()[0] == "item,base_loss,adapter_loss,exact_match"


def test_export_card_claims_no_price_metrics(shaped_project):
    import yaml

    from stages.common.report import comparison_table

    paths, _ = shaped_project
    assert (paths.export / "adapter_model.safetensors").is_file()
    card = (paths.export / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    types = [m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]]
    assert types == ["loss", "perplexity", "exact_match"] and "price-prediction" not in meta["tags"]
    assert "avg error" not in card and "$" not in card and "hit rate" not in card and "perplexity" in card
    table = comparison_table(json.loads(paths.eval_metrics.read_text()))
    assert "perplexity" in table and "fine-tuned adapter" in table and "$" not in table


def test_merged_export_of_text_data_agrees_with_the_adapter(shaped_project, tmp_path):
    import dataclasses
    import shutil

    paths, params = shaped_project
    copy = Paths.at(tmp_path)
    for folder in ("models", "data", "metrics", "reports", "eval"):
        shutil.copytree(paths.root / folder, tmp_path / folder)
    merged = dataclasses.replace(params, export=dataclasses.replace(params.export, merge=True, merge_check_items=4))
    export_hub.run(merged, copy)
    check = json.loads((copy.export / "merge_check.json").read_text())
    evaluated = [row["adapter_output"] for row in read_jsonl(paths.predictions)[:4]]
    assert check["identical_predictions"] == 4 and check["merged_predictions"] == evaluated
    assert (copy.export / "merged" / "model.safetensors").is_file()


def test_chat_data_without_a_chat_template_stops_tokenize(project, tiny_model_dir, capsys):
    import shutil

    shutil.copytree(tiny_model_dir, project / "models" / "base")  # the tiny tokenizer has no chat template
    splits = project / "data" / "splits"
    splits.mkdir(parents=True)
    rows = [{"messages": row["conversation"]} for row in chat_rows(3)]
    for name in ("train", "val"):
        (splits / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert tokenize_data.main([]) == 1
    assert "train.jsonl: chat rows need a chat template" in capsys.readouterr().err
    assert not (project / "data" / "tokenized").exists()


def test_a_split_mixing_shapes_names_the_line(project, tiny_model_dir, capsys):
    import shutil

    shutil.copytree(tiny_model_dir, project / "models" / "base")
    splits = project / "data" / "splits"
    splits.mkdir(parents=True)
    body = '{"prompt": "a", "completion": "b"}\n{"text": "a lamp", "price": 3}\n'
    for name in ("train", "val"):
        (splits / f"{name}.jsonl").write_text(body, encoding="utf-8")
    assert tokenize_data.main([]) == 1
    assert "train.jsonl:2: a price row in a file of prompt_completion rows" in capsys.readouterr().err


def test_the_mlflow_model_answers_text_data_as_evaluation_did(shaped_project):
    """serving/pricer.py on prompts (or conversations so far, without the answer) gives evaluation's outputs."""
    import pandas as pd

    from serving.pricer import Pricer, model_config

    paths, params = shaped_project
    size = params.evaluate.batch_size
    test, evaluated = read_jsonl(paths.split("test"))[:size], read_jsonl(paths.predictions)[:size]
    config = model_config(params, paths)
    if config["shape"] == "chat":
        inputs = [json.dumps(row["messages"][:-1]) for row in test]
    else:
        inputs = [row["prompt"] for row in test]
    answers = Pricer().load(config, paths.adapter).answers(pd.DataFrame({config["input_column"]: inputs}))
    assert list(answers.columns) == ["completion"]
    assert list(answers["completion"]) == [row["adapter_output"] for row in evaluated]
