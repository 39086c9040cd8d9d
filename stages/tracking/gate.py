"""The promotion rule: a new adapter becomes champion only when its improvement is shown, not when one number
happens to beat another.

Both adapters are scored on the same test items, so the comparison is paired: the improvement in the primary
metric is recomputed on `tracking.bootstrap_samples` resamples of the items (the same resampled items for
both), and the central `tracking.confidence` interval of those improvements must lie wholly above
`tracking.min_improvement`. That is a one-sided test at (1 + confidence) / 2. A paired bootstrap rather than a
permutation test, because it gives an interval in the metric's own units (dollars for avg_error), which is
what the margin is written in and what a person reads; and because it handles metrics that are not means
of per-item values (RMSLE is a root, R² a ratio, the text loss a token-weighted mean) by recomputing them
on each resample. The resamples are seeded, so the same results always give the same decision.

Items are paired by their key, never by position, and never compared on an item either model trained on:
each run records the key digests of its train and val rows (`Provenance.trained_on`). When the champion was
scored on another test set (rows added or removed since), it is compared on the items both were scored on
while they are at least `tracking.min_shared` of the candidate's; with fewer (the data grew a lot, or the
membership rule changed) the registry re-scores the champion from its logged model on the current test set
(`needs_rescore`) and it is compared on all of it it did not train on.

`decide(...)` is the rule, with no MLflow and no files: it takes per-item results (`Items`) of the candidate,
the champion (or, with none yet, the base model zero-shot) and returns a `Decision` whose `reason` says the
improvement, its interval, which items were compared and how, and the confidence in words ("avg_error 95.2
vs 120.1 for champion v3: better by $25 [-$12, $61] on the 212 items both were scored on: not shown at 95%").
A candidate that trained on less than the champion (fewer optimizer steps or tokens: a short sweep trial) is
judged by the same rule, but its reason says so (`trained_less`), since that alone can make it lose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.common.config import PRICE, PRIMARY_METRICS
from stages.common.metrics import GREEN, band
from stages.common.rows import key_digest, normalise

CHAMPION = "champion"
CHALLENGER = "challenger"
DOLLARS = ("avg_error",)
SHARES = ("hit_rate", "exact_match")
CHUNK = 250  # resamples computed at once: bounds memory for large test sets


@dataclass(frozen=True)
class Gate:
    """Which metric decides, in which direction, by how much and how surely a candidate must win."""

    metric: str
    greater_is_better: bool
    min_improvement: float = 0.0
    confidence: float = 0.95
    samples: int = 2000
    seed: int = 0
    min_shared: float = 0.9  # of the candidate's test items, to compare on without re-scoring the champion

    @classmethod
    def from_params(cls, cfg, shape: str) -> Gate:
        """The gate for params `tracking` (a TrackingConfig) on data of `shape`; `primary_metric: auto` is
        avg_error for prices and the test loss for prompt/completion and chat data."""
        metric = cfg.primary_metric
        if metric == "auto":
            metric = "avg_error" if shape == PRICE else "loss"
        return cls(
            metric, PRIMARY_METRICS[metric][1], cfg.min_improvement, cfg.confidence, cfg.bootstrap_samples,
            min_shared=cfg.min_shared,
        )  # fmt: skip

    def improvement(self, new, old):
        """How much `new` is better than `old` (negative when worse); works on arrays too."""
        return new - old if self.greater_is_better else old - new

    def amount(self, value: float) -> str:
        """`value` in the metric's units, for people: $41, 3.5 pp, 0.0123."""
        if self.metric in DOLLARS:
            return f"-${-value:,.0f}" if value < 0 else f"${value:,.0f}"
        if self.metric in SHARES:
            return f"{value * 100:.1f} pp"
        return f"{value:.4g}"


