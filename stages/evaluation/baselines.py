"""Baselines a skeptic asks for, fit on the train split and scored on the same test items as the adapter.

- `mean_price`: every item priced at the mean training price (the course's constant baseline).
- `tfidf_ridge`: the course's earlier week, a classic regression on the words of the description: TF-IDF
  features of word unigrams and bigrams (single characters kept, since "colour E" is a word here) and a
  ridge regression fit on log(1 + price), so errors on cheap and dear items weigh alike, as RMSLE weighs
  them; predictions are exp back to dollars. Deterministic: no sampling anywhere.
They are rows of the comparison table, never promotion candidates (the gate reads the adapter's row only).
"""

from __future__ import annotations

RIDGE_ALPHA = 1.0  # scikit-learn's default; the point is a simple, untuned regressor


def mean_price(train: list[dict]) -> float:
    return sum(r["price"] for r in train) / len(train)


def tfidf_ridge(train: list[dict], test: list[dict]) -> list[float]:
    """Prices of `test` rows predicted by a ridge regression on TF-IDF features of the train rows' text."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    features = vectorizer.fit_transform([r["text"] for r in train])
    model = Ridge(alpha=RIDGE_ALPHA).fit(features, np.log1p([r["price"] for r in train]))
    predicted = np.expm1(model.predict(vectorizer.transform([r["text"] for r in test])))
    return [float(max(p, 0.0)) for p in predicted]
