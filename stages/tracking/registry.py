"""The MLflow model registry: one version per new adapter, and the promotion gate for the `champion` alias.

`decide(gate, candidate, base, champion)` is the rule, with no MLflow in it: a new version becomes
champion only when its primary metric beats the current champion's, measured on the same test set (same
sha256), by more than `tracking.min_improvement`; with no champion yet, it must beat the base model
zero-shot. Anything else makes it a `challenger`, with the reason in words.
`register_adapter(client, ...)` applies it: it registers the adapter logged in a run (or finds the version
that already holds the same adapter bytes), moves or keeps the aliases, and tags version and run with the
decision. Load the champion back with:

    mlflow.artifacts.download_artifacts("models:/qlora-price-adapter@champion")  # -> a PEFT adapter folder
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.common.config import TrackingConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
TEST_HASH_TAG = "data.test_sha256"
ADAPTER_HASH_TAG = "adapter.sha256"


@dataclass(frozen=True)
class Gate:
    """Which metric decides, in which direction, and by how much a challenger must win."""

    metric: str
    greater_is_better: bool
    min_improvement: float

    @classmethod
    def from_params(cls, cfg: TrackingConfig, evaluation: dict) -> Gate:
        """The gate for `tracking`; `primary_metric: auto` is avg_error for prices and the test loss for
        prompt/completion and chat data (metrics/eval.json's "shape"), both lower is better."""
        if cfg.primary_metric != "auto":
            return cls(cfg.primary_metric, cfg.greater_is_better, cfg.min_improvement)
        metric = "avg_error" if evaluation.get("shape", "price") == "price" else "loss"
        return cls(metric, greater_is_better=False, min_improvement=cfg.min_improvement)

    def improvement(self, new: float, old: float) -> float:
        """How much `new` is better than `old` (negative when worse)."""
        return new - old if self.greater_is_better else old - new


@dataclass(frozen=True)
class Champion:
    """The version holding the `champion` alias: its number, primary metric and test-set hash."""

    version: str
    value: float | None
    test_sha256: str | None


@dataclass(frozen=True)
class Decision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str
    candidate: float
    reference: float | None  # the champion's (or, with no champion, the base model's) value

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def decide(gate: Gate, candidate: float, base: float | None, champion: Champion | None, test_sha256: str) -> Decision:
    """The alias a new version gets and why. `candidate` and `base` are the primary metric of the new
    adapter and of the base model zero-shot on the test set with hash `test_sha256`."""
    name = gate.metric
    if not math.isfinite(candidate):
        return Decision(CHALLENGER, f"{name} is {candidate}: nothing to compare", candidate, None)
    if champion is None:
        if base is None or not math.isfinite(base):
            return Decision(CHALLENGER, f"no champion yet and no base-model {name} to beat", candidate, base)
        return _compare(gate, candidate, base, "the base model zero-shot (no champion yet)")
    if champion.test_sha256 != test_sha256:
        return Decision(
            CHALLENGER,
            f"champion v{champion.version} was scored on another test set "
            f"({(champion.test_sha256 or 'unknown')[:12]} vs {test_sha256[:12]}): no comparison possible, "
            "so no promotion; re-evaluate it on this test set or promote by hand",
            candidate,
            champion.value,
        )
    if champion.value is None or not math.isfinite(champion.value):
        return Decision(CHALLENGER, f"champion v{champion.version} has no {name} to compare", candidate, None)
    return _compare(gate, candidate, champion.value, f"champion v{champion.version}")


def _compare(gate: Gate, candidate: float, reference: float, against: str) -> Decision:
    gained = gate.improvement(candidate, reference)
    summary = f"{gate.metric} {candidate:,.4g} vs {reference:,.4g} for {against}"
    if gained > gate.min_improvement:
        return Decision(CHAMPION, f"{summary}: better by {gained:,.4g}", candidate, reference)
    if gained > 0:
        why = f"better by only {gained:,.4g}, not more than tracking.min_improvement={gate.min_improvement:g}"
    elif gained == 0:
        why = "equal, not better"
    else:
        why = f"worse by {-gained:,.4g}"
    return Decision(CHALLENGER, f"{summary}: {why}", candidate, reference)


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
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None  # no registered model yet, or no champion
    return version, client.get_run(version.run_id)


def current_champion(client, model_name: str, metric: str) -> Champion | None:
    """The version holding `champion`, with the metric and test hash of the run that scored it."""
    found = champion_run(client, model_name)
    if found is None:
        return None
    version, run = found
    return Champion(
        version=str(version.version),
        value=run.data.metrics.get(f"eval.adapter.{metric}"),
        test_sha256=run.data.tags.get(TEST_HASH_TAG),
    )


def find_version(client, model_name: str, sha256: str):
    """The registered version whose adapter has this hash, if any."""
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(ADAPTER_HASH_TAG) == sha256:
            return client.get_model_version(model_name, version.version)  # search results lack aliases
    return None


def register_adapter(
    client, cfg: TrackingConfig, run_id: str, adapter_dir: Path, evaluation: dict, test_sha256: str
) -> dict:
    """Register the adapter logged under `adapter` in run `run_id` and apply the promotion gate.

    `evaluation` is metrics/eval.json (rows `adapter` and `base_zero_shot`). Returns a record:
    version, alias, promoted, reason, new_version (False when these adapter bytes were registered before).
    """
    from mlflow.exceptions import MlflowException

    gate = Gate.from_params(cfg, evaluation)
    adapter_row = evaluation.get("adapter") or {}
    if gate.metric not in adapter_row:
        raise KeyError(
            f"tracking.primary_metric={gate.metric!r} is not in the adapter row of metrics/eval.json; "
            f"choose one of {sorted(adapter_row)}"
        )
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
        }
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(cfg.registered_model)
    champion = current_champion(client, cfg.registered_model, gate.metric)
    base = (evaluation.get("base_zero_shot") or {}).get(gate.metric)
    decision = decide(gate, float(adapter_row[gate.metric]), base, champion, test_sha256)
    source = f"{client.get_run(run_id).info.artifact_uri}/adapter"
    version = client.create_model_version(
        cfg.registered_model,
        source=source,
        run_id=run_id,
        tags={ADAPTER_HASH_TAG: sha256, TEST_HASH_TAG: test_sha256, "promotion.reason": decision.reason},
    )
    client.set_registered_model_alias(cfg.registered_model, decision.alias, version.version)
    record = {"version": str(version.version), "new_version": True, "promoted": decision.promoted, **asdict(decision)}
    for key in ("alias", "reason", "promoted"):
        client.set_tag(run_id, f"promotion.{key}", str(record[key]))
    client.set_tag(run_id, "registry.version", str(version.version))
    return record