@dataclass(frozen=True)
class Items:
    """One model's per-item results on the test set, as evaluate_adapter writes them (eval/predictions.jsonl):
    for prices the truth and the parsed prediction (None when the output had no number, scored as $0); for
    text the mean loss per completion token, the completion's token count and whether the output matched."""

    keys: tuple[str, ...]  # each item's key digest (stages/common/rows.py): pairs the items of two models
    truth: tuple[float, ...] = ()
    prediction: tuple[float | None, ...] = ()
    loss: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()
    exact: tuple[bool, ...] = ()

    @classmethod
    def from_rows(cls, rows: list[dict], model: str) -> Items:
        """The items of `model` ("adapter", "base_zero_shot") from prediction rows; KeyError naming a missing
        field (rows written before the field existed)."""
        if rows and "truth" in rows[0]:
            field = "adapter_prediction" if model == "adapter" else "base_prediction"
            return cls(
                keys=tuple(item_key(r, "text") for r in rows),
                truth=tuple(float(r["truth"]) for r in rows),
                prediction=tuple(r[field] for r in rows),
            )
        return cls(
            keys=tuple(item_key(r, "prompt") for r in rows),
            loss=tuple(float(r[f"{model}_loss"]) for r in rows),
            tokens=tuple(int(r["completion_tokens"]) for r in rows),
            exact=tuple(bool(r[f"{model}_exact"]) for r in rows),
        )

    def subset(self, keys: list[str]) -> Items:
        """These items' results for `keys`, in that order."""
        where = {key: index for index, key in enumerate(self.keys)}
        pick = [where[key] for key in keys]

        def take(values: tuple) -> tuple:
            return tuple(values[i] for i in pick) if values else ()

        fields = ("truth", "prediction", "loss", "tokens", "exact")
        return Items(tuple(keys), *(take(getattr(self, name)) for name in fields))

    def problem(self, metric: str) -> str | None:
        """Why `metric` cannot be computed from these items, or None."""
        if not self.keys:
            return "no per-item results"
        needed = (self.truth, self.prediction) if metric in _PRICE_ARRAYS else (self.loss, self.tokens, self.exact)
        if any(len(values) != len(self.keys) for values in needed):
            return f"no per-item results for {metric}"
        numbers = [*self.truth, *(p for p in self.prediction if p is not None), *self.loss]
        if not all(math.isfinite(v) for v in numbers):
            return "a per-item result that is NaN or infinite"
        return None


def item_key(row: dict, text_field: str) -> str:
    """A prediction row's key digest; rows written before it was recorded use their text's (the same digest
    for prices and prompt/completion rows, whose key is the normalised text)."""
    return row.get("key") or key_digest(normalise(row[text_field]))


def _price_arrays(items: Items) -> dict:
    import numpy as np

    truth = np.asarray(items.truth, dtype=float)
    guess = np.asarray([max(p, 0.0) if p is not None else 0.0 for p in items.prediction], dtype=float)
    error = np.abs(guess - truth)
    return {
        "truth": truth,
        "error": error,
        "squared_log": (np.log1p(guess) - np.log1p(truth)) ** 2,
        "hit": np.asarray([band(t, p) == GREEN for t, p in zip(truth, guess, strict=True)], dtype=float),
    }


def _text_arrays(items: Items) -> dict:
    import numpy as np

    tokens = np.asarray(items.tokens, dtype=float)
    return {
        "tokens": tokens,
        "loss_sum": np.asarray(items.loss, dtype=float) * tokens,
        "exact": np.asarray(items.exact, dtype=float),
    }


