"""The promotion gate applied to a real MLflow registry in a temporary SQLite store: each version's per-item
results are logged with it and compared item by item; a champion registered without them is re-scored or
not compared; nothing already in the registry is rewritten."""

import json

import pytest

from stages.common.config import TrackingConfig, params_from_dict
from stages.common.errors import ConfigError
from stages.tracking.gate import CHALLENGER, CHAMPION, Provenance
from stages.tracking.registry import (
    LEGACY_PER_ITEM_ARTIFACT,
    PER_ITEM_ARTIFACT,
    PER_ITEM_TAG,
    TEST_HASH_TAG,
    TRAINED_ON_ARTIFACT,
    TRAINED_ON_TAG,
    register_adapter,
)

TEST_SET = "a" * 64
TRUTHS = [100.0 + 37 * i for i in range(60)]
MODEL = "price-adapter"


def rows(error: float, base_error: float = 5000.0, n: int = len(TRUTHS)) -> list[dict]:
    """Prediction rows as evaluate_adapter writes them: the adapter off by `error` on every item (`n` items:
    more than 60 for a test set that grew)."""
    truths = [100.0 + 37 * i for i in range(n)]
    return [
        {"key": f"k{i}", "text": f"item {i}", "truth": t, "adapter_output": "",
         "adapter_prediction": t + error + (i % 5),
         "band": "", "base_output": "", "base_prediction": t + base_error}
        for i, t in enumerate(truths)
    ]  # fmt: skip


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, experiment, tmp_path


def logged_run(
    store, weights: bytes, prediction_rows: list[dict] | None, test_sha256: str, where=PER_ITEM_ARTIFACT,
    trained_on: tuple[str, ...] | None = (), train_metrics: dict[str, float] | None = None,
):  # fmt: skip
    """A run holding an adapter folder, (unless None) its per-item rows at `where`, the digests of the rows
    it trained on (None: a run recorded before runs listed them) and `train_metrics` ({"train/steps": 150}), as
    record_run leaves it."""
    client, experiment, tmp_path = store
    folder = tmp_path / f"adapter-{weights.hex()}"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    run_id = client.create_run(experiment, tags={TEST_HASH_TAG: test_sha256}).info.run_id
    for name, value in (train_metrics or {}).items():
        client.log_metric(run_id, name, value)
    client.log_artifacts(run_id, str(folder), "adapter")
    if prediction_rows is not None:
        client.log_text(run_id, "".join(json.dumps(r) + "\n" for r in prediction_rows), where)
        if where == PER_ITEM_ARTIFACT:
            client.set_tag(run_id, PER_ITEM_TAG, where)
    if trained_on is not None:
        client.log_text(run_id, "".join(f"{digest}\n" for digest in trained_on), TRAINED_ON_ARTIFACT)
        client.set_tag(run_id, TRAINED_ON_TAG, TRAINED_ON_ARTIFACT)
    return run_id, folder


def register(
    store, weights: bytes, error: float, test_sha256: str = TEST_SET, rescore=None, n: int = len(TRUTHS),
    trained_on: tuple[str, ...] | None = (), train_metrics: dict[str, float] | None = None, **tracking,
):  # fmt: skip
    run_id, folder = logged_run(
        store, weights, rows(error, n=n), test_sha256, trained_on=trained_on, train_metrics=train_metrics
    )
    cfg = TrackingConfig(registered_model=MODEL, **tracking)
    test = Provenance(test_sha256, "m", frozenset(trained_on) if trained_on is not None else None)
    return register_adapter(store[0], cfg, run_id, folder, "price", rows(error, n=n), test, rescore)


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, CHAMPION).version)


def test_the_champion_moves_only_for_a_shown_improvement(store):
    client = store[0]
    first = register(store, b"one", 300.0)  # far better than the base model zero-shot
    assert first["version"] == "1" and first["promoted"] and champion_version(client) == "1"
    assert "the base model zero-shot (no champion yet)" in first["reason"]

    better = register(store, b"two", 200.0)
    assert better["version"] == "2" and better["promoted"] and champion_version(client) == "2"
    c = better["comparison"]
    assert c["against"] == "champion v1" and c["improvement"] == pytest.approx(100.0)
    assert c["n_items"] == 60 and c["interval_low"] > 0 and c["confidence"] == 0.95

    version = client.get_model_version(MODEL, "2")
    assert version.tags["promotion.metric"] == "avg_error" and version.tags["promotion.n_items"] == "60"
    assert version.tags[PER_ITEM_TAG] == PER_ITEM_ARTIFACT and version.description == better["reason"]
    run_tags = client.get_run(version.run_id).data.tags
    assert run_tags["promotion.alias"] == CHAMPION and run_tags["registry.version"] == "2"
    assert run_tags["promotion.interval"].startswith("[") and run_tags["promotion.reason"] == better["reason"]


