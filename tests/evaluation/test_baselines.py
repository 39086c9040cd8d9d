"""The baselines: the TF-IDF regression learns prices from words, deterministically."""

from stages.common.metrics import price_metrics
from stages.evaluation.baselines import mean_price, tfidf_ridge
from tests.conftest import price_rows


def test_tfidf_ridge_beats_the_mean_price_on_prices_that_follow_the_words():
    rows = price_rows(400, seed=3)  # the price grows with the size written in the text
    train, test = rows[:300], rows[300:]
    truths = [r["price"] for r in test]
    regression = price_metrics(truths, tfidf_ridge(train, test))
    constant = price_metrics(truths, [mean_price(train)] * len(test))
    assert regression["avg_error"] < 0.7 * constant["avg_error"]
    assert tfidf_ridge(train, test) == tfidf_ridge(train, test)  # no sampling: the same prices every time
    assert all(p >= 0 for p in tfidf_ridge(train, test))
