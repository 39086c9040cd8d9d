"""The promotion rule as a pure function: a paired bootstrap interval of the improvement decides."""

import math
import random

import numpy as np
import pytest

from stages.common.config import PRIMARY_METRICS, TrackingConfig
from stages.common.metrics import price_metrics, text_metrics
from stages.common.rows import key_digest
from stages.tracking.gate import (
    CHALLENGER,
    CHAMPION,
    METRICS,
    Budget,
    Champion,
    Gate,
    Items,
    Provenance,
    decide,
    metric_interval,
    metric_on,
    needs_rescore,
    trained_less,
)

TEST_SET = "a" * 64
N = 200
CURRENT = Provenance(TEST_SET, "m", trained_on=frozenset())  # what the candidates below were scored and trained on


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


def champion(
    items: Items | None, test_sha256: str = TEST_SET, missing: str = "", trained_on=frozenset(), rescored=False
) -> Champion:
    """Champion v3 scored on `items`; `trained_on` None: a run recorded before runs listed their training rows."""
    return Champion("3", Provenance(test_sha256, "m", trained_on), items, missing, rescored=rescored)


AVG = Gate("avg_error", greater_is_better=False, min_improvement=0.0, confidence=0.95, samples=2000)


def test_a_clear_improvement_is_promoted_with_its_interval_in_words():
    old = prices([e + 300 for e in noisy_errors(50, 1)])
    new = prices(noisy_errors(50, 1))  # same items, $300 closer on every one
    decision = decide(AVG, new, champion(old), base=None, test=CURRENT)
    assert decision.alias == CHAMPION and decision.promoted
    c = decision.comparison
    assert c.n_items == N and c.low > 250 and c.high > c.low and c.confidence == 0.95
    assert "avg_error" in decision.reason and "for champion v3: better by $" in decision.reason
    assert f"on the {N} items both were scored on: shown at 95%" in decision.reason


def test_a_small_improvement_on_noisy_items_is_not_promoted():
    rng = random.Random(7)
    old_errors = [rng.uniform(1000, 2000) for _ in range(N)]
    new_errors = [e + rng.gauss(-10, 300) for e in old_errors]  # $10 better on average, item noise $300
    decision = decide(AVG, prices(new_errors), champion(prices(old_errors)), base=None, test=CURRENT)
    c = decision.comparison
    assert decision.alias == CHALLENGER and c.low < 0 < c.high
    assert decision.reason.endswith("not shown at 95%") or decision.reason.endswith("not better")


def test_identical_results_are_not_promoted():
    same = prices(noisy_errors(100, 2))
    decision = decide(AVG, same, champion(same), base=None, test=CURRENT)
    assert decision.alias == CHALLENGER and f"equal on the {N} items both were scored on, not better" in decision.reason


def test_the_margin_must_be_cleared_by_the_whole_interval():
    old = prices([e + 60 for e in noisy_errors(10, 3)])
    new = prices(noisy_errors(10, 3))  # $60 better, tightly
    strict = Gate("avg_error", False, min_improvement=100.0)
    decision = decide(strict, new, champion(old), base=None, test=CURRENT)
    assert decision.alias == CHALLENGER and "not surely by more than tracking.min_improvement=$100" in decision.reason
    assert decide(Gate("avg_error", False, min_improvement=40.0), new, champion(old), None, CURRENT).promoted


def test_greater_is_better_metrics_flip_the_direction():
    truths = [100.0] * N
    hits = Items(keys=tuple(map(str, range(N))), truth=tuple(truths), prediction=tuple([105.0] * N))
    misses = Items(keys=hits.keys, truth=tuple(truths), prediction=tuple([300.0] * N))
    hit_rate = Gate("hit_rate", greater_is_better=True)
    assert decide(hit_rate, hits, champion(misses), None, CURRENT).promoted
    worse = decide(hit_rate, misses, champion(hits), None, CURRENT)
    assert not worse.promoted and "worse by 100.0 pp" in worse.reason


def test_with_no_champion_the_base_model_zero_shot_is_the_bar():
    base = prices([2000.0] * N)
    assert decide(AVG, prices(noisy_errors(50, 4)), None, base, CURRENT).promoted
    decision = decide(AVG, prices(noisy_errors(50, 4)), None, None, CURRENT)
    assert decision.alias == CHALLENGER and "no champion yet" in decision.reason


