"""The promotion gate as a rule, and applied to a real MLflow registry in a temporary SQLite store."""

import json
import math

import pytest

from stages.common.config import TrackingConfig, params_from_dict
from stages.common.errors import ConfigError
from stages.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    TEST_HASH_TAG,
    Champion,
    Gate,
    decide,
    register_adapter,
)

LOWER = Gate("avg_error", greater_is_better=False, min_improvement=5.0)
TEST_SET = "a" * 64


def champion(value, test_sha256=TEST_SET):
    return Champion(version="3", value=value, test_sha256=test_sha256)


def test_better_than_the_champion_by_more_than_the_margin_is_promoted():
    decision = decide(LOWER, 80.0, base=400.0, champion=champion(100.0), test_sha256=TEST_SET)
    assert decision.alias == CHAMPION and decision.promoted
    assert "avg_error 80 vs 100 for champion v3: better by 20" in decision.reason


def test_worse_than_the_champion_is_a_challenger():
    decision = decide(LOWER, 120.0, base=400.0, champion=champion(100.0), test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER and not decision.promoted
    assert "worse by 20" in decision.reason


def test_equal_to_the_champion_is_a_challenger():
    decision = decide(LOWER, 100.0, base=400.0, champion=champion(100.0), test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER and "equal, not better" in decision.reason


def test_better_within_the_margin_is_a_challenger():
    decision = decide(LOWER, 97.0, base=400.0, champion=champion(100.0), test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER
    assert "better by only 3, not more than tracking.min_improvement=5" in decision.reason


def test_with_no_champion_the_base_model_is_the_bar():
    assert decide(LOWER, 300.0, base=400.0, champion=None, test_sha256=TEST_SET).alias == CHAMPION
    worse = decide(LOWER, 500.0, base=400.0, champion=None, test_sha256=TEST_SET)
    assert worse.alias == CHALLENGER and "the base model zero-shot (no champion yet)" in worse.reason


def test_a_champion_scored_on_another_test_set_is_not_compared():
    decision = decide(LOWER, 1.0, base=400.0, champion=champion(100.0, test_sha256="b" * 64), test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER
    assert "another test set" in decision.reason and "no comparison possible" in decision.reason
    assert decision.reference == 100.0


def test_greater_is_better_flips_the_direction():
    hit_rate = Gate("hit_rate", greater_is_better=True, min_improvement=0.0)
    assert decide(hit_rate, 0.6, base=0.1, champion=champion(0.5), test_sha256=TEST_SET).promoted
    assert not decide(hit_rate, 0.4, base=0.1, champion=champion(0.5), test_sha256=TEST_SET).promoted


def test_a_missing_metric_is_never_promoted():
    decision = decide(LOWER, math.nan, base=400.0, champion=None, test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER and "nothing to compare" in decision.reason


def test_auto_metric_follows_the_shape_of_the_data():
    auto = TrackingConfig(primary_metric="auto", greater_is_better=True, min_improvement=1.0)
    assert Gate.from_params(auto, {"adapter": {}}) == Gate("avg_error", False, 1.0)
    assert Gate.from_params(auto, {"shape": "chat", "adapter": {}}) == Gate("loss", False, 1.0)
    explicit = TrackingConfig(primary_metric="hit_rate", greater_is_better=True)
    assert Gate.from_params(explicit, {"adapter": {}}) == Gate("hit_rate", True, 0.0)


def test_negative_margin_is_rejected():
    with pytest.raises(ConfigError, match=r"tracking\.min_improvement"):
        params_from_dict({"tracking": {"min_improvement": -1}})


# --- against a real registry -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, experiment, tmp_path


def logged_adapter(store, weights: bytes, avg_error: float, test_sha256: str = TEST_SET):
    """A run holding an adapter folder and its avg_error, as record_run leaves it."""
    client, experiment, tmp_path = store
    folder = tmp_path / f"adapter-{weights.hex()}"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    run = client.create_run(experiment, tags={TEST_HASH_TAG: test_sha256})
    client.log_artifacts(run.info.run_id, str(folder), "adapter")
    client.log_metric(run.info.run_id, "eval.adapter.avg_error", avg_error)
    evaluation = {"adapter": {"avg_error": avg_error}, "base_zero_shot": {"avg_error": 500.0}}
    return run.info.run_id, folder, evaluation


def register(store, weights: bytes, avg_error: float, test_sha256: str = TEST_SET, min_improvement: float = 0.0):
    client = store[0]
    run_id, folder, evaluation = logged_adapter(store, weights, avg_error, test_sha256)
    cfg = TrackingConfig(registered_model="price-adapter", min_improvement=min_improvement)
    return register_adapter(client, cfg, run_id, folder, evaluation, test_sha256)


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias("price-adapter", CHAMPION).version)


def test_registry_moves_the_champion_only_for_a_better_adapter(store):
    client = store[0]
    first = register(store, b"one", 300.0)
    assert first["version"] == "1" and first["promoted"] and champion_version(client) == "1"

    worse = register(store, b"two", 350.0)
    assert worse["version"] == "2" and worse["alias"] == CHALLENGER and champion_version(client) == "1"
    assert str(client.get_model_version_by_alias("price-adapter", CHALLENGER).version) == "2"

    better = register(store, b"three", 250.0)
    assert better["promoted"] and champion_version(client) == "3"
    run_tags = client.get_run(client.get_model_version("price-adapter", "3").run_id).data.tags
    assert run_tags["promotion.alias"] == CHAMPION and run_tags["registry.version"] == "3"


def test_the_same_adapter_bytes_are_not_registered_twice(store):
    register(store, b"same", 300.0)
    again = register(store, b"same", 300.0)
    assert again["new_version"] is False and again["version"] == "1"
    assert "same adapter as version 1 (champion)" in again["reason"]
    assert len(store[0].search_model_versions("name = 'price-adapter'")) == 1


def test_a_champion_from_another_test_set_keeps_its_alias(store):
    register(store, b"old", 300.0, test_sha256="b" * 64)
    new = register(store, b"new", 10.0)
    assert new["alias"] == CHALLENGER and "another test set" in new["reason"]
    assert champion_version(store[0]) == "1"


def test_the_champion_loads_back_from_its_models_uri(store, tmp_path, monkeypatch):
    import mlflow

    register(store, b"weights", 300.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0].tracking_uri)  # as the README's recipe; no global left set
    folder = mlflow.artifacts.download_artifacts("models:/price-adapter@champion", dst_path=str(tmp_path / "back"))
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert folder.endswith("back")


def test_an_unknown_primary_metric_names_the_choices(store):
    client = store[0]
    run_id, folder, evaluation = logged_adapter(store, b"x", 1.0)
    with pytest.raises(KeyError, match=r"tracking.primary_metric='rmse'.*\['avg_error'\]"):
        register_adapter(client, TrackingConfig(primary_metric="rmse"), run_id, folder, evaluation, TEST_SET)
