"""MLflow model registry by alias: resolve and load versions, the promotion gate, rollback, history.

MLflow holds the aliases (`champion`, `challenger`); MySQL mirrors every version's gate decision
(`model_versions`) and every alias move (`alias_history`, migration 0002) so that SQL users can
ask which model was champion when. Registry stages are deprecated and never used.

Gate: the new version and the current champion are both evaluated, by the same code, on the
validation images of the dataset version the new model was trained on. The new version is
promoted when its accuracy is at least `min_accuracy` and not below the champion's by more than
`promotion_margin`; otherwise it becomes `challenger` and the champion stays. The decision is
written to MySQL before any alias moves, so a retried gate replays the same decision instead of
comparing the new version with itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.db import Database, utc_now

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class NoModelError(LookupError):
    """The requested alias or version does not exist in the registry."""


def mlflow_client():
    """An MLflow client for the tracking URI of this moment (MLFLOW_TRACKING_URI)."""
    from mlflow import MlflowClient

    return MlflowClient()


def resolve_model_version(model_name: str, model_ref: str | int = CHAMPION) -> str:
    """A concrete version number for an alias (`champion`, `challenger`, ...) or a version."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    ref = str(model_ref)
    try:
        if ref.isdigit():
            return str(client.get_model_version(model_name, ref).version)
        return str(client.get_model_version_by_alias(model_name, ref).version)
    except MlflowException as exc:
        what = f"version {ref}" if ref.isdigit() else f"alias @{ref}"
        hint = (
            " No champion yet: train one first (trigger the DAG image_classification, "
            "or run `python -m pipeline train` then `python -m pipeline promote`)."
            if ref == CHAMPION
            else ""
        )
        raise NoModelError(f"registered model {model_name!r} has no {what}.{hint}") from exc


def version_tags(model_name: str, model_version: str | int) -> dict[str, str]:
    return dict(mlflow_client().get_model_version(model_name, str(model_version)).tags)


def champion_dataset_version(model_name: str) -> str | None:
    """The dataset version the current champion was trained on, or None without a champion."""
    try:
        version = resolve_model_version(model_name, CHAMPION)
    except NoModelError:
        return None
    return version_tags(model_name, version).get("dataset_version")


def find_version_by_run_key(model_name: str, run_key: str) -> str | None:
    """The version registered by the training run `run_key` (an Airflow run id), if any."""
    from mlflow.exceptions import MlflowException

    escaped = run_key.replace("'", "\\'")
    try:
        found = mlflow_client().search_model_versions(
            f"name='{model_name}' and tags.run_key='{escaped}'"
        )
    except MlflowException:
        return None
    versions = sorted(int(v.version) for v in found)
    return str(versions[0]) if versions else None


def newest_ungated_version(db: Database, model_name: str) -> str | None:
    """The newest registered version, if the promotion gate never decided on it.

    What a gate run alone (`airflow tasks test ... promote_model`, no XCom from train_model and
    no version registered under its own run id) should decide on; None when there is nothing new.
    """
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client().search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    if not found:
        return None
    newest = max(int(v.version) for v in found)
    decided = db.query(
        "SELECT 1 FROM model_versions WHERE model_name = %s AND model_version = %s"
        " AND decision IS NOT NULL",
        (model_name, newest),
    )
    return None if decided else str(newest)