def test_a_worse_adapter_is_a_challenger_and_the_champion_is_untouched(store):
    client = store[0]
    register(store, b"one", 300.0)
    before = client.get_model_version(MODEL, "1")
    worse = register(store, b"two", 400.0)
    assert worse["alias"] == CHALLENGER and "worse by $100" in worse["reason"] and champion_version(client) == "1"
    after = client.get_model_version(MODEL, "1")
    assert after.tags == before.tags and after.description == before.description  # nothing rewritten


def test_the_margin_applies_to_the_whole_interval(store):
    register(store, b"one", 300.0)
    small = register(store, b"two", 290.0, min_improvement=50.0)
    assert small["alias"] == CHALLENGER and "tracking.min_improvement=$50" in small["reason"]


def test_the_same_adapter_bytes_are_not_registered_twice(store):
    register(store, b"same", 300.0)
    again = register(store, b"same", 300.0)
    assert again["new_version"] is False and again["version"] == "1"
    assert "same adapter as version 1 (champion)" in again["reason"]
    assert len(store[0].search_model_versions(f"name = '{MODEL}'")) == 1


def steps(n: int, tokens: int, legacy: bool = False) -> dict[str, float]:
    """A run's train metrics as record_run logs metrics/train.json (`legacy`: as runs before the sections did)."""
    sep = "." if legacy else "/"
    return {f"train{sep}steps": n, f"train{sep}tokens_seen": tokens}


def test_a_candidate_that_trained_less_than_the_champion_is_said_to_wherever_the_reason_goes(store):
    client = store[0]
    register(store, b"one", 300.0, train_metrics=steps(150, 22_500))
    short = register(store, b"two", 400.0, train_metrics=steps(60, 9_000))
    clause = "; the candidate trained 60 steps (9,000 tokens) against champion v1's 150 steps (22,500 tokens)"
    assert short["alias"] == CHALLENGER and short["reason"].endswith(f"not better{clause}")
    assert short["trained"] == {
        "candidate": {"steps": 60, "tokens": 9000}, "champion": {"steps": 150, "tokens": 22500},
        "against": "champion v1",
    }  # fmt: skip
    version = client.get_model_version(MODEL, "2")
    assert version.description == short["reason"] and version.tags["promotion.reason"] == short["reason"]
    assert client.get_run(version.run_id).data.tags["promotion.reason"] == short["reason"]

    same = register(store, b"three", 400.0, train_metrics=steps(150, 22_500))  # as much: nothing said
    longer = register(store, b"four", 400.0, train_metrics=steps(300, 45_000))
    assert "trained" not in same["reason"] and "trained" not in longer["reason"]


def test_a_champion_whose_run_logged_no_budget_is_not_compared_by_budget(store):
    register(store, b"one", 300.0)  # a run recorded without train metrics
    short = register(store, b"two", 400.0, train_metrics=steps(60, 9_000))
    assert "the candidate trained" not in short["reason"]
    assert short["trained"]["champion"] is None and short["trained"]["candidate"] == {"steps": 60, "tokens": 9000}


def test_a_champion_recorded_with_the_old_metric_names_has_its_budget_read(store):
    register(store, b"one", 300.0, train_metrics=steps(150, 22_500, legacy=True))
    short = register(store, b"two", 400.0, train_metrics=steps(60, 9_000))
    assert "against champion v1's 150 steps (22,500 tokens)" in short["reason"]


def test_a_champion_without_a_training_record_from_another_test_set_keeps_its_alias(store):
    register(store, b"old", 300.0, test_sha256="b" * 64, trained_on=None)
    new = register(store, b"new", 10.0)
    assert new["alias"] == CHALLENGER and "another test set" in new["reason"]
    assert champion_version(store[0]) == "1"


