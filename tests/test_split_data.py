"""split_data: sources, cleaning counts, deduplication, frozen test set, clear errors, outputs kept."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from stages import split_data
from stages.common.config import params_from_dict
from stages.common.errors import ConfigError, InputError
from stages.common.io import read_jsonl
from stages.common.paths import Paths
from stages.common.rows import row_key
from stages.data.membership import assign
from tests.conftest import REPO_ROOT, price_rows

SIZES = {"test_fraction": 0.15, "val_fraction": 0.1, "n_train": 20}


def run_with(project, **data):
    paths = Paths.at(project)
    params = params_from_dict({"data": {"source": "data/raw/prices.csv", **SIZES, **data}})
    return split_data.run(params, paths), paths


def expected_sizes(rows: list[dict], **data) -> dict[str, int]:
    """The split sizes the membership rule gives these (clean, distinct) rows."""
    splits = assign(rows, params_from_dict({"data": {**SIZES, **data}}).data)
    return {
        "train": min(len(splits["train"]), SIZES["n_train"]),
        "val": len(splits["val"]),
        "test": len(splits["test"]),
    }


def keys_of(paths, name: str) -> set[str]:
    return {row_key(row) for row in read_jsonl(paths.split(name))}


def test_embedded_diamonds_render_real_prices(tmp_path):
    params = params_from_dict({"data": {"n_train": 30}})
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
    assert result.sizes == expected_sizes(price_rows(60))


def test_dataset_folder_goes_through_datasets_load_dataset(project):
    folder = project / "data" / "raw" / "hub-layout"
    folder.mkdir()
    pd.DataFrame(price_rows(50)).to_json(folder / "train.jsonl", orient="records", lines=True)
    result, _ = run_with(project, source="data/raw/hub-layout", hub_split="train")
    assert result.rows_in == 50 and result.sizes == expected_sizes(price_rows(50))


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


COURSE_TEMPLATE = "How much does this cost to the nearest dollar?\n\n{text}\n\nPrice is $"


def test_texts_that_hold_a_whole_prompt_give_their_descriptions(project, capsys):
    """Rows as the course's pricer-data holds them (the prompt with its answer in `text`, the price beside it),
    in a folder in Hub layout: with data.text_template the splits hold the descriptions alone; a row written
    another way is dropped, counted and named; a template without {text} is refused."""
    rows = price_rows(50)
    wrapped = [
        {"text": COURSE_TEMPLATE.format(text=r["text"]) + f"{r['price']:.0f}.00", "price": r["price"]} for r in rows
    ]
    wrapped.append({"text": "A kettle. Price is $12.00", "price": 12.0})
    folder = project / "data" / "raw" / "pricer-layout"
    folder.mkdir()
    pd.DataFrame(wrapped).to_json(folder / "train.jsonl", orient="records", lines=True)
    result, paths = run_with(project, source="data/raw/pricer-layout", text_template=COURSE_TEMPLATE)
    assert result.dropped == {"text_not_in_template": 1} and result.sizes == expected_sizes(rows)
    kept = {r["text"]: r["price"] for name in ("train", "val", "test") for r in read_jsonl(paths.split(name))}
    assert kept.items() <= {r["text"]: r["price"] for r in rows}.items()  # no question, no "Price is $", no answer
    assert len(kept) == sum(result.sizes.values())
    warning = capsys.readouterr().err
    assert "(text_not_in_template), e.g. data/raw/pricer-layout [train] row 51: field 'text': does not start" in warning
    with pytest.raises(ConfigError, match=r"data.text_template: expected null or text with \{text\} once"):
        params_from_dict({"data": {"text_template": "Price is $"}})


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


def append_rows(project, n: int, seed: int) -> None:
    """`n` more distinct rows at the end of data/raw/prices.csv, as the next export would have them."""
    raw = project / "data" / "raw" / "prices.csv"
    more = pd.DataFrame(price_rows(n, seed=seed)).assign(text=lambda d: d["text"].str.replace("model", f"mark{seed}"))
    pd.concat([pd.read_csv(raw), more]).to_csv(raw, index=False)


def test_appended_rows_keep_every_test_item_and_move_no_row(project):
    _, paths = run_with(project, n_train=-1)
    before = {name: keys_of(paths, name) for name in ("train", "val", "test")}
    append_rows(project, 120, seed=5)
    run_with(project, n_train=-1)
    after = {name: keys_of(paths, name) for name in ("train", "val", "test")}
    for name in before:
        assert before[name] <= after[name]  # every old row stays in its split
    assert len(after["test"]) > len(before["test"])  # new rows join the test set too
    since = json.loads(paths.data_metrics.read_text())["since_last_run"]
    assert since["test"] == {"kept": len(before["test"]), "added": len(after["test"] - before["test"]), "removed": 0}
    assert since["moved"] == 0 and since["membership_changed"] == [] and since["previous"].endswith("(on disk)")


def test_the_split_does_not_depend_on_row_order(project):
    _, paths = run_with(project)
    first = {name: paths.split(name).read_bytes() for name in ("train", "val", "test")}
    raw = project / "data" / "raw" / "prices.csv"
    pd.read_csv(raw).iloc[::-1].to_csv(raw, index=False)
    run_with(project)
    assert {name: paths.split(name).read_bytes() for name in ("train", "val", "test")} == first


def test_a_folder_source_equals_the_same_rows_as_one_file(project):
    rows = price_rows(120, seed=3)
    single = project / "data" / "raw" / "all.jsonl"
    single.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, paths = run_with(project, source="data/raw/all.jsonl")
    one_file = {name: paths.split(name).read_bytes() for name in ("train", "val", "test")}
    folder = project / "data" / "raw" / "deliveries"
    folder.mkdir()
    pd.DataFrame(rows[:50]).to_csv(folder / "2026-12-01.csv", index=False)
    (folder / "2026-12-02.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]), encoding="utf-8")
    result, _ = run_with(project, source="data/raw/deliveries/")
    assert result.rows_in == 120
    assert {name: paths.split(name).read_bytes() for name in ("train", "val", "test")} == one_file


def test_a_bad_row_in_a_folder_is_named_by_file_and_line(project):
    folder = project / "data" / "raw" / "deliveries"
    folder.mkdir()
    pd.DataFrame(price_rows(60)).to_csv(folder / "a.csv", index=False)
    (folder / "b.jsonl").write_text('{"text": "a lamp", "price": 3}\n{"text": "broken', encoding="utf-8")
    with pytest.raises(InputError, match=r"data/raw/deliveries/b\.jsonl:2: not valid JSON"):
        run_with(project, source="data/raw/deliveries")


def test_a_changed_seed_is_reported_as_a_new_test_set(project, capsys):
    _, paths = run_with(project)
    first = json.loads(paths.data_metrics.read_text())
    run_with(project, seed=8)
    second = json.loads(paths.data_metrics.read_text())
    assert second["membership"]["fingerprint"] != first["membership"]["fingerprint"]
    assert second["since_last_run"]["membership_changed"] == ["seed"]
    assert second["since_last_run"]["test"]["removed"] > 0
    assert (
        "split membership changed since the last run (seed 42 -> 8): this is another test set"
        in capsys.readouterr().err
    )


def test_the_previous_splits_are_read_back_from_dvc_when_the_outputs_were_removed(project):
    """`dvc repro` deletes the outputs before the stage runs: the comparison comes from dvc.lock and the cache."""
    import shutil

    (project / "dvc.yaml").write_text(
        "stages:\n  split_data:\n    cmd: python -m stages.split_data\n    deps: [data/raw]\n"
        "    outs: [data/splits]\n    metrics: [metrics/data.json]\n",
        encoding="utf-8",
    )
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    _, paths = run_with(project)
    test_keys = keys_of(paths, "test")
    subprocess.run([sys.executable, "-m", "dvc", "commit", "-q", "-f", "split_data"], cwd=project, check=True)
    shutil.rmtree(paths.splits)
    paths.data_metrics.unlink()
    append_rows(project, 30, seed=6)
    run_with(project)
    since = json.loads(paths.data_metrics.read_text())["since_last_run"]
    assert since["previous"].startswith("dvc.lock (data/splits ")
    assert since["test"]["kept"] == len(test_keys) and since["test"]["removed"] == 0


def test_a_pinned_test_set_is_used_as_is(project):
    _, paths = run_with(project)
    pinned = project / "data" / "raw" / "test-pinned.jsonl"
    pinned.write_bytes(paths.split("test").read_bytes())
    first_hash = json.loads(paths.data_metrics.read_text())["test"]["sha256"]
    append_rows(project, 40, seed=5)
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
    second = json.loads(paths.data_metrics.read_text())
    assert first.pop("since_last_run") == {"previous": None} and second.pop("since_last_run")["moved"] == 0
    assert second == first


def test_impossible_sizes_fail_and_keep_previous_outputs(project):
    _, paths = run_with(project)
    before = paths.split("train").read_text()
    with pytest.raises(split_data.StageError, match=r"but data\.n_train=1000; lower it"):
        run_with(project, n_train=1000)
    assert paths.split("train").read_text() == before


def test_a_fraction_too_small_for_the_data_is_named(project):
    with pytest.raises(split_data.StageError, match=r"data\.test_fraction=0\.0001 puts none of the 90 rows"):
        run_with(project, test_fraction=0.0001)


def test_the_removed_size_keys_say_what_replaces_them():
    with pytest.raises(ConfigError, match=r"data\.n_test: replaced by data\.test_fraction"):
        params_from_dict({"data": {"n_test": 200}})


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