def test_nan_or_missing_per_item_results_are_never_promoted():
    good = prices(noisy_errors(50, 5))
    nan = Items(keys=good.keys, truth=good.truth, prediction=(math.nan, *good.prediction[1:]))
    assert "NaN" in decide(AVG, nan, champion(good), None, CURRENT).reason
    missing = decide(AVG, good, champion(None, missing="no per-item results logged with it"), None, CURRENT)
    assert missing.alias == CHALLENGER and "cannot be compared item by item (no per-item results" in missing.reason
    empty = decide(AVG, Items(keys=()), champion(good), None, CURRENT)
    assert empty.alias == CHALLENGER and "nothing to compare" in empty.reason


def test_items_are_paired_by_key_in_any_order():
    old, new = prices([e + 300 for e in noisy_errors(50, 6)]), prices(noisy_errors(50, 6))
    order = list(range(N))
    random.Random(1).shuffle(order)
    shuffled = old.subset([old.keys[i] for i in order])
    assert shuffled.keys != old.keys
    in_order, any_order = (
        decide(AVG, new, champion(old), None, CURRENT),
        decide(AVG, new, champion(shuffled), None, CURRENT),
    )
    assert any_order.promoted and any_order == in_order


def grown(items: Items, extra: int, seed: int = 11) -> Items:
    """`items` and `extra` new ones after them (a test set that grew with new data)."""
    more = prices(noisy_errors(50, seed)[:extra], seed)
    keys = tuple(f"new {i}" for i in range(extra))
    return Items(items.keys + keys, items.truth + more.truth, items.prediction + more.prediction)


def test_a_champion_scored_on_fewer_items_is_compared_on_the_items_both_have():
    old = prices([e + 300 for e in noisy_errors(50, 3)])
    new = grown(prices(noisy_errors(50, 3)), 20)  # 220 items, the champion has results for 200 of them
    other_test = Provenance("b" * 64, "m", frozenset())
    assert needs_rescore(AVG, new, champion(old), other_test) is None  # 200 / 220 >= min_shared 0.9
    decision = decide(AVG, new, champion(old), None, other_test)
    assert decision.promoted and decision.comparison.n_items == N
    assert f"on the {N} items both were scored on" in decision.reason


def test_too_few_shared_items_ask_for_a_rescore_then_compare_on_the_current_items():
    old, new = prices([e + 300 for e in noisy_errors(50, 4)]), grown(prices(noisy_errors(50, 4)), 60)
    why = needs_rescore(AVG, new, champion(old), CURRENT)
    assert why and "only 200 of the 260 current test items" in why and "tracking.min_shared=0.9" in why
    refused = decide(AVG, new, champion(old), None, CURRENT)
    assert refused.alias == CHALLENGER and refused.comparison is None and "so no promotion" in refused.reason
    rescored = champion(grown(old, 60, seed=12), rescored=True)
    decision = decide(AVG, new, rescored, None, CURRENT)
    assert needs_rescore(AVG, new, rescored, CURRENT) is None
    assert decision.comparison.n_items == 260 and "on the current 260 items, champion v3 re-scored" in decision.reason


def test_no_item_either_model_trained_on_is_compared():
    old, new = prices([e + 300 for e in noisy_errors(50, 5)]), prices(noisy_errors(50, 5))
    leaked = decide(AVG, new, champion(old), None, Provenance(TEST_SET, "m", frozenset(new.keys[:3])))
    assert leaked.alias == CHALLENGER and "3 of the candidate's 200 test items are in its own training" in leaked.reason
    saw_some = decide(AVG, new, champion(old, trained_on=frozenset(new.keys[:10])), None, CURRENT)
    assert saw_some.comparison.n_items == N - 10 and "(10 it trained on left out)" in saw_some.reason
    saw_many = decide(AVG, new, champion(old, trained_on=frozenset(new.keys[:50])), None, CURRENT)
    assert saw_many.alias == CHALLENGER and "50 it trained on" in saw_many.reason


def test_a_champion_without_a_training_record_is_compared_only_on_its_own_test_set():
    good = prices(noisy_errors(50, 6))
    other = decide(AVG, good, champion(prices([1e6] * N), test_sha256="b" * 64, trained_on=None), None, CURRENT)
    assert other.alias == CHALLENGER and "another test set" in other.reason and other.comparison is None
    assert needs_rescore(AVG, good, champion(prices([1e6] * N), test_sha256="b" * 64, trained_on=None), CURRENT) is None
    same = decide(AVG, good, champion(prices([e + 300 for e in noisy_errors(50, 6)]), trained_on=None), None, CURRENT)
    assert same.promoted


