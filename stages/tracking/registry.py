"""The MLflow model registry: one version per new adapter, its per-item results, and the promotion gate.

`register_adapter(client, ...)` registers the adapter logged in a run (or finds the version that already holds
the same adapter bytes), fetches the current champion's per-item results, applies the rule in
stages/tracking/gate.py, moves or keeps the aliases, and tags version and run with the decision in words and
numbers; when the candidate trained on less than the champion (its run's train/steps and train/tokens_seen
against the champion's), the reason ends with both budgets. Every version carries its per-item test results
(the run's `eval/predictions.jsonl`, named by the `eval.per_item` tag), so a later candidate is compared with
it item by item, by key, without re-running it.
A champion whose logged results cover too few of the current test items (the test set grew, or its
membership rule changed), or that was registered without usable per-item results, is re-scored on the
current test split from its logged model when the caller can (`rescore`); otherwise the gate says it cannot
compare and does not promote; nothing in the registry is changed for it. A version's source is the MLflow
Model record_run logs (serving/pricer.py): load the champion back with

    mlflow.pyfunc.load_model("models:/qlora-price-adapter@champion")  # predicts completions and prices
    mlflow.artifacts.download_artifacts("models:/qlora-price-adapter@champion")  # its adapter: artifacts/adapter
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from stages.common.errors import StageError
from stages.common.paths import Paths
from stages.tracking.gate import (
    Budget,
    Champion,
    Decision,
    Gate,
    Items,
    Provenance,
    decide,
    metric_interval,
    needs_rescore,
    trained_less,
)

TEST_HASH_TAG = "data.test_sha256"
ADAPTER_HASH_TAG = "adapter.sha256"
MODEL_URI_TAG = "model.uri"  # the run's logged MLflow Model, models:/<model id> (stages/record_run.py)
PER_ITEM_TAG = "eval.per_item"  # the run artifact holding the version's per-item test results
PER_ITEM_ARTIFACT = Paths.predictions.relative  # logged under its path in the workspace
LEGACY_PER_ITEM_ARTIFACT = "predictions.jsonl"  # where runs recorded before the tag logged them
MEMBERSHIP_TAG = "data.membership"  # the fingerprint of the split membership rule (metrics/data.json)
TRAINED_ON_TAG = "data.trained_on"  # the run artifact listing the key digests of its train and val rows
TRAINED_ON_ARTIFACT = "data/trained_on.txt"
CHAMPION_AFTER_TAG = "registry.champion_after"  # the version holding `champion` once this run's gate decided
PRIMARY_METRIC_PREFIX = "promotion/primary_"  # + value, low, high: the candidate's primary metric, its interval
PRIMARY_METRIC_TAG = "promotion.primary_metric"  # which metric those are
# How much a run's adapter trained: train_qlora's metrics/train.json as record_run logs it (the second name is how
# runs recorded before the metric sections named it).
BUDGET_METRICS = {"steps": ("train/steps", "train.steps"), "tokens": ("train/tokens_seen", "train.tokens_seen")}

# Re-scores a champion on this workspace's test split: (run id of its version) -> prediction rows, or None
# when the base model or the test split is not at hand; StageError when it cannot be scored here.
Rescore = Callable[[str], list[dict] | None]


def adapter_sha256(folder: Path) -> str:
    """One hash over the adapter's weights and config (the files that define it)."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def champion_run(client, model_name: str):
    """(version, run that scored it) for the version holding `champion`; None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None  # no registered model yet, or no champion
    return version, client.get_run(version.run_id)


def logged_rows(client, run) -> list[dict] | None:
    """The per-item test results logged with `run`, or None when it has none."""
    from mlflow.exceptions import MlflowException

    path = run.data.tags.get(PER_ITEM_TAG, LEGACY_PER_ITEM_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="per-item-") as folder:
        try:
            local = client.download_artifacts(run.info.run_id, path, folder)
        except (MlflowException, OSError):
            return None
        text = Path(local).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def champion_items(rows: list[dict] | None, metric: str) -> tuple[Items | None, str]:
    """(the champion's items, or None with why) from its prediction rows."""
    if rows is None:
        return None, "no per-item results logged with it"
    try:
        items = Items.from_rows(rows, "adapter")
    except KeyError as exc:
        return None, f"its logged per-item results have no {exc.args[0]!r} field"
    problem = items.problem(metric)
    return (None, f"its logged per-item results have {problem}") if problem else (items, "")


def logged_test_set(client, run) -> Provenance:
    """What `run` was scored and trained on, from its tags and its trained-on artifact (`trained_on` None for
    a run recorded before that artifact existed, or whose artifact cannot be read)."""
    from mlflow.exceptions import MlflowException

    tags = run.data.tags
    trained_on = None
    if TRAINED_ON_TAG in tags:
        with tempfile.TemporaryDirectory(prefix="trained-on-") as folder:
            try:
                local = client.download_artifacts(run.info.run_id, tags[TRAINED_ON_TAG], folder)
                trained_on = frozenset(Path(local).read_text(encoding="utf-8").split())
            except (MlflowException, OSError):
                trained_on = None
    return Provenance(tags.get(TEST_HASH_TAG), tags.get(MEMBERSHIP_TAG), trained_on)


def logged_budget(run) -> Budget | None:
    """How much `run`'s adapter trained (optimizer steps, tokens seen), from its logged train metrics; None when
    it logged neither (a run recorded before them)."""
    metrics = run.data.metrics

    def first(names: tuple[str, ...]) -> int | None:
        found = [metrics[name] for name in names if name in metrics]
        return int(found[0]) if found else None

    budget = Budget(**{field: first(names) for field, names in BUDGET_METRICS.items()})
    return None if budget.steps is None and budget.tokens is None else budget


def current_champion(client, model_name: str, metric: str) -> Champion | None:
    """The version holding `champion`: what it was scored and trained on, how much it trained, and its logged
    per-item results."""
    found = champion_run(client, model_name)
    if found is None:
        return None
    version, run = found
    items, missing = champion_items(logged_rows(client, run), metric)
    return Champion(
        str(version.version), logged_test_set(client, run), items, missing, run_id=run.info.run_id,
        budget=logged_budget(run),
    )  # fmt: skip


def rescored(champion: Champion, why: str, metric: str, rescore: Rescore) -> Champion:
    """`champion` with its adapter's results on this workspace's test set (`rescored`), or as it was, its
    `missing` saying why, when that cannot be done here."""
    try:
        rows = rescore(champion.run_id)
    except StageError as exc:
        return replace(champion, missing=f"{why}; it cannot be re-scored here: {exc}")
    if rows is None:
        return replace(champion, missing=f"{why}; re-scoring it needs the base model and the test split here")
    items, problem = champion_items(rows, metric)
    if items is None:
        return replace(champion, missing=f"{why}; re-scored, but {problem}")
    print(f"{champion.name}: {why}; re-scored from its logged model on the current {len(items.keys)} test items")
    return replace(champion, items=items, missing="", rescored=True)


def find_version(client, model_name: str, sha256: str):
    """The registered version whose adapter has this hash, if any."""
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(ADAPTER_HASH_TAG) == sha256:
            return client.get_model_version(model_name, version.version)  # search results lack aliases
    return None


def interrupted(client, version) -> bool:
    """Whether `version` is a registration its process never finished: gated (it carries the decision's
    `promotion.alias` tag) yet holding no alias, its run ended (not a registration in progress elsewhere) without
    the `registry.version` tag the gate sets on the run once the alias is set."""
    from mlflow.exceptions import MlflowException

    if version.aliases or "promotion.alias" not in version.tags or not version.run_id:
        return False
    try:
        run = client.get_run(version.run_id)
    except MlflowException:
        return False
    return run.info.status != "RUNNING" and run.data.tags.get("registry.version") != str(version.version)


def decision_tags(decision: Decision) -> dict[str, str]:
    """The decision as tags (run and version): the alias, the reason, and the comparison's numbers and basis."""
    tags = {
        "promotion.alias": decision.alias,
        "promotion.promoted": str(decision.promoted),
        "promotion.reason": decision.reason,
    }
    c = decision.comparison
    if c is not None:
        tags.update({
            "promotion.metric": c.metric, "promotion.against": c.against,
            "promotion.improvement": f"{c.improvement:.6g}", "promotion.interval": f"[{c.low:.6g}, {c.high:.6g}]",
            "promotion.n_items": str(c.n_items), "promotion.confidence": f"{c.confidence:g}",
            "promotion.min_improvement": f"{c.min_improvement:g}", "promotion.basis": c.record()["basis"],
        })  # fmt: skip
    return tags


def register_adapter(
    client,
    cfg,
    run_id: str,
    adapter_dir: Path,
    shape: str,
    rows: list[dict],
    test: Provenance,
    rescore: Rescore | None = None,
    model=None,
) -> dict:
    """Register the adapter logged under `adapter` in run `run_id` and apply the promotion gate of params
    `tracking` (`cfg`) to its per-item test results `rows` (eval/predictions.jsonl of data `shape`), scored on
    `test`. A champion whose logged results cannot be compared with them (too few shared items, none logged)
    is re-scored first with `rescore` where that helps (stages/tracking/gate.py `needs_rescore`).

    The version's source is `model` (the LoggedModel record_run logged: its artifacts, and its id), or
    without one the run's `adapter` folder. Returns a record: version, new_version (False when these adapter
    bytes were registered before), alias, promoted, reason, the comparison's numbers (None when nothing could
    be compared), the candidate's primary metric with its interval, and how much the candidate and the
    champion it met trained (`trained`: steps and tokens, None where unknown; the reason says when the
    candidate trained less).
    """
    from mlflow.exceptions import MlflowException

    sha256 = adapter_sha256(adapter_dir)
    existing = find_version(client, cfg.registered_model, sha256)
    if existing is not None and interrupted(client, existing):
        print(
            f"version {existing.version} of {cfg.registered_model} was registered by run {existing.run_id}, whose "
            "process died before the gate set its alias: deleted, registered again for this run"
        )
        client.delete_model_version(cfg.registered_model, existing.version)
        existing = None
    if existing is not None:
        aliases = ", ".join(existing.aliases) or "no alias"
        return {
            "version": str(existing.version),
            "new_version": False,
            "alias": existing.aliases[0] if existing.aliases else None,
            "promoted": False,
            "reason": f"same adapter as version {existing.version} ({aliases}); no new version registered",
            "comparison": None,
        }
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(cfg.registered_model)
    gate = Gate.from_params(cfg, shape)
    try:
        candidate = Items.from_rows(rows, "adapter")
    except KeyError as exc:
        raise StageError(
            f"{PER_ITEM_ARTIFACT}: prediction rows have no {exc.args[0]!r} field; re-run evaluate_adapter (dvc repro)"
        ) from exc
    champion = current_champion(client, cfg.registered_model, gate.metric)
    why = needs_rescore(gate, candidate, champion, test)
    if why and rescore is not None:
        champion = rescored(champion, why, gate.metric, rescore)
    decision = decide(gate, candidate, champion, base_items(rows), test)
    if champion is not None and champion.missing and champion.missing not in decision.reason:
        decision = replace(decision, reason=f"{decision.reason} ({champion.missing})")  # why it was not re-scored
    budget = logged_budget(client.get_run(run_id))
    decision = replace(decision, reason=decision.reason + trained_less(budget, champion))
    version = create_version(
        client, cfg.registered_model, run_id, sha256, test.sha256, model, decision_tags(decision), decision.reason
    )
    client.set_registered_model_alias(cfg.registered_model, decision.alias, version.version)
    after = str(version.version) if decision.promoted else (champion.version if champion else "")
    tags = {
        **decision_tags(decision), "registry.version": str(version.version), CHAMPION_AFTER_TAG: after,
        PRIMARY_METRIC_TAG: gate.metric,
    }  # fmt: skip
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    primary = metric_interval(gate, candidate)
    for name, value in (primary or {}).items():
        client.log_metric(run_id, f"{PRIMARY_METRIC_PREFIX}{name}", value)
    return {
        "version": str(version.version),
        "new_version": True,
        "alias": decision.alias,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "comparison": decision.comparison.record() if decision.comparison else None,
        "champion_after": after,
        "primary": {"metric": gate.metric, **primary} if primary else None,
        "trained": {
            "candidate": budget.record() if budget else None,
            "champion": champion.budget.record() if champion and champion.budget else None,
            "against": champion.name if champion else None,
        },
    }


def create_version(
    client, name: str, run_id: str, sha256: str, test_sha256: str | None, model, tags: dict, description: str
):
    """A new version of registered model `name` for the adapter (hash `sha256`) of run `run_id`, its source the
    LoggedModel `model` (or without one the run's `adapter` folder), tagged for later comparisons."""
    lineage = {ADAPTER_HASH_TAG: sha256, TEST_HASH_TAG: test_sha256 or "unknown", PER_ITEM_TAG: PER_ITEM_ARTIFACT}
    return client.create_model_version(
        name,
        # The model's artifact location rather than models:/<id>, which MLflow resolves with the process's
        # default tracking URI instead of this client's.
        source=model.artifact_location if model else f"{client.get_run(run_id).info.artifact_uri}/adapter",
        run_id=run_id,
        tags={**lineage, **tags},
        description=description,
        model_id=model.model_id if model else None,
    )


def base_items(rows: list[dict]) -> Items | None:
    """The base model zero-shot's items from the same rows (None when they lack them)."""
    try:
        return Items.from_rows(rows, "base_zero_shot")
    except KeyError:
        return None