def _r2(a: dict, idx):
    import numpy as np

    truth = a["truth"][idx]
    total = ((truth - truth.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
    residual = (a["error"][idx] ** 2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), 0.0)


def _text_loss(a: dict, idx):
    import numpy as np

    return a["loss_sum"][idx].sum(axis=-1) / np.maximum(a["tokens"][idx].sum(axis=-1), 1.0)


def _perplexity(a: dict, idx):
    import numpy as np

    return np.exp(np.minimum(_text_loss(a, idx), 700.0))  # exp overflows a float beyond ~709


# Each metric on resampled items: `idx` is an index array (resamples x items); the values match
# stages/common/metrics.py's price_metrics and text_metrics on the whole set (tests/tracking/test_gate.py).
_PRICE_ARRAYS = {
    "avg_error": lambda a, idx: a["error"][idx].mean(axis=-1),
    "rmsle": lambda a, idx: a["squared_log"][idx].mean(axis=-1) ** 0.5,
    "hit_rate": lambda a, idx: a["hit"][idx].mean(axis=-1),
    "mse": lambda a, idx: (a["error"][idx] ** 2).mean(axis=-1),
    "r2": _r2,
}
_TEXT_ARRAYS = {
    "loss": _text_loss,
    "perplexity": _perplexity,
    "exact_match": lambda a, idx: a["exact"][idx].mean(axis=-1),
}
METRICS = {**_PRICE_ARRAYS, **_TEXT_ARRAYS}


def metric_on(metric: str, items: Items, idx):
    """`metric` of `items` on each row of resampled indices `idx` (an array of shape resamples x items)."""
    arrays = _price_arrays(items) if metric in _PRICE_ARRAYS else _text_arrays(items)
    return METRICS[metric](arrays, idx)


@dataclass(frozen=True)
class Provenance:
    """What a model was scored and trained on: the test split's sha256, the fingerprint of the membership rule
    that chose it (stages/data/membership.py), and the key digests of the rows it trained on (train and val;
    None for a run recorded before runs logged them)."""

    sha256: str | None
    membership: str | None = None
    trained_on: frozenset[str] | None = None


@dataclass(frozen=True)
class Comparison:
    """The candidate against a reference on the same items: both values, the improvement, its interval, and
    which items were compared and how (`basis`, in words)."""

    metric: str
    against: str  # "champion v3" or "the base model zero-shot (no champion yet)"
    candidate: float
    reference: float
    improvement: float
    low: float
    high: float
    n_items: int
    confidence: float
    min_improvement: float
    basis: str = ""  # "on the 212 items both were scored on"; default "over <n_items> items"

    def record(self) -> dict:
        return {
            "metric": self.metric,
            "against": self.against,
            "candidate": self.candidate,
            "reference": self.reference,
            "improvement": self.improvement,
            "interval_low": self.low,
            "interval_high": self.high,
            "n_items": self.n_items,
            "confidence": self.confidence,
            "min_improvement": self.min_improvement,
            "basis": self.basis or f"over {self.n_items} items",
        }


def resamples(gate: Gate, n: int):
    """`gate.samples` seeded bootstrap resamples of n items, as index arrays of at most CHUNK rows each."""
    import numpy as np

    rng = np.random.default_rng(gate.seed)
    for start in range(0, gate.samples, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, gate.samples - start), n))


def central(gate: Gate, values: list) -> tuple[float, float]:
    """The central `gate.confidence` percentile interval of bootstrap values (arrays of chunks)."""
    import numpy as np

    tail = (1 - gate.confidence) / 2
    low, high = np.quantile(np.concatenate(values), [tail, 1 - tail])
    return float(low), float(high)


def paired_comparison(gate: Gate, candidate: Items, reference: Items, against: str, basis: str = "") -> Comparison:
    """The improvement of `candidate` over `reference` (paired items, same order) and its central
    `gate.confidence` percentile-bootstrap interval over `gate.samples` seeded resamples of the items."""
    import numpy as np

    whole = np.arange(len(candidate.keys))[None, :]
    new, old = float(metric_on(gate.metric, candidate, whole)[0]), float(metric_on(gate.metric, reference, whole)[0])
    gains = [
        gate.improvement(metric_on(gate.metric, candidate, idx), metric_on(gate.metric, reference, idx))
        for idx in resamples(gate, len(candidate.keys))
    ]
    low, high = central(gate, gains)
    return Comparison(
        gate.metric, against, new, old, gate.improvement(new, old), low, high, len(candidate.keys), gate.confidence,
        gate.min_improvement, basis,
    )  # fmt: skip


def metric_interval(gate: Gate, items: Items) -> dict[str, float] | None:
    """{"value", "low", "high"}: the primary metric of `items` and its central `gate.confidence` bootstrap
    interval (what the history shows for each run); None when it cannot be computed."""
    import numpy as np

    if items.problem(gate.metric):
        return None
    value = float(metric_on(gate.metric, items, np.arange(len(items.keys))[None, :])[0])
    low, high = central(gate, [metric_on(gate.metric, items, idx) for idx in resamples(gate, len(items.keys))])
    return {"value": value, "low": low, "high": high}