def test_the_primary_metric_comes_with_its_interval():
    items = prices(noisy_errors(50, 7))
    found = metric_interval(AVG, items)
    assert found["low"] < found["value"] < found["high"]
    assert found["value"] == pytest.approx(price_metrics(list(items.truth), list(items.prediction))["avg_error"])


def test_the_decision_is_the_same_every_time():
    rng = random.Random(8)
    old, new = [abs(rng.gauss(0, 500)) for _ in range(N)], [abs(rng.gauss(0, 480)) for _ in range(N)]
    first = decide(AVG, prices(new), champion(prices(old)), None, CURRENT)
    assert decide(AVG, prices(new), champion(prices(old)), None, CURRENT) == first


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
    decision = decide(gate, better, champion(worse), None, CURRENT)
    assert decision.promoted and decision.comparison.improvement == pytest.approx(1.0)


def test_every_metric_params_allow_has_a_computation_and_a_direction():
    assert set(METRICS) == set(PRIMARY_METRICS)
    cfg = TrackingConfig(primary_metric="auto", min_improvement=2.0, confidence=0.9, bootstrap_samples=500)
    assert Gate.from_params(cfg, "price") == Gate("avg_error", False, 2.0, 0.9, 500, min_shared=0.9)
    assert Gate.from_params(cfg, "chat") == Gate("loss", False, 2.0, 0.9, 500, min_shared=0.9)
    assert Gate.from_params(TrackingConfig(primary_metric="exact_match"), "chat").greater_is_better


def test_items_are_read_from_the_rows_evaluation_writes():
    price_rows = [{"text": "a", "truth": 10.0, "adapter_prediction": None, "base_prediction": 3.0}]
    assert Items.from_rows(price_rows, "adapter").prediction == (None,)
    assert Items.from_rows(price_rows, "adapter").keys == (key_digest("a"),)  # rows written before "key"
    assert Items.from_rows([{**price_rows[0], "key": "k1"}], "adapter").keys == ("k1",)
    assert Items.from_rows(price_rows, "base_zero_shot").prediction == (3.0,)
    text_rows = [{"prompt": "p", "adapter_loss": 1.0, "adapter_exact": True}]  # no completion_tokens: old rows
    with pytest.raises(KeyError, match="completion_tokens"):
        Items.from_rows(text_rows, "adapter")


CHAMPION_BUDGET = Budget(steps=150, tokens=22_500)  # what `make demo`'s champion trained


def trained(budget: Budget | None) -> Champion:
    """Champion v3 that trained `budget` (None: a version whose run did not log it)."""
    return Champion("3", CURRENT, None, budget=budget)


def test_a_candidate_that_trained_less_is_said_to_with_both_budgets():
    clause = trained_less(Budget(60, 9_000), trained(CHAMPION_BUDGET))
    assert clause == "; the candidate trained 60 steps (9,000 tokens) against champion v3's 150 steps (22,500 tokens)"
    fewer_tokens = trained_less(Budget(150, 20_000), trained(CHAMPION_BUDGET))  # as many steps, fewer tokens
    assert fewer_tokens == (
        "; the candidate trained 150 steps (20,000 tokens) against champion v3's 150 steps (22,500 tokens)"
    )
    labelled = Champion("3", CURRENT, None, label="the champion", budget=CHAMPION_BUDGET)
    assert "against the champion's 150 steps (22,500 tokens)" in trained_less(Budget(60, 9_000), labelled)


def test_the_same_or_a_larger_budget_says_nothing():
    assert trained_less(CHAMPION_BUDGET, trained(CHAMPION_BUDGET)) == ""
    assert trained_less(Budget(300, 45_000), trained(CHAMPION_BUDGET)) == ""


def test_an_unknown_budget_says_nothing():
    assert trained_less(Budget(60, 9_000), trained(None)) == ""  # an old version: its run did not log it
    assert trained_less(Budget(60, 9_000), None) == ""  # no champion: the base model zero-shot is the bar
    assert trained_less(None, trained(CHAMPION_BUDGET)) == ""
    assert trained_less(Budget(), trained(CHAMPION_BUDGET)) == ""


def test_only_what_both_runs_logged_is_compared():
    assert trained_less(Budget(60, None), trained(CHAMPION_BUDGET)) == (
        "; the candidate trained 60 steps against champion v3's 150 steps"
    )
    assert trained_less(Budget(None, 9_000), trained(Budget(150, 22_500))) == (
        "; the candidate trained 9,000 tokens against champion v3's 22,500 tokens"
    )
    assert trained_less(Budget(60, 30_000), trained(Budget(None, 22_500))) == ""  # more tokens; steps unknown
