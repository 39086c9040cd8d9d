"""split_data: sources, cleaning counts, deduplication, frozen test set, clear errors, outputs kept."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from stages import split_data
from stages.common.config import params_from_dict
from stages.common.errors import InputError
from stages.common.io import read_jsonl
from stages.common.paths import Paths
from tests.conftest import REPO_ROOT, price_rows


def run_with(project, **data):
    paths = Paths.at(project)
    params = params_from_dict(
        {"data": {"source": "data/raw/prices.csv", "n_test": 10, "n_val": 5, "n_train": 20, **data}}
    )
    return split_data.run(params, paths), paths


def test_embedded_diamonds_render_real_prices(tmp_path):
    params = params_from_dict({"data": {"n_test": 20, "n_val": 10, "n_train": 30}})
    result = split_data.run(params, Paths.at(tmp_path))
    assert result.rows_in == 53940
    row = read_jsonl(tmp_path / "data" / "splits" / "train.jsonl")[0]
    assert "carat" in row["text"] and "clarity" in row["text"] and row["price"] > 0


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_local_formats(project, suffix):
    table = pd.DataFrame(price_rows(60)).rename(columns={"text": "description", "price": "usd"})
    path = project / "data" / "raw" / f"items{suffix}"
    {
        ".csv": lambda: table.to_csv(path, index=False),
        ".tsv": lambda: table.to_csv(path, index=False, sep="\t"),
        ".jsonl": lambda: table.to_json(path, orient="records", lines=True),
        ".json": lambda: table.to_json(path, orient="records"),
        ".parquet": lambda: table.to_parquet(path),
    }[suffix]()
    result, _ = run_with(project, source=str(path), text_column="description", price_column="usd")
    assert result.sizes == {"train": 20, "val": 5, "test": 10}


def test_dataset_folder_goes_through_datasets_load_dataset(project):
    folder = project / "data" / "raw" / "hub-layout"
    folder.mkdir()
    pd.DataFrame(price_rows(50)).to_json(folder / "train.jsonl", orient="records", lines=True)
    result, _ = run_with(project, source="data/raw/hub-layout", hub_split="train")
    assert result.rows_in == 50 and result.sizes["test"] == 10


def test_hub_config_and_split_of_a_local_dataset_folder(project):
    """A folder in Hub layout whose README declares two configurations, read as `datasets` reads a Hub
    repository: data.hub_config picks the configuration, data.hub_split the split."""
    folder = project / "data" / "raw" / "hub-configs"
    for config, n in (("small", 40), ("large", 70)):
        (folder / config).mkdir(parents=True)
        rows = pd.DataFrame(price_rows(n)).rename(columns={"text": "description"})
        rows.to_json(folder / config / "train.jsonl", orient="records", lines=True)
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/train.jsonl\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/train.jsonl\n---\n",
        encoding="utf-8",
    )
    result, paths = run_with(project, source="data/raw/hub-configs", hub_config="large", text_column="description")
    assert result.rows_in == 70
    assert json.loads(paths.data_metrics.read_text())["source"] == "data/raw/hub-configs"
    with pytest.raises(InputError, match="config 'medium'"):
        run_with(project, source="data/raw/hub-configs", hub_config="medium", text_column="description")


def test_unknown_hub_dataset_fails_clearly(project):
    (project / "params.yaml").write_text("data:\n  source: no-such-owner/no-such-dataset\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.split_data"], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "data.source='no-such-owner/no-such-dataset' (config None, split 'train') cannot be loaded" in done.stderr


def test_cleaning_counts_every_dropped_row(project):
    rows = [
        *price_rows(40),
        {"text": "free sample", "price": 0},
        {"text": "refund", "price": -5},
        {"text": "unknown", "price": None},
        {"text": "   ", "price": 12},
        {"text": "typo", "price": "twelve"},
        {"text": "  A RED kettle,   model 0, size 1 cm. ", "price": 99},  # duplicate of row 0 after normalising
    ]
    rows[0] = {"text": "A red kettle, model 0, size 1 cm.", "price": 10}
    pd.DataFrame(rows).to_csv(project / "data" / "raw" / "prices.csv", index=False)
    result, paths = run_with(project, n_train=-1)
    assert result.dropped == {
        "price_not_positive": 2,
        "price_missing": 1,
        "text_empty": 1,
        "price_not_numeric": 1,
        "duplicate_text": 1,
    }
    summary = json.loads(paths.data_metrics.read_text())
    assert summary["rows_in"] == 46 and summary["rows_kept"] == 40
    assert sum(summary[s]["n"] for s in ("train", "val", "test")) == 40


def test_no_text_is_shared_between_splits(project):
    _, paths = run_with(project)
    texts = {name: {r["text"].lower() for r in read_jsonl(paths.split(name))} for name in ("train", "val", "test")}
    assert not texts["train"] & texts["test"] and not texts["val"] & texts["test"]


def test_test_set_is_frozen_when_train_size_changes(project):
    _, paths = run_with(project, n_train=20)
    first = paths.split("test").read_text()
    run_with(project, n_train=40)
    assert paths.split("test").read_text() == first
    assert len(read_jsonl(paths.split("train"))) == 40


def test_a_pinned_test_set_survives_new_rows(project):
    _, paths = run_with(project)
    pinned = project / "data" / "raw" / "test-pinned.jsonl"
    pinned.write_bytes(paths.split("test").read_bytes())
    first_hash = json.loads(paths.data_metrics.read_text())["test"]["sha256"]
    raw = project / "data" / "raw" / "prices.csv"
    more = pd.DataFrame(price_rows(40, seed=5)).assign(text=lambda d: d["text"].str.replace("model", "mark"))
    pd.concat([pd.read_csv(raw), more]).to_csv(raw, index=False)
    assert run_with(project)[1].split("test").read_bytes() != pinned.read_bytes()  # unpinned: it moved
    run_with(project, test_split="data/raw/test-pinned.jsonl")
    assert paths.split("test").read_bytes() == pinned.read_bytes()
    assert json.loads(paths.data_metrics.read_text())["test"]["sha256"] == first_hash
    test_texts = {r["text"] for r in read_jsonl(paths.split("test"))}
    assert not test_texts & {r["text"] for r in read_jsonl(paths.split("train")) + read_jsonl(paths.split("val"))}


def test_a_pinned_test_set_of_another_shape_is_refused(project):
    (project / "data" / "raw" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(split_data.StageError, match=r"holds prompt_completion rows but data\.shape is price"):
        run_with(project, test_split="data/raw/pairs.jsonl")


def test_same_seed_same_split_and_hash(project):
    _, paths = run_with(project)
    first = json.loads(paths.data_metrics.read_text())
    run_with(project)
    assert json.loads(paths.data_metrics.read_text()) == first


def test_impossible_sizes_fail_and_keep_previous_outputs(project):
    _, paths = run_with(project)
    before = paths.split("train").read_text()
    with pytest.raises(split_data.StageError, match="needs 1015"):
        run_with(project, n_train=1000)
    assert paths.split("train").read_text() == before


def test_missing_column_is_named(project):
    with pytest.raises(split_data.StageError, match=r"not found: data.price_column='cost'"):
        run_with(project, price_column="cost")


def test_missing_file_and_unknown_format_exit_nonzero(project):
    (project / "params.yaml").write_text("data:\n  source: data/raw/absent.csv\n", encoding="utf-8")
    assert split_data.main([]) == 1
    (project / "params.yaml").write_text("data:\n  source: data/raw/table.xlsx\n", encoding="utf-8")
    (project / "data" / "raw" / "table.xlsx").write_text("x", encoding="utf-8")
    assert split_data.main([]) == 1
    assert not (project / "data" / "splits").exists()