@dataclass(frozen=True)
class Decision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str
    comparison: Comparison | None = None  # None when nothing could be compared

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


@dataclass(frozen=True)
class Budget:
    """How much a model trained: its optimizer steps and the tokens it saw (train_qlora's metrics/train.json
    `steps` and `tokens_seen`, logged on its run); None where its run does not say (recorded before, or a
    stage that did not train)."""

    steps: int | None = None
    tokens: int | None = None

    def record(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens}

    def words(self) -> str:
        """ "60 steps (9,000 tokens)", or as much of it as is known."""
        steps = f"{self.steps:,} steps" if self.steps is not None else ""
        tokens = f"{self.tokens:,} tokens" if self.tokens is not None else ""
        return f"{steps} ({tokens})" if steps and tokens else steps or tokens or "an unknown budget"

    def less_than(self, other: Budget) -> bool:
        """Whether this is fewer steps or fewer tokens than `other`, on what both say."""
        pairs = ((self.steps, other.steps), (self.tokens, other.tokens))
        return any(mine is not None and theirs is not None and mine < theirs for mine, theirs in pairs)


@dataclass(frozen=True)
class Champion:
    """The version holding the `champion` alias: its number, what it was scored and trained on, and its
    per-item results (None when they could not be had, with `missing` saying why): those logged with it, or,
    `rescored`, its adapter's results on the candidate's test set."""

    version: str
    test: Provenance
    items: Items | None
    missing: str = ""
    label: str = ""  # how the reason names it; default "champion v<version>"
    rescored: bool = False
    run_id: str = ""  # the run that recorded it (where its adapter is logged)
    budget: Budget | None = None  # how much it trained; None when its run does not say

    @property
    def name(self) -> str:
        return self.label or f"champion v{self.version}"


def verdict(gate: Gate, c: Comparison) -> tuple[bool, str]:
    """(promote?, the comparison in words and numbers)."""
    level = f"{c.confidence:.0%}"
    interval = f"[{gate.amount(c.low)}, {gate.amount(c.high)}]"
    numbers = f"{gate.metric} {c.candidate:,.4g} vs {c.reference:,.4g} for {c.against}"
    basis = c.basis or f"over {c.n_items} items"
    if c.low == c.high == c.improvement == 0:
        return False, f"{numbers}: equal {basis}, not better"
    direction = "better" if c.improvement > 0 else "worse"
    said = f"{numbers}: {direction} by {gate.amount(abs(c.improvement))} {interval} {basis}"
    if c.low > gate.min_improvement:
        margin = (
            f", more than tracking.min_improvement={gate.amount(gate.min_improvement)}" if gate.min_improvement else ""
        )
        return True, f"{said}: shown at {level}{margin}"
    if c.improvement <= 0:
        return False, f"{said}: not better"
    if c.low > 0:
        return False, (
            f"{said}: better at {level}, but not surely by more than "
            f"tracking.min_improvement={gate.amount(gate.min_improvement)}"
        )
    return False, f"{said}: not shown at {level}"


def trained_less(candidate: Budget | None, champion: Champion | None) -> str:
    """A clause for the reason when the candidate trained on less than the champion, fewer optimizer steps or
    fewer tokens ("; the candidate trained 60 steps (9,000 tokens) against champion v3's 150 steps (22,500
    tokens)", naming what both budgets say), which alone can make it lose; "" when it trained as much or more,
    or when either budget is unknown (a champion recorded before runs logged it)."""
    if candidate is None or champion is None or champion.budget is None or not candidate.less_than(champion.budget):
        return ""
    theirs = champion.budget
    steps = candidate.steps is not None and theirs.steps is not None
    tokens = candidate.tokens is not None and theirs.tokens is not None
    mine, theirs = (Budget(b.steps if steps else None, b.tokens if tokens else None) for b in (candidate, theirs))
    return f"; the candidate trained {mine.words()} against {champion.name}'s {theirs.words()}"