def test_a_test_set_that_grew_is_compared_on_shared_items_then_by_rescoring_the_champion(store):
    client = store[0]
    register(store, b"one", 300.0)  # scored on 60 items
    shared = register(store, b"two", 200.0, test_sha256="b" * 64, n=64)  # 60 of 64 >= 0.9
    assert shared["promoted"] and "on the 60 items both were scored on" in shared["reason"]
    asked = []

    def rescore(run_id):
        asked.append(run_id)
        return rows(200.0, n=80)

    grown = register(store, b"three", 100.0, test_sha256="c" * 64, n=80, rescore=rescore)  # 64 of 80 < 0.9
    assert asked == [client.get_model_version(MODEL, "2").run_id]
    assert grown["promoted"] and "on the current 80 items, champion v2 re-scored" in grown["reason"]
    tags = client.get_run(client.get_model_version(MODEL, "3").run_id).data.tags
    assert tags["registry.champion_after"] == "3" and tags["promotion.basis"].startswith("on the current 80")
    assert grown["primary"]["metric"] == "avg_error" and grown["primary"]["low"] <= grown["primary"]["value"]


def test_items_the_champion_trained_on_are_left_out(store):
    register(store, b"one", 300.0, trained_on=("k60", "k61", "k62"))  # then (membership changed) test items
    new = register(store, b"two", 200.0, test_sha256="b" * 64, n=63)
    assert new["comparison"]["n_items"] == 60 and "(3 it trained on left out)" in new["reason"]


def old_style_champion(store, legacy_rows: list[dict] | None) -> None:
    """A champion registered before per-item results were tagged: rows (if any) at the run's root."""
    client = store[0]
    run_id, _ = logged_run(store, b"old", legacy_rows, TEST_SET, where=LEGACY_PER_ITEM_ARTIFACT, trained_on=None)
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=f"runs:/{run_id}/adapter", run_id=run_id)
    client.set_registered_model_alias(MODEL, CHAMPION, version.version)


def test_an_old_champion_with_predictions_at_the_run_root_is_compared_from_them(store):
    old_style_champion(store, rows(300.0))
    new = register(store, b"new", 100.0)
    assert new["promoted"] and new["comparison"]["against"] == "champion v1"


def test_an_old_champion_without_per_item_results_is_rescored_or_not_compared(store):
    old_style_champion(store, None)
    asked = []
    unable = register(store, b"new", 100.0, rescore=lambda run_id: asked.append(run_id))
    assert unable["alias"] == CHALLENGER and champion_version(store[0]) == "1" and len(asked) == 1
    assert "champion v1 cannot be compared item by item (no per-item results logged with it" in unable["reason"]
    assert "re-scoring it needs the base model and the test split here" in unable["reason"]

    rescored = register(store, b"newer", 100.0, rescore=lambda run_id: rows(300.0))
    assert rescored["promoted"] and rescored["comparison"]["against"] == "champion v1"
    versions = store[0].search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 3 and not store[0].get_model_version(MODEL, "1").tags  # the old one is as it was


def test_the_champion_loads_back_from_its_models_uri(store, tmp_path, monkeypatch):
    import mlflow

    register(store, b"weights", 300.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0].tracking_uri)  # as the README's recipe; no global left set
    folder = mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "back"))
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert folder.endswith("back")


@pytest.mark.parametrize(
    ("tracking", "named"),
    [
        ({"primary_metric": "rmse"}, r"tracking\.primary_metric: expected one of \['auto', 'avg_error'"),
        ({"min_improvement": -1}, r"tracking\.min_improvement"),
        ({"confidence": 1.0}, r"tracking\.confidence: expected a number above 0\.5 and below 1"),
        ({"bootstrap_samples": 10}, r"tracking\.bootstrap_samples"),
    ],
)
def test_gate_settings_are_checked_at_load(tracking, named):
    with pytest.raises(ConfigError, match=named):
        params_from_dict({"tracking": tracking})


def test_a_metric_that_does_not_score_the_data_shape_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"tracking\.primary_metric: 'hit_rate' does not score chat data"):
        params_from_dict({"data": {"shape": "chat"}, "tracking": {"primary_metric": "hit_rate"}})
