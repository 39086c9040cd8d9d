"""The MLflow model registry: one version per new adapter, its per-item results, and the promotion gate.

`register_adapter(client, ...)` registers the adapter logged in a run (or finds the version that already holds
the same adapter bytes), fetches the current champion's per-item results, applies the rule in
stages/tracking/gate.py, moves or keeps the aliases, and tags version and run with the decision in words and
numbers. Every version carries its per-item test results (the run's `eval/predictions.jsonl`, named by the
`eval.per_item` tag), so a later candidate is compared with it item by item without re-running it. A champion
registered before that (no per-item results, or results missing a field the metric needs) is re-scored from
its logged adapter when the caller can (`rescore`), or the gate says it cannot compare and does not promote;
nothing in the registry is changed for it. A version's source is the MLflow Model record_run logs
(serving/pricer.py): load the champion back with

    mlflow.pyfunc.load_model("models:/qlora-price-adapter@champion")  # predicts completions and prices
    mlflow.artifacts.download_artifacts("models:/qlora-price-adapter@champion")  # its adapter: artifacts/adapter
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from stages.common.errors import StageError
from stages.common.paths import Paths
from stages.tracking.gate import Champion, Decision, Gate, Items, decide

TEST_HASH_TAG = "data.test_sha256"
ADAPTER_HASH_TAG = "adapter.sha256"
PER_ITEM_TAG = "eval.per_item"  # the run artifact holding the version's per-item test results
PER_ITEM_ARTIFACT = Paths.predictions.relative  # logged under its path in the workspace
LEGACY_PER_ITEM_ARTIFACT = "predictions.jsonl"  # where runs recorded before the tag logged them

# Re-scores a champion without usable per-item results: (run id of its version) -> prediction rows, or None
# when the base model or the test split is not at hand.
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


def current_champion(
    client, model_name: str, metric: str, test_sha256: str | None, rescore: Rescore | None = None
) -> Champion | None:
    """The version holding `champion`, its test-set hash and its per-item results: logged ones, else, when it
    was scored on this test set (`test_sha256`), re-scored with `rescore` where possible, else none (with why)."""
    found = champion_run(client, model_name)
    if found is None:
        return None
    version, run = found
    items, missing = champion_items(logged_rows(client, run), metric)
    if items is None and rescore is not None and run.data.tags.get(TEST_HASH_TAG) == test_sha256:
        rows = rescore(run.info.run_id)
        if rows is None:
            missing += "; re-scoring it needs the base model and the test split here"
        else:
            items, why = champion_items(rows, metric)
            missing = f"{missing}; re-scored from its logged adapter" if items else f"{missing}; re-scored: {why}"
            print(f"champion v{version.version}: {missing}")
    return Champion(str(version.version), run.data.tags.get(TEST_HASH_TAG), items, missing)


def find_version(client, model_name: str, sha256: str):
    """The registered version whose adapter has this hash, if any."""
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(ADAPTER_HASH_TAG) == sha256:
            return client.get_model_version(model_name, version.version)  # search results lack aliases
    return None


def decision_tags(decision: Decision) -> dict[str, str]:
    """The decision as tags (run and version): the alias, the reason, and the comparison's numbers."""
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
            "promotion.min_improvement": f"{c.min_improvement:g}",
        })  # fmt: skip
    return tags


def register_adapter(
    client,
    cfg,
    run_id: str,
    adapter_dir: Path,
    shape: str,
    rows: list[dict],
    test_sha256: str | None,
    rescore: Rescore | None = None,
    model=None,
) -> dict:
    """Register the adapter logged under `adapter` in run `run_id` and apply the promotion gate of params
    `tracking` (`cfg`) to its per-item test results `rows` (eval/predictions.jsonl of data `shape`).

    The version's source is `model` (the LoggedModel record_run logged: its artifacts, and its id), or
    without one the run's `adapter` folder. Returns a record: version, new_version (False when these adapter bytes were
    registered before), alias, promoted, reason, and the comparison's numbers (None when nothing could be
    compared).
    """
    from mlflow.exceptions import MlflowException

    sha256 = adapter_sha256(adapter_dir)
    existing = find_version(client, cfg.registered_model, sha256)
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
    champion = current_champion(client, cfg.registered_model, gate.metric, test_sha256, rescore)
    try:
        candidate = Items.from_rows(rows, "adapter")
    except KeyError as exc:
        raise StageError(
            f"{PER_ITEM_ARTIFACT}: prediction rows have no {exc.args[0]!r} field; re-run evaluate_adapter (dvc repro)"
        ) from exc
    decision = decide(gate, candidate, champion, base_items(rows), test_sha256)
    version = create_version(
        client, cfg.registered_model, run_id, sha256, test_sha256, model, decision_tags(decision), decision.reason
    )
    client.set_registered_model_alias(cfg.registered_model, decision.alias, version.version)
    for key, value in {**decision_tags(decision), "registry.version": str(version.version)}.items():
        client.set_tag(run_id, key, value)
    return {
        "version": str(version.version),
        "new_version": True,
        "alias": decision.alias,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "comparison": decision.comparison.record() if decision.comparison else None,
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