def compared_keys(gate: Gate, candidate: Items, champion: Champion, test: Provenance) -> tuple[list[str] | None, str]:
    """(the candidate's test items to compare with the champion on, how they were chosen in words), or (None,
    why none can be): the items the champion has results for and did not train on, when they are at least
    `gate.min_shared` of the candidate's; a champion whose run does not say what it trained on, only on the
    very test set it was scored on."""
    against = champion.name
    if champion.items is None or champion.items.problem(gate.metric):
        why = champion.missing or champion.items.problem(gate.metric)
        return None, f"{against} cannot be compared item by item ({why})"
    scored = set(champion.items.keys)
    n = len(candidate.keys)
    if champion.test.trained_on is None:
        if not champion.rescored and champion.test.sha256 != test.sha256:
            return None, (
                f"{against} was scored on another test set ({(champion.test.sha256 or 'unknown')[:12]} vs "
                f"{(test.sha256 or 'unknown')[:12]}) and its run does not record which rows it trained on, so no "
                "item is known to be new to it: no comparison possible; promote by hand"
            )
        if scored != set(candidate.keys):
            return None, f"{against} was scored on other test items: no comparison possible"
        return list(candidate.keys), f"on the {n} items both were scored on"
    unseen = [key for key in candidate.keys if key not in champion.test.trained_on]
    keys = [key for key in unseen if key in scored]
    if len(keys) < gate.min_shared * n:
        return None, (
            f"only {len(keys)} of the {n} current test items can be compared with {against} ({n - len(unseen)} it "
            f"trained on, {len(unseen) - len(keys)} it was not scored on), fewer than tracking.min_shared="
            f"{gate.min_shared:g} of them"
        )
    basis = (
        f"on the current {len(keys)} items, {against} re-scored from its logged model"
        if champion.rescored
        else f"on the {len(keys)} items both were scored on"
    )
    trained = n - len(unseen)
    return keys, f"{basis} ({trained} it trained on left out)" if trained else basis


def needs_rescore(gate: Gate, candidate: Items, champion: Champion | None, test: Provenance) -> str | None:
    """Why the champion's logged results cannot be compared with the candidate's and re-scoring its adapter
    on the current test set could fix that, or None (comparable as it is, or re-scoring would not help)."""
    if champion is None or champion.rescored:
        return None
    keys, why = compared_keys(gate, candidate, champion, test)
    if keys is not None:
        return None
    known = champion.test.trained_on is not None or champion.test.sha256 == test.sha256
    return why if known else None


def decide(gate: Gate, candidate: Items, champion: Champion | None, base: Items | None, test: Provenance) -> Decision:
    """The alias a new version gets and why: `champion` when its paired improvement over the current champion
    (or, with none yet, over the base model zero-shot on the same items) is shown at `gate.confidence` and
    exceeds `gate.min_improvement` over the whole interval; `challenger` otherwise, or whenever the results
    cannot be compared (`compared_keys`; missing or NaN results; a test item the candidate trained on).
    Items are paired by key, in any order, and never on an item either model trained on."""
    problem = candidate.problem(gate.metric)
    if problem:
        return Decision(CHALLENGER, f"the candidate has {problem}: nothing to compare, so no promotion")
    leaked = [key for key in candidate.keys if test.trained_on and key in test.trained_on]
    if leaked:
        return Decision(
            CHALLENGER,
            f"{len(leaked)} of the candidate's {len(candidate.keys)} test items are in its own training data: the "
            "test set leaked, so no promotion; re-run split_data",
        )
    if champion is None:
        if base is None or base.problem(gate.metric):
            why = base.problem(gate.metric) if base is not None else "no base-model results"
            return Decision(CHALLENGER, f"no champion yet and the base model zero-shot has {why}: no promotion")
        return _compared(gate, candidate, base, "the base model zero-shot (no champion yet)")
    keys, basis = compared_keys(gate, candidate, champion, test)
    if keys is None:
        return Decision(CHALLENGER, f"{basis}, so no promotion")
    return _compared(gate, candidate.subset(keys), champion.items.subset(keys), champion.name, basis)


def _compared(gate: Gate, candidate: Items, reference: Items, against: str, basis: str = "") -> Decision:
    comparison = paired_comparison(gate, candidate, reference, against, basis)
    promote, reason = verdict(gate, comparison)
    return Decision(CHAMPION if promote else CHALLENGER, reason, comparison)
