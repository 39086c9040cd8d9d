"""The promotion rule as a pure function: a paired bootstrap interval of the improvement decides."""

import math
import random

import numpy as np
import pytest

from stages.common.config import PRIMARY_METRICS, TrackingConfig
from stages.common.metrics import price_metrics, text_metrics
from stages.tracking.gate import CHALLENGER, CHAMPION, METRICS, Champion, Gate, Items, decide, metric_on

TEST_SET = "a" * 64
N = 200


def prices(errors: list[float], seed: int = 0) -> Items:
    """Items whose predictions miss their truths by `errors` (truths between $500 and $5,000)."""
    rng = random.Random(seed)
    truths = [rng.uniform(500, 5000) for _ in errors]
    return Items(
        keys=tuple(f"item {i}" for i in range(len(errors))),
        truth=tuple(truths),
        prediction=tuple(t + e for t, e in zip(truths, errors, strict=True)),
    )


def noisy_errors(scale: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0, scale) for _ in range(N)]


def champion(items: Items | None, test_sha256: str = TEST_SET, missing: str = "") -> Champion:
    return Champion(version="3", test_sha256=test_sha256, items=items, missing=missing)


AVG = Gate("avg_error", greater_is_better=False, min_improvement=0.0, confidence=0.95, samples=2000)


def test_a_clear_improvement_is_promoted_with_its_interval_in_words():
    old = prices([e + 300 for e in noisy_errors(50, 1)])
    new = prices(noisy_errors(50, 1))  # same items, $300 closer on every one
    decision = decide(AVG, new, champion(old), base=None, test_sha256=TEST_SET)
    assert decision.alias == CHAMPION and decision.promoted
    c = decision.comparison
    assert c.n_items == N and c.low > 250 and c.high > c.low and c.confidence == 0.95
    assert "avg_error" in decision.reason and "for champion v3: better by $" in decision.reason
    assert f"over {N} items: shown at 95%" in decision.reason


def test_a_small_improvement_on_noisy_items_is_not_promoted():
    rng = random.Random(7)
    old_errors = [rng.uniform(1000, 2000) for _ in range(N)]
    new_errors = [e + rng.gauss(-10, 300) for e in old_errors]  # $10 better on average, item noise $300
    decision = decide(AVG, prices(new_errors), champion(prices(old_errors)), base=None, test_sha256=TEST_SET)
    c = decision.comparison
    assert decision.alias == CHALLENGER and c.low < 0 < c.high
    assert decision.reason.endswith("not shown at 95%") or decision.reason.endswith("not better")