@dataclass(frozen=True)
class LoadedModel:
    """A registered version, loaded for inference, with what it needs to be used correctly."""

    module: Any
    model_name: str
    model_version: str
    run_id: str
    labels: tuple[str, ...]  # index -> label
    image_size: int
    dataset_version: str

    @property
    def label_map(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def load_model(model_name: str, model_ref: str | int, *, cache_dir: str | Path) -> LoadedModel:
    """Load a version (or alias, resolved once) for CPU/GPU inference; artifacts cached locally."""
    import mlflow
    import torch

    from pipeline.model import pick_device

    version = resolve_model_version(model_name, model_ref)
    mv = mlflow_client().get_model_version(model_name, version)
    tags = dict(mv.tags)
    if "label_map" not in tags or "image_size" not in tags:
        raise ValueError(
            f"{model_name} v{version} lacks the label_map/image_size tags: it was not registered"
            " by this pipeline"
        )
    label_map = json.loads(tags["label_map"])
    labels = tuple(sorted(label_map, key=label_map.get))
    local = Path(cache_dir) / "models" / safe_name(model_name) / version
    if not (local / "MLmodel").exists():
        tmp = local.with_name(f"{version}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}", dst_path=str(tmp)
        )
        os.replace(path, local) if not local.exists() else None
    device = pick_device()
    module = mlflow.pytorch.load_model(str(local), map_location=device).eval()
    module = module.to(memory_format=torch.channels_last)
    return LoadedModel(
        module,
        model_name,
        version,
        mv.run_id,
        labels,
        int(tags["image_size"]),
        tags.get("dataset_version", ""),
    )


def safe_name(name: str) -> str:
    """`name` usable as one path segment (model names in cache paths)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------- gate


def accuracy_on(
    loaded: LoadedModel, store, records, *, cache_dir: str | Path, batch_size: int = 128
) -> tuple[float, int]:
    """Top-1 accuracy of a loaded model on labelled records (undecodable ones are left out)."""
    import torch

    from pipeline.data import EvalPreset, ImageCache, ImageDecodeError, chunks, to_model_input
    from pipeline.model import predict

    cache = ImageCache(cache_dir)
    cache.fill(store, records)
    preset = EvalPreset(loaded.image_size)
    correct = total = 0
    for batch in chunks(records, batch_size):
        tensors, truth = [], []
        for r in batch:
            try:
                tensors.append(preset.from_bytes(cache.get(store, r)))
                truth.append(r.label)
            except (ImageDecodeError, LookupError):
                continue
        if not tensors:
            continue
        preds = predict(loaded.module, to_model_input(torch.stack(tensors)), loaded.labels)
        correct += sum(p.label == t for p, t in zip(preds, truth, strict=True))
        total += len(truth)
    return (correct / total if total else 0.0), total


def record_version(db: Database, model_name: str, version: str | int) -> None:
    """The version's `model_versions` row (lineage: MLflow run, Airflow run, dataset version),
    written when it is registered; idempotent, the gate's decision is kept."""
    mv = mlflow_client().get_model_version(model_name, str(version))
    _record_version(db, model_name, str(version), dict(mv.tags), mv.run_id)


def _record_version(
    db: Database, model_name: str, version: str, tags: dict[str, str], run_id: str
) -> None:
    db.execute(
        "INSERT INTO model_versions (model_name, model_version, run_id, dataset_version,"
        " airflow_run_id, image_size, n_classes, val_accuracy, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON DUPLICATE KEY UPDATE run_id = VALUES(run_id)",
        (
            model_name,
            int(version),
            run_id,
            tags.get("dataset_version", ""),
            tags.get("run_key"),
            int(tags.get("image_size", 0)),
            len(json.loads(tags.get("label_map", "{}"))),
            float(tags["val_accuracy"]) if "val_accuracy" in tags else None,
            utc_now(),
        ),
    )


def move_alias(
    db: Database, model_name: str, alias: str, version: str, *, actor: str, reason: str
) -> bool:
    """Point `alias` at `version` in MLflow and record the move; a no-op move records nothing."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        current = str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        current = None
    last = db.query(
        "SELECT to_version FROM alias_history WHERE model_name = %s AND alias = %s"
        " ORDER BY id DESC LIMIT 1",
        (model_name, alias),
    )
    recorded = str(last[0]["to_version"]) if last else None
    if current != version:
        client.set_registered_model_alias(model_name, alias, version)
    if recorded == version:
        return current != version
    # A retry after the alias moved but before this insert still records the move once.
    from_version = recorded if current == version else current
    db.execute(
        "INSERT INTO alias_history (model_name, alias, from_version, to_version, actor, reason,"
        " moved_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            model_name,
            alias,
            int(from_version) if from_version else None,
            int(version),
            actor[:255],
            reason[:512],
            utc_now(),
        ),
    )
    log.info("alias %s@%s: %s -> %s (%s)", model_name, alias, from_version, version, reason)
    return True


def promote(
    db: Database,
    store,
    model_name: str,
    model_version: str,
    *,
    min_accuracy: float,
    promotion_margin: float,
    actor: str,
    cache_dir: str | Path,
) -> dict[str, Any]:
    """The promotion gate for `model_version`; returns the decision and both scores.

    Decisions: `promoted` (alias champion moved), `challenger` (kept out, alias challenger).
    """
    from pipeline import catalog

    client = mlflow_client()
    version = resolve_model_version(model_name, model_version)
    mv = client.get_model_version(model_name, version)
    tags = dict(mv.tags)
    _record_version(db, model_name, version, tags, mv.run_id)
    row = db.query(
        "SELECT * FROM model_versions WHERE model_name = %s AND model_version = %s",
        (model_name, int(version)),
    )[0]
    if row["decision"] is None:
        row = _decide(
            db,
            store,
            model_name,
            version,
            tags,
            min_accuracy=min_accuracy,
            promotion_margin=promotion_margin,
            cache_dir=cache_dir,
            catalog=catalog,
        )
    else:
        log.info("gate already decided for v%s: %s (replaying)", version, row["decision"])
    decision = row["decision"]
    alias = CHAMPION if decision == "promoted" else CHALLENGER
    move_alias(db, model_name, alias, version, actor=actor, reason=row["decision_reason"])
    result = {
        "model_name": model_name,
        "model_version": version,
        "decision": decision,
        "reason": row["decision_reason"],
        "accuracy": row["gate_accuracy"],
        "champion_version": str(row["champion_version"]) if row["champion_version"] else None,
        "champion_accuracy": row["champion_accuracy"],
    }
    for key in ("decision", "accuracy", "champion_version", "champion_accuracy"):
        client.set_model_version_tag(model_name, version, f"gate_{key}", str(result[key]))
    log.info("promotion gate: %s", result)
    return result


def gate_decision(
    accuracy: float,
    champion_accuracy: float | None,
    *,
    min_accuracy: float,
    promotion_margin: float,
    champion_version: str | None = None,
) -> tuple[str, str]:
    """(`promoted` | `challenger`, reason): promote when accuracy >= min_accuracy and it is not
    worse than the champion's by more than promotion_margin (no champion: the minimum suffices).
    """
    if accuracy < min_accuracy:
        return "challenger", f"accuracy {accuracy:.4f} below min_accuracy {min_accuracy}"
    if champion_accuracy is not None and accuracy < champion_accuracy - promotion_margin:
        return "challenger", (
            f"accuracy {accuracy:.4f} worse than champion v{champion_version} "
            f"({champion_accuracy:.4f}) by more than margin {promotion_margin}"
        )
    if champion_accuracy is None:
        return "promoted", f"accuracy {accuracy:.4f} >= min {min_accuracy} (first champion)"
    return "promoted", (
        f"accuracy {accuracy:.4f} vs champion v{champion_version} {champion_accuracy:.4f}"
        f" (margin {promotion_margin}), min {min_accuracy}"
    )


def _decide(
    db, store, model_name, version, tags, *, min_accuracy, promotion_margin, cache_dir, catalog
) -> dict[str, Any]:
    records = catalog.dataset_images(db, tags["dataset_version"], ["val"])
    if not records:
        raise ValueError(
            f"dataset {tags['dataset_version']} has no validation images: the gate cannot compare"
        )
    candidate = load_model(model_name, version, cache_dir=cache_dir)
    accuracy, n = accuracy_on(candidate, store, records, cache_dir=cache_dir)
    try:
        champion_version = resolve_model_version(model_name, CHAMPION)
    except NoModelError:
        champion_version = None
    champion_accuracy = None
    if champion_version == version:
        champion_version = None  # promoted earlier by hand: compare with nothing
    if champion_version is not None:
        champion = load_model(model_name, champion_version, cache_dir=cache_dir)
        champion_accuracy, _ = accuracy_on(champion, store, records, cache_dir=cache_dir)
    decision, reason = gate_decision(
        accuracy,
        champion_accuracy,
        min_accuracy=min_accuracy,
        promotion_margin=promotion_margin,
        champion_version=champion_version,
    )
    reason += f" on {n} val images"
    db.execute(
        "UPDATE model_versions SET gate_accuracy = %s, champion_version = %s,"
        " champion_accuracy = %s, decision = %s, decision_reason = %s, decided_at = %s"
        " WHERE model_name = %s AND model_version = %s",
        (
            accuracy,
            int(champion_version) if champion_version else None,
            champion_accuracy,
            decision,
            reason[:512],
            utc_now(),
            model_name,
            int(version),
        ),
    )
    return db.query(
        "SELECT * FROM model_versions WHERE model_name = %s AND model_version = %s",
        (model_name, int(version)),
    )[0]


def rollback(db: Database, model_name: str, model_version: str, *, actor: str, reason: str) -> dict:
    """Move `champion` back to an earlier registered version (which must exist)."""
    version = resolve_model_version(model_name, model_version)
    mv = mlflow_client().get_model_version(model_name, version)
    _record_version(db, model_name, version, dict(mv.tags), mv.run_id)
    moved = move_alias(db, model_name, CHAMPION, version, actor=actor, reason=f"rollback: {reason}")
    return {
        "model_name": model_name,
        "model_version": version,
        "decision": "rolled_back",
        "moved": moved,
    }


def champion_at(db: Database, model_name: str, when: datetime) -> str | None:
    """The champion version at a moment in time (UTC), from the alias history."""
    rows = db.query(
        "SELECT to_version FROM alias_history WHERE model_name = %s AND alias = %s"
        " AND moved_at <= %s ORDER BY moved_at DESC, id DESC LIMIT 1",
        (model_name, CHAMPION, when),
    )
    return str(rows[0]["to_version"]) if rows else None


# ----------------------------------------------------------------------------- CLI


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-version", required=True, help="version to gate (or roll back to)")
    from pipeline.params import RUN_PARAMS
    from pipeline.store import add_location_arguments

    for name in ("min_accuracy", "promotion_margin"):  # the DAG's defaults, from its form
        spec = RUN_PARAMS[name]
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=spec.default)
    parser.add_argument("--rollback", action="store_true", help="make it champion unconditionally")
    add_location_arguments(parser, prefix=False)


def cli_promote(args: argparse.Namespace, settings: Any) -> int:
    from pipeline.store import location_from_args

    db = Database(settings.mysql)
    actor = f"cli:{os.environ.get('USER', 'unknown')}"
    if args.rollback:
        result = rollback(db, settings.model_name, args.model_version, actor=actor, reason="cli")
    else:
        result = promote(
            db,
            location_from_args(settings, args)[0],
            settings.model_name,
            args.model_version,
            min_accuracy=args.min_accuracy,
            promotion_margin=args.promotion_margin,
            actor=actor,
            cache_dir=settings.cache_dir,
        )
    for key, value in result.items():
        print(f"{key:<18} {value}")
    return 0