def test_identical_results_are_not_promoted():
    same = prices(noisy_errors(100, 2))
    decision = decide(AVG, same, champion(same), base=None, test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER and f"equal on all {N} items, not better" in decision.reason


def test_the_margin_must_be_cleared_by_the_whole_interval():
    old = prices([e + 60 for e in noisy_errors(10, 3)])
    new = prices(noisy_errors(10, 3))  # $60 better, tightly
    strict = Gate("avg_error", False, min_improvement=100.0)
    decision = decide(strict, new, champion(old), base=None, test_sha256=TEST_SET)
    assert decision.alias == CHALLENGER and "not surely by more than tracking.min_improvement=$100" in decision.reason
    assert decide(Gate("avg_error", False, min_improvement=40.0), new, champion(old), None, TEST_SET).promoted


def test_greater_is_better_metrics_flip_the_direction():
    truths = [100.0] * N
    hits = Items(keys=tuple(map(str, range(N))), truth=tuple(truths), prediction=tuple([105.0] * N))
    misses = Items(keys=hits.keys, truth=tuple(truths), prediction=tuple([300.0] * N))
    hit_rate = Gate("hit_rate", greater_is_better=True)
    assert decide(hit_rate, hits, champion(misses), None, TEST_SET).promoted
    worse = decide(hit_rate, misses, champion(hits), None, TEST_SET)
    assert not worse.promoted and "worse by 100.0 pp" in worse.reason


def test_with_no_champion_the_base_model_zero_shot_is_the_bar():
    base = prices([2000.0] * N)
    assert decide(AVG, prices(noisy_errors(50, 4)), None, base, TEST_SET).promoted
    decision = decide(AVG, prices(noisy_errors(50, 4)), None, None, TEST_SET)
    assert decision.alias == CHALLENGER and "no champion yet" in decision.reason


def test_nan_or_missing_per_item_results_are_never_promoted():
    good = prices(noisy_errors(50, 5))
    nan = Items(keys=good.keys, truth=good.truth, prediction=(math.nan, *good.prediction[1:]))
    assert "NaN" in decide(AVG, nan, champion(good), None, TEST_SET).reason
    missing = decide(AVG, good, champion(None, missing="no per-item results logged with it"), None, TEST_SET)
    assert missing.alias == CHALLENGER and "cannot be compared item by item (no per-item results" in missing.reason
    empty = decide(AVG, Items(keys=()), champion(good), None, TEST_SET)
    assert empty.alias == CHALLENGER and "nothing to compare" in empty.reason


def test_a_champion_scored_on_another_test_set_or_other_items_is_not_compared():
    good = prices(noisy_errors(50, 6))
    other = decide(AVG, good, champion(prices([1e6] * N), test_sha256="b" * 64), None, TEST_SET)
    assert other.alias == CHALLENGER and "another test set" in other.reason and other.comparison is None
    shuffled = Items(keys=tuple(reversed(good.keys)), truth=good.truth, prediction=good.prediction)
    assert "other test items" in decide(AVG, good, champion(shuffled), None, TEST_SET).reason


def test_the_decision_is_the_same_every_time():
    rng = random.Random(8)
    old, new = [abs(rng.gauss(0, 500)) for _ in range(N)], [abs(rng.gauss(0, 480)) for _ in range(N)]
    first = decide(AVG, prices(new), champion(prices(old)), None, TEST_SET)
    assert decide(AVG, prices(new), champion(prices(old)), None, TEST_SET) == first


def text_items(losses: list[float], tokens: list[int], exact: list[bool]) -> Items:
    return Items(keys=tuple(map(str, range(len(losses)))), loss=tuple(losses), tokens=tuple(tokens), exact=tuple(exact))


def test_every_metric_on_the_whole_set_equals_what_evaluation_reports():
    rng = random.Random(9)
    items = prices([rng.gauss(0, 300) * (i % 3) for i in range(N)])
    whole = [list(range(N))]
    expected = price_metrics(list(items.truth), list(items.prediction))
    for metric in ("avg_error", "rmsle", "hit_rate", "mse", "r2"):
        assert metric_on(metric, items, np.array(whole))[0] == pytest.approx(expected[metric])
    losses, tokens = [rng.uniform(0.1, 3) for _ in range(N)], [rng.randint(1, 9) for _ in range(N)]
    exact = [rng.random() < 0.3 for _ in range(N)]
    text = text_items(losses, tokens, exact)
    outputs = ["a" if e else "b" for e in exact]
    reported = text_metrics([(loss * t, t) for loss, t in zip(losses, tokens, strict=True)], outputs, ["a"] * N)
    for metric in ("loss", "perplexity", "exact_match"):
        assert metric_on(metric, text, np.array(whole))[0] == pytest.approx(reported[metric])


def test_text_loss_is_compared_token_weighted():
    better = text_items([0.5] * N, [4] * N, [False] * N)
    worse = text_items([1.5] * N, [4] * N, [False] * N)
    gate = Gate("loss", greater_is_better=False)
    decision = decide(gate, better, champion(worse), None, TEST_SET)
    assert decision.promoted and decision.comparison.improvement == pytest.approx(1.0)


def test_every_metric_params_allow_has_a_computation_and_a_direction():
    assert set(METRICS) == set(PRIMARY_METRICS)
    cfg = TrackingConfig(primary_metric="auto", min_improvement=2.0, confidence=0.9, bootstrap_samples=500)
    assert Gate.from_params(cfg, "price") == Gate("avg_error", False, 2.0, 0.9, 500)
    assert Gate.from_params(cfg, "chat") == Gate("loss", False, 2.0, 0.9, 500)
    assert Gate.from_params(TrackingConfig(primary_metric="exact_match"), "chat").greater_is_better


def test_items_are_read_from_the_rows_evaluation_writes():
    price_rows = [{"text": "a", "truth": 10.0, "adapter_prediction": None, "base_prediction": 3.0}]
    assert Items.from_rows(price_rows, "adapter").prediction == (None,)
    assert Items.from_rows(price_rows, "base_zero_shot").prediction == (3.0,)
    text_rows = [{"prompt": "p", "adapter_loss": 1.0, "adapter_exact": True}]  # no completion_tokens: old rows
    with pytest.raises(KeyError, match="completion_tokens"):
        Items.from_rows(text_rows, "adapter")
