"""MLflow model registry by alias: resolve and load versions, the promotion gate, rollback, history.

MLflow holds the aliases (`champion`, `challenger`); MySQL mirrors every version's gate decision
(`model_versions`) and every alias move (`alias_history`, migration 0002) so that SQL users can
ask which model was champion when. Registry stages are deprecated and never used.

Gate: the new version and the current champion are both evaluated, by the same code, on the
validation images of the dataset version the new model was trained on. The new version is
promoted when its accuracy is at least `min_accuracy` and not below the champion's by more than
`promotion_margin`; otherwise it becomes `challenger` and the champion stays. A champion trained
on another label set is never compared or replaced unless the run allows a label change: the
gate refuses (decision `refused`, both label sets named). The decision is written to MySQL before
any alias moves, so a retried gate replays the same decision instead of comparing the new version
with itself.

Faults: an MLflow answer "no such model/version/alias" is None or `NoModelError`; every other
MLflow error propagates, naming MLflow and its tracking URI (`ServiceUnavailable` when a retry may
cure it, after MLflow's own bounded HTTP retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES and
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR). Alias moves of one model (gate, promote, rollback) run under
one MySQL named lock, and each first reconciles `alias_history` with MLflow, so a process killed
between the MLflow move and its history row is repaired by the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import pause_point
from pipeline.db import Database, HeldLock, named_lock, utc_now
from pipeline.errors import Refusal, ServiceUnavailable, is_transient
from pipeline.preflight import without_credentials

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)
# The gate's verdict for a version that earned promotion in a run with `require_approval`: it is
# challenger until a person answers (`review`), then `promoted` or `challenger`.
AWAITING_APPROVAL = "awaiting_approval"
AWAITING_SUFFIX = "; awaiting approval"  # ends the gate's reason while the question is open
APPROVED, REJECTED, TIMED_OUT = "approved", "rejected", "timed_out"
REVIEWS = (APPROVED, REJECTED, TIMED_OUT)
# A gate holds the model's lock while it evaluates two models: minutes on a large val split.
ALIAS_LOCK_TIMEOUT_S = 900
# Test-only pause point (seconds) between the MLflow alias move and its history row, so a fault
# test can SIGKILL a real process there. Unset in every deployment.
PAUSE_AFTER_ALIAS_MOVE_ENV = "PIPELINE_TEST_PAUSE_AFTER_ALIAS_MOVE_S"
# ... and before it, under the lock, so a fault test can end the lock's MySQL connection there.
PAUSE_BEFORE_ALIAS_MOVE_ENV = "PIPELINE_TEST_PAUSE_BEFORE_ALIAS_MOVE_S"

T = TypeVar("T")


class NoModelError(LookupError):
    """The requested alias or version does not exist in the registry."""


class LabelSetMismatch(Refusal):
    """The gate was asked to replace a champion trained on other labels (another dataset)."""


class MlflowError(RuntimeError):
    """MLflow refused a request for a reason other than "not found" or an outage."""


def tracking_uri() -> str:
    """The MLflow tracking URI of this moment (MLFLOW_TRACKING_URI or `mlflow.set_tracking_uri`)."""
    import mlflow

    return mlflow.get_tracking_uri()


def mlflow_ui_url() -> str:
    """The MLflow UI that people open: MLFLOW_UI_URL, else the tracking URI without its
    credentials (links end up in pages and questions every reader of the DAG sees)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri()  # the env: no mlflow import
    return (os.environ.get("MLFLOW_UI_URL") or without_credentials(uri)).rstrip("/")


def mlflow_client():
    """An MLflow client for the tracking URI of this moment (MLFLOW_TRACKING_URI)."""
    from mlflow import MlflowClient

    return MlflowClient()


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (causes, contexts, urllib3's `reason`), nearest first."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    return seen


def _not_found(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def mlflow_failure(exc: BaseException, what: str) -> Exception:
    """`exc` from an MLflow call, classified once and named: `ServiceUnavailable` when a later
    try may succeed (connection refused/reset, timeout, 5xx, throttling), else `MlflowError`."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    chain = _causes(exc)
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or any(
        "connection refused" in str(e).lower() for e in chain
    ):
        return ServiceUnavailable("MLflow", uri, f"connection refused ({what})")
    if any(isinstance(e, TimeoutError) or "timed out" in str(e).lower() for e in chain):
        return ServiceUnavailable("MLflow", uri, f"timed out ({what})")
    status = exc.get_http_status_code() if isinstance(exc, MlflowException) else None
    message = exc.message if isinstance(exc, MlflowException) else str(exc)
    if any(is_transient(e) for e in chain) or (
        status is not None and (status >= 500 or status == 429)
    ):
        return ServiceUnavailable("MLflow", uri, f"{what}: {message.splitlines()[0][:300]}")
    return MlflowError(f"MLflow at {uri}: {what}: {message.splitlines()[0][:500]}")


_RAISE: Any = object()


def ask_mlflow(what: str, call: Callable[[], T], *, missing: Any = _RAISE) -> T:
    """`call()` against MLflow; a "not found" answer gives `missing` when one is given, every
    other error is raised by `mlflow_failure` (naming MLflow, its URI and `what`)."""
    try:
        return call()
    except Exception as exc:
        if missing is not _RAISE and _not_found(exc):
            return missing
        if _not_found(exc):
            raise NoModelError(f"MLflow at {tracking_uri()}: {what}: not found") from exc
        raise mlflow_failure(exc, what) from exc


def alias_version(model_name: str, alias: str) -> str | None:
    """The version MLflow's `alias` points at; None when the model or the alias doesn't exist."""
    model = ask_mlflow(
        f"read registered model {model_name!r}",
        lambda: mlflow_client().get_registered_model(model_name),
        missing=None,
    )
    if model is None:
        return None
    version = dict(model.aliases or {}).get(alias)
    return str(version) if version is not None else None


def resolve_model_version(model_name: str, model_ref: str | int = CHAMPION) -> str:
    """A concrete version number for an alias (`champion`, `challenger`, ...) or a version."""
    ref = str(model_ref)
    if ref.isdigit():
        found = ask_mlflow(
            f"read {model_name} v{ref}",
            lambda: mlflow_client().get_model_version(model_name, ref),
            missing=None,
        )
        version = str(found.version) if found is not None else None
    else:
        version = alias_version(model_name, ref)
    if version is None:
        what = f"version {ref}" if ref.isdigit() else f"alias @{ref}"
        hint = (
            " No champion yet: train one first (trigger the DAG image_classification, "
            "or run `python -m pipeline train` then `python -m pipeline promote`)."
            if ref == CHAMPION
            else ""
        )
        raise NoModelError(f"registered model {model_name!r} has no {what}.{hint}")
    return version


def version_tags(model_name: str, model_version: str | int) -> dict[str, str]:
    mv = ask_mlflow(
        f"read {model_name} v{model_version}",
        lambda: mlflow_client().get_model_version(model_name, str(model_version)),
    )
    return dict(mv.tags)


def champion_dataset_version(model_name: str) -> str | None:
    """The dataset version the current champion was trained on, or None without a champion."""
    version = alias_version(model_name, CHAMPION)
    return None if version is None else version_tags(model_name, version).get("dataset_version")


def version_trained_on(db: Database, model_name: str, dataset_version: str) -> str | None:
    """The newest registered version of the model (still in MLflow) trained on the train and
    val images of `dataset_version` (its own, or a version's that differs only in test): a run
    on it has nothing new to train, whatever the gate said (champion, kept out, rolled back).

    Only a version this pipeline's training registered counts (`provenance_problem`), and only
    while MLflow's version is the one recorded (a model deleted and made again numbers its
    versions from 1 again): another experiment's or a person's version never stops training."""
    from pipeline import catalog

    rows = db.query(
        "SELECT mv.model_version, mv.run_id, mv.dataset_version FROM model_versions mv"
        " LEFT JOIN dataset_versions d ON d.dataset_version = mv.dataset_version"
        " WHERE mv.model_name = %s AND (mv.dataset_version = %s OR d.training_fingerprint = %s)"
        " ORDER BY mv.model_version DESC",
        (model_name, dataset_version, catalog.training_fingerprint(db, dataset_version)),
    )
    for row in rows:
        version = str(row["model_version"])
        found = ask_mlflow(
            f"read {model_name} v{version}",
            lambda v=version: mlflow_client().get_model_version(model_name, v),
            missing=None,
        )
        if (
            found is not None
            and found.run_id == row["run_id"]
            and dict(found.tags).get("dataset_version") == row["dataset_version"]
            and provenance_problem(model_name, found) is None
        ):
            return version
    return None


def labels_of(tags: dict[str, str]) -> tuple[str, ...]:
    """The label set of a registered version (from its `label_map` tag), sorted."""
    return tuple(sorted(json.loads(tags.get("label_map", "{}"))))


def _label_list(labels: tuple[str, ...] | list[str], shown: int = 12) -> str:
    head = ", ".join(labels[:shown]) + (", ..." if len(labels) > shown else "")
    return f"[{head}] ({len(labels)} labels)"


def label_change_refusal(
    labels: tuple[str, ...] | list[str],
    champion_labels: tuple[str, ...] | list[str],
    *,
    model_name: str,
    champion_version: str,
) -> str | None:
    """Why `labels` may not replace the champion's (None when the label sets are equal)."""
    if sorted(labels) == sorted(champion_labels):
        return None
    return (
        f"label set {_label_list(sorted(labels))} differs from champion {model_name}"
        f" v{champion_version}'s {_label_list(sorted(champion_labels))}"
    )


LABEL_CHANGE_HINT = (
    "give this dataset a model_name of its own, or set allow_label_change=true to replace the"
    " champion on purpose"
)


def check_label_scope(
    model_name: str, dataset_labels: list[str] | dict[str, int], *, allow_label_change: bool
) -> None:
    """Refuse (before any training) a dataset whose labels differ from the champion's.

    Raises:
        LabelSetMismatch: the champion exists, its labels differ and no label change is allowed.
    """
    if allow_label_change:
        return
    champion = alias_version(model_name, CHAMPION)
    if champion is None:
        return
    why = label_change_refusal(
        sorted(dataset_labels),
        labels_of(version_tags(model_name, champion)),
        model_name=model_name,
        champion_version=champion,
    )
    if why:
        raise LabelSetMismatch(f"dataset {why}: {LABEL_CHANGE_HINT}")


def search_filter(conditions: dict[str, str]) -> str:
    """An MLflow search filter: `key='value'` conditions joined by `and`.

    MLflow strips the quotes around a value and unescapes nothing, so each value is quoted with
    a quote it does not contain; a value with both quotes or a backslash cannot be expressed and
    is refused (every filter the pipeline builds goes through here).
    """
    parts = []
    for key, value in conditions.items():
        if "\\" in value or ("'" in value and '"' in value):
            raise ValueError(f"cannot search MLflow for {key} {value!r}: quotes or backslash")
        quote = '"' if "'" in value else "'"
        parts.append(f"{key}={quote}{value}{quote}")
    return " and ".join(parts)


# What the pipeline's training writes on every version it registers (`train.log_and_register`).
OWN_VERSION_TAGS = ("run_key", "dataset_version", "label_map", "image_size", "weights_sha256")


def provenance_problem(model_name: str, mv: Any) -> str | None:
    """Why the registered version `mv` was not made by this pipeline's training; None if it was.

    Its MLflow run must be in the model's experiment (training logs to the experiment named
    like the model) and carry the version's `run_key`, and the version every tag training
    writes, the weights digest included. The pipeline gates, reuses and promotes only such
    versions unless a person names one on purpose (`promote --model-version N`).
    """
    tags = dict(mv.tags)
    missing = [t for t in OWN_VERSION_TAGS if not tags.get(t)]
    if missing:
        return f"it lacks the tags training writes ({', '.join(missing)})"
    if not mv.run_id:
        return "it has no MLflow run"
    run = ask_mlflow(
        f"read run {mv.run_id}", lambda: mlflow_client().get_run(mv.run_id), missing=None
    )
    if run is None:
        return f"its run {mv.run_id} does not exist"
    experiment = ask_mlflow(
        f"read experiment {run.info.experiment_id}",
        lambda: mlflow_client().get_experiment(run.info.experiment_id),
    )
    if experiment.name != model_name:
        return f"its run {mv.run_id} is in experiment {experiment.name!r}, not {model_name!r}"
    if run.data.tags.get("run_key") != tags["run_key"]:
        return f"its run {mv.run_id} is not the training run {tags['run_key']!r}"
    return None


def own_versions(model_name: str, found: Iterable[Any]) -> Iterator[Any]:
    """The versions of `found`, in order, that this pipeline's training registered; each other
    one is named in a warning. Lazy: a caller that needs the first one checks no further."""
    for mv in found:
        problem = provenance_problem(model_name, mv)
        if problem is None:
            yield mv
        else:
            log.warning(
                "ignoring %s v%s: not registered by this pipeline: %s",
                model_name,
                mv.version,
                problem,
            )


def find_version_by_run_key(
    model_name: str, run_key: str, dataset_version: str | None = None
) -> str | None:
    """The version registered by the training run `run_key` (an Airflow run id or `cli__...`).

    None only when MLflow answered that there is none: an unreachable MLflow raises, so a
    retried training never takes an outage for "not registered yet" and registers twice. A
    version tagged with `run_key` by anyone but the pipeline's training is ignored. With
    `dataset_version`, only a version trained on it counts: a run cleared and run again after
    the bucket changed trains on the new dataset version instead of reusing the old one's.
    """
    oldest = next(_run_key_versions(model_name, run_key, dataset_version), None)
    return str(oldest.version) if oldest else None


def _run_key_versions(
    model_name: str, run_key: str, dataset_version: str | None = None
) -> Iterator[Any]:
    """The versions tagged `run_key` (and `dataset_version`, if given) that this pipeline's
    training registered, oldest first."""
    conditions = {"name": model_name, "tags.run_key": run_key}
    if dataset_version is not None:
        conditions["tags.dataset_version"] = dataset_version
    found = ask_mlflow(
        f"search versions of {model_name!r} with run_key {run_key!r}",
        lambda: mlflow_client().search_model_versions(search_filter(conditions)),
    )
    return own_versions(model_name, sorted(found, key=lambda v: int(v.version)))


def settle_registration(
    model_name: str, run_key: str, registered: str, dataset_version: str | None = None
) -> str:
    """The one version of the training run `run_key`, once `registered` was just created.

    MLflow's client retries a POST whose reply was lost (urllib3 `Retry(allowed_methods=None)`):
    the server created the version the first time, so one registration can create two. The
    oldest is kept and returned; later copies of the same MLflow run are deleted before anyone
    can see them as candidates (a version of another run is left alone, with a warning).
    """
    versions = list(_run_key_versions(model_name, run_key, dataset_version))
    if not versions:  # not searchable (yet): what the create answered
        return str(registered)
    kept, *later = versions
    for mv in later:
        if mv.run_id != kept.run_id:
            log.warning(
                "%s v%s carries run_key %r too, from MLflow run %s (not %s): left alone",
                model_name,
                mv.version,
                run_key,
                mv.run_id,
                kept.run_id,
            )
            continue
        log.warning(
            "%s v%s is a second registration of run %s (a create retried after its reply was"
            " lost): deleting it, v%s stays",
            model_name,
            mv.version,
            run_key,
            kept.version,
        )
        ask_mlflow(
            f"delete the duplicate {model_name} v{mv.version}",
            lambda v=mv.version: mlflow_client().delete_model_version(model_name, v),
            missing=None,  # a retried DELETE whose first reply was lost
        )
    return str(kept.version)


def newest_ungated_version(
    db: Database, model_name: str, *, retry_refused: bool = False
) -> str | None:
    """The newest version the pipeline's training registered, if the gate never decided on it.

    What a gate run alone (`airflow tasks test ... promote_model`, no XCom from train_model and
    no version registered under its own run id) should decide on; None when there is nothing new.
    A version the gate refused (other labels) counts as decided unless `retry_refused` (a run
    that allows the label change): each run would refuse it again, and fail before scoring.
    Versions registered elsewhere (a notebook, another job) are skipped with a warning.
    """
    found = ask_mlflow(
        f"search versions of {model_name!r}",
        lambda: mlflow_client().search_model_versions(search_filter({"name": model_name})),
    )
    by_age = sorted(found, key=lambda v: int(v.version), reverse=True)
    newest = next(own_versions(model_name, by_age), None)
    if newest is None or not is_undecided(db, model_name, newest.version, retry_refused):
        return None
    return str(newest.version)


def is_undecided(db: Database, model_name: str, version: str | int, retry_refused: bool) -> bool:
    """Whether the gate never decided on `version` (a refusal counts unless `retry_refused`)."""
    return not db.query(
        "SELECT 1 FROM model_versions WHERE model_name = %s AND model_version = %s"
        " AND decision IS NOT NULL AND (decision <> 'refused' OR %s = 0)",
        (model_name, int(version), int(retry_refused)),
    )


def version_to_gate(
    db: Database,
    model_name: str,
    *,
    run_key: str,
    dataset_version: str | None,
    retry_refused: bool = False,
) -> str | None:
    """The version a gate without its run's training result decides on, or None.

    A run that skipped training (`dataset_version`: the one it checked) gates the version trained
    on that dataset if the gate never decided on it (the run that trained it failed before its
    gate did: nothing else would ever gate it); a version registered for another dataset waits
    for a person. A gate run alone (`airflow tasks test`, no `dataset_version`) gates the version
    registered under `run_key`, else the newest the gate never decided on.
    """
    if dataset_version is not None:
        trained = version_trained_on(db, model_name, dataset_version)
        if trained is not None and is_undecided(db, model_name, trained, retry_refused):
            return trained
        return None
    return find_version_by_run_key(model_name, run_key) or newest_ungated_version(
        db, model_name, retry_refused=retry_refused
    )


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
    """Load a version (or alias, resolved once) for CPU/GPU inference; files cached locally.

    ResNet18 is built from this package and filled with the version's safetensors weights,
    whose SHA-256 must equal the `weights_sha256` tag written at registration: nothing is
    unpickled, and a weights file altered in the artifact store is refused (a local copy that
    does not match is downloaded again first).
    """
    import torch

    from pipeline import model_files
    from pipeline.model import build_model, pick_device

    version = resolve_model_version(model_name, model_ref)
    mv = ask_mlflow(
        f"read {model_name} v{version}",
        lambda: mlflow_client().get_model_version(model_name, version),
    )
    tags = dict(mv.tags)
    if "label_map" not in tags or "image_size" not in tags:
        raise ValueError(
            f"{model_name} v{version} lacks the label_map/image_size tags: it was not registered"
            " by this pipeline"
        )
    label_map = json.loads(tags["label_map"])
    labels = tuple(sorted(label_map, key=label_map.get))
    local = Path(cache_dir) / "models" / safe_name(model_name) / version
    downloaded = not (local / "MLmodel").exists()
    if downloaded:
        _download_model(model_name, version, local)
    what = f"{model_name} v{version}"

    def read_weights() -> dict[str, Any]:
        return model_files.read_weights(
            local, expected_sha256=tags.get("weights_sha256"), what=what
        )

    try:
        state = read_weights()
    except Refusal:
        if downloaded:
            raise  # as the artifact store holds it: refused
        # The local copy may be what was damaged (a disk error, a partial write): once more
        # from the artifact store, which must match.
        log.warning("cached copy of %s does not match its registered weights: downloading", what)
        stale = local.with_name(f"{version}.{uuid.uuid4().hex}.stale")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(local, stale)
        shutil.rmtree(stale, ignore_errors=True)
        _download_model(model_name, version, local)
        state = read_weights()
    module = build_model(len(labels))
    module.load_state_dict(state, strict=True)
    module = module.to(pick_device()).eval().to(memory_format=torch.channels_last)
    return LoadedModel(
        module,
        model_name,
        version,
        mv.run_id,
        labels,
        int(tags["image_size"]),
        tags.get("dataset_version", ""),
    )


# A download directory (`*.tmp`) or a replaced copy (`*.stale`) this old was left by a killed
# process: no download of one model version takes this long.
_PARTIAL_MAX_AGE_S = 3600


def _download_model(model_name: str, version: str, local: Path) -> None:
    """Download the version's MLflow model to `local` (atomically: another process's finished
    download wins, also one that finishes first while this one runs; no partial directory is
    left behind, and those of killed processes are swept)."""
    import mlflow

    _sweep_partial(local.parent)
    tmp = local.with_name(f"{version}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        path = ask_mlflow(
            f"download {model_name} v{version}",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}", dst_path=str(tmp)
            ),
        )
        try:
            os.replace(path, local)
        except OSError as exc:  # a directory is only replaced while empty
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.info("%s v%s: another process's download finished first", model_name, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_partial(models: Path) -> None:
    """Delete download and replaced directories under `models` that killed processes left."""
    now = time.time()
    for path in models.glob("*.*"):
        with contextlib.suppress(FileNotFoundError):
            if (
                path.suffix in (".tmp", ".stale")
                and now - path.stat().st_mtime > _PARTIAL_MAX_AGE_S
            ):
                shutil.rmtree(path, ignore_errors=True)


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
    mv = ask_mlflow(
        f"read {model_name} v{version}",
        lambda: mlflow_client().get_model_version(model_name, str(version)),
    )
    _record_version(db, model_name, str(version), dict(mv.tags), mv.run_id)


def _record_version(
    db: Database, model_name: str, version: str, tags: dict[str, str], run_id: str
) -> None:
    db.execute(
        "INSERT INTO model_versions (model_name, model_version, run_id, dataset_version,"
        " run_key, image_size, n_classes, val_accuracy, created_at)"
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


# ----------------------------------------------------------------------------- alias moves


@contextmanager
def alias_lock(
    db: Database, model_name: str, *, timeout_s: int = ALIAS_LOCK_TIMEOUT_S
) -> Iterator[HeldLock]:
    """Serialise every alias move of `model_name` (gate, promote, rollback) across processes;
    `_move` checks the lock is still held before it moves anything."""
    with named_lock(
        db, alias_lock_name(model_name), timeout_s=timeout_s, what=f"alias move of {model_name!r}"
    ) as held:
        yield held


def alias_lock_name(model_name: str) -> str:
    """The `named_lock` name `alias_lock` holds."""
    return f"alias_moves/{model_name}"


def _recorded_alias(db: Database, model_name: str, alias: str) -> str | None:
    last = db.query(
        "SELECT to_version FROM alias_history WHERE model_name = %s AND alias = %s"
        " ORDER BY id DESC LIMIT 1",
        (model_name, alias),
    )
    return str(last[0]["to_version"]) if last else None


_MOVE_COLUMNS = "(model_name, alias, from_version, to_version, actor, reason, {when})"
_MOVE_VALUES = "VALUES (%s, %s, %s, %s, %s, %s, %s)"


def _move_values(
    model_name: str, alias: str, from_version: str | None, to_version: str, actor: str, reason: str
) -> tuple:
    """One alias move as `_MOVE_COLUMNS` values (history row or intent), stamped now."""
    from_ = int(from_version) if from_version else None
    return (model_name, alias, from_, int(to_version), actor[:255], reason[:512], utc_now())


def _append_history(
    lock: HeldLock,
    model_name: str,
    alias: str,
    from_version: str | None,
    to_version: str,
    *,
    actor: str,
    reason: str,
) -> None:
    """The move's history row, and the end of its intent, in one transaction under `lock`."""
    with lock.transaction() as cur:
        cur.execute(
            f"INSERT INTO alias_history {_MOVE_COLUMNS.format(when='moved_at')} {_MOVE_VALUES}",
            _move_values(model_name, alias, from_version, to_version, actor, reason),
        )
        _drop_intent(cur, model_name, alias)
    log.info("alias %s@%s: %s -> %s (%s)", model_name, alias, from_version, to_version, reason)


def _record_intent(
    lock: HeldLock,
    model_name: str,
    alias: str,
    from_version: str | None,
    to_version: str,
    *,
    actor: str,
    reason: str,
) -> None:
    """Say which move is about to be made in MLflow, by whom and why (before the call)."""
    with lock.transaction() as cur:
        cur.execute(
            f"REPLACE INTO alias_intents {_MOVE_COLUMNS.format(when='created_at')} {_MOVE_VALUES}",
            _move_values(model_name, alias, from_version, to_version, actor, reason),
        )


def _drop_intent(cur: Any, model_name: str, alias: str) -> None:
    cur.execute(
        "DELETE FROM alias_intents WHERE model_name = %s AND alias = %s", (model_name, alias)
    )


def _intent(db: Database, model_name: str, alias: str) -> dict[str, Any] | None:
    rows = db.query(
        "SELECT from_version, to_version, actor, reason FROM alias_intents"
        " WHERE model_name = %s AND alias = %s",
        (model_name, alias),
    )
    return rows[0] if rows else None


def _reconcile(
    db: Database, lock: HeldLock, model_name: str, alias: str, *, actor: str
) -> str | None:
    """Make `alias_history` agree with MLflow for `alias` (caller holds the lock); returns
    MLflow's version. A move whose history row was lost (a process killed between the two
    writes) or made outside the pipeline gets its row now."""
    current = alias_version(model_name, alias)
    recorded = _recorded_alias(db, model_name, alias)
    intent = _intent(db, model_name, alias)
    if current is not None and current != recorded:
        log.warning(
            "alias %s@%s is v%s in MLflow but v%s in alias_history: recording the missing move",
            model_name,
            alias,
            current,
            recorded,
        )
        if _intended(intent, current):  # the pipeline's own move: its actor and reason
            mover, reason = intent["actor"], intent["reason"]
        else:  # a move made outside the pipeline, or one from before alias_intents
            mover = f"reconcile:{actor}"
            reason = (
                f"reconciled with MLflow: @{alias} was at v{current} while alias_history said"
                f" {'v' + recorded if recorded else 'nothing'} (a move whose history row was lost)"
            )
        # Under the lock (a holder whose lock was lost must not interleave rows).
        _append_history(lock, model_name, alias, recorded, current, actor=mover, reason=reason)
    elif intent is not None:  # a move that never reached MLflow (or was recorded already)
        with lock.transaction() as cur:
            _drop_intent(cur, model_name, alias)
    if current is None and recorded is not None:
        log.warning(
            "alias %s@%s is gone from MLflow but alias_history says v%s",
            model_name,
            alias,
            recorded,
        )
    return current


def _intended(intent: dict[str, Any] | None, current: str) -> bool:
    """Whether `intent` is the move to `current` that MLflow shows (its `from_version` is what
    MLflow said before, which history may not: an alias deleted with its version)."""
    return intent is not None and str(intent["to_version"]) == current


def reconcile_aliases(db: Database, model_name: str, *, actor: str) -> dict[str, str | None]:
    """Repair `alias_history` from MLflow for every alias; returns MLflow's {alias: version}."""
    with alias_lock(db, model_name) as lock:
        return {alias: _reconcile(db, lock, model_name, alias, actor=actor) for alias in ALIASES}


def _move(
    db: Database,
    lock: HeldLock,
    model_name: str,
    alias: str,
    version: str,
    *,
    actor: str,
    reason: str,
) -> bool:
    """The move itself, under `lock` (`alias_lock`): its intent (who moves it where, and why),
    MLflow, then the history row. A crash after MLflow's move is repaired by the next
    `_reconcile` from the intent; one before it leaves an intent that `_reconcile` drops. A lock
    whose connection ended (a MySQL restart during a long gate) raises `LockLost` before
    anything moves: another gate may be moving this alias now."""
    current = _reconcile(db, lock, model_name, alias, actor=actor)
    if current == version:
        return False
    _record_intent(lock, model_name, alias, current, version, actor=actor, reason=reason)
    pause_point(PAUSE_BEFORE_ALIAS_MOVE_ENV)
    lock.ensure_held()
    ask_mlflow(
        f"set alias @{alias} of {model_name!r} to v{version}",
        lambda: mlflow_client().set_registered_model_alias(model_name, alias, version),
    )
    pause_point(PAUSE_AFTER_ALIAS_MOVE_ENV)
    _append_history(lock, model_name, alias, current, version, actor=actor, reason=reason)
    return True


def move_alias(
    db: Database, model_name: str, alias: str, version: str, *, actor: str, reason: str
) -> bool:
    """Point `alias` at `version` in MLflow and record the move; a no-op move records nothing."""
    with alias_lock(db, model_name) as lock:
        return _move(db, lock, model_name, alias, str(version), actor=actor, reason=reason)


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
    allow_label_change: bool = False,
    explicit: bool = False,
    require_approval: bool = False,
) -> dict[str, Any]:
    """The promotion gate for `model_version`; returns the decision and both scores.

    Only a version this pipeline's training registered is gated (`provenance_problem`), unless
    `explicit` (a person named it: `promote --model-version N`), which the decision records.

    Decisions: `promoted` (alias champion moved), `challenger` (kept out, alias challenger),
    and with `require_approval` `awaiting_approval` instead of `promoted` (alias challenger until
    a person answers: `review`). Runs under the model's alias lock, after repairing the alias
    history from MLflow.

    Raises:
        LabelSetMismatch: the champion was trained on other labels and `allow_label_change` is
            false (the decision `refused` is recorded; no alias moves).
    """
    from pipeline import catalog

    with alias_lock(db, model_name) as lock:
        for alias in ALIASES:
            _reconcile(db, lock, model_name, alias, actor=actor)
        version, mv, problem = _version_to_gate(model_name, model_version, explicit=explicit)
        tags = dict(mv.tags)
        _record_version(db, model_name, version, tags, mv.run_id)
        row = _version_row(db, model_name, version)
        action, detail = _gate_action(db, model_name, version, row, explicit=explicit)
        if action == "keep_out":
            row = _keep_rolled_back(db, model_name, version, detail)
        elif action == "superseded":
            log.warning("%s v%s: %s (not promoted again)", model_name, version, detail)
        elif action == "decide":
            row = _decide(
                db,
                store,
                model_name,
                version,
                tags,
                min_accuracy=min_accuracy,
                promotion_margin=promotion_margin,
                allow_label_change=allow_label_change,
                require_approval=require_approval,
                cache_dir=cache_dir,
                catalog=catalog,
                note=f"explicit promotion of a version from outside the pipeline ({problem}): "
                if problem
                else "",
            )
        else:
            log.info("gate already decided for v%s: %s (replaying)", version, row["decision"])
        result = _gate_result(model_name, version, row)
        if action == "superseded":
            result["decision"], result["reason"] = "challenger", detail
        elif result["decision"] != "refused" and action != "keep_out":  # kept out: no alias
            alias = CHAMPION if result["decision"] == "promoted" else CHALLENGER
            _move(db, lock, model_name, alias, version, actor=actor, reason=row["decision_reason"])
        _tag_gate_result(result)
    log.info("promotion gate: %s", result)
    if result["decision"] == "refused":
        raise LabelSetMismatch(f"gate refused {model_name} v{version}: {row['decision_reason']}")
    return result


def _gate_action(
    db: Database, model_name: str, version: str, row: dict[str, Any], *, explicit: bool
) -> tuple[str, Any]:
    """What the gate does with `version` now, and with what: `keep_out` (its rollback row),
    `superseded` (why its approval is not replayed), `decide` or `replay` (None)."""
    rolled_back = _rolled_back_from(db, model_name, version)
    # A version a person rolled back is not promoted again unless a person names it.
    if rolled_back is not None and not explicit:
        return "keep_out", rolled_back
    # A person's approval replayed (a cleared run) after the champion moved on: not again.
    if row["decision"] == "promoted" and row["review"] == APPROVED and not explicit:
        superseded = _approval_superseded(db, model_name, version, row)
        if superseded is not None:
            return "superseded", superseded
    # A refusal is no verdict on the model: a rerun (allowing the change, or after the
    # champion moved) decides afresh; so does a promotion over a champion that is gone.
    if (
        row["decision"] in (None, "refused")
        or explicit  # a person asks now, with the thresholds given now
        or rolled_back is not None
        or _promoted_over_another(model_name, version, row)
    ):
        return "decide", None
    return "replay", None


ROLLBACK_REASON = "rollback: "


def _rolled_back_from(db: Database, model_name: str, version: str) -> dict[str, Any] | None:
    """The `alias_history` row of a rollback that moved `champion` off `version`, if that is
    the last champion move to or from it (a version made champion again is no longer "rolled
    back"); else None."""
    rows = db.query(
        "SELECT from_version, actor, reason, moved_at FROM alias_history"
        " WHERE model_name = %s AND alias = %s AND (from_version = %s OR to_version = %s)"
        " ORDER BY id DESC LIMIT 1",
        (model_name, CHAMPION, int(version), int(version)),
    )
    last = rows[0] if rows else None
    if last and last["from_version"] == int(version) and last["reason"].startswith(ROLLBACK_REASON):
        return last
    return None


def _approval_superseded(
    db: Database, model_name: str, version: str, row: dict[str, Any]
) -> str | None:
    """Why a recorded approval of `version` must not move the champion again, or None: since
    the answer, the champion moved to another version (a rollback, another run's gate, a
    person's `promote`). A replay (a retried or cleared task) would take it back from a
    version the reviewer never compared it with."""
    if row["reviewed_at"] is None:
        return None
    rows = db.query(
        "SELECT to_version, actor, reason FROM alias_history WHERE model_name = %s"
        " AND alias = %s AND moved_at >= %s ORDER BY id DESC LIMIT 1",
        (model_name, CHAMPION, row["reviewed_at"]),
    )
    last = rows[0] if rows else None
    if last is None or last["to_version"] == int(version):
        return None
    if last["reason"].startswith(ROLLBACK_REASON):
        return f"approved, then rolled back by {last['actor']}: {last['reason']}"
    return f"approved, then {last['actor']} made v{last['to_version']} champion: {last['reason']}"


def _keep_rolled_back(
    db: Database, model_name: str, version: str, rollback_row: dict[str, Any]
) -> dict[str, Any]:
    """Record why the gate keeps a rolled-back version out (decision `challenger`)."""
    reason = (
        f"rolled back from champion by {rollback_row['actor']} at"
        f" {rollback_row['moved_at']:%Y-%m-%d %H:%M:%S} UTC"
        f" ({rollback_row['reason'].removeprefix(ROLLBACK_REASON)}): the gate does not promote it"
        f" again; `promote --model-version {version}` does"
    )
    log.warning("%s v%s: %s", model_name, version, reason)
    db.execute(
        "UPDATE model_versions SET decision = %s, decision_reason = %s, decided_at = %s"
        " WHERE model_name = %s AND model_version = %s",
        ("challenger", reason[:512], utc_now(), model_name, int(version)),
    )
    return _version_row(db, model_name, version)


def _promoted_over_another(model_name: str, version: str, row: dict[str, Any]) -> bool:
    """True for a gate's `promoted` decision (no person's) compared with a champion that is no
    longer champion: replayed, it would put this version over one it never met (a retry after
    another run promoted a newer version while this one's alias move had failed)."""
    if row["decision"] != "promoted" or row["review"] is not None:
        return False
    champion_now = alias_version(model_name, CHAMPION)
    gated_against = str(row["champion_version"]) if row["champion_version"] else None
    if champion_now in (gated_against, version):
        return False
    log.warning(
        "gate decision for v%s compared it with v%s; the champion is v%s now: deciding again",
        version,
        gated_against,
        champion_now,
    )
    return True


def _version_to_gate(
    model_name: str, model_ref: str, *, explicit: bool
) -> tuple[str, Any, str | None]:
    """(version, its MLflow record, its provenance problem or None) of what the gate is asked
    to decide on; a version from outside the pipeline is refused unless `explicit`."""
    version = resolve_model_version(model_name, model_ref)
    mv = ask_mlflow(
        f"read {model_name} v{version}",
        lambda: mlflow_client().get_model_version(model_name, version),
    )
    problem = provenance_problem(model_name, mv)
    if problem and not explicit:
        raise Refusal(
            f"{model_name} v{version} was not registered by this pipeline's training:"
            f" {problem}. Not gated; to gate it on purpose: python -m pipeline promote"
            f" --model-version {version}"
        )
    return version, mv, problem


def _gate_result(model_name: str, version: str, row: dict[str, Any]) -> dict[str, Any]:
    """`promote`'s result from the version's `model_versions` row."""
    return {
        "model_name": model_name,
        "model_version": version,
        "decision": row["decision"],
        "reason": row["decision_reason"],
        "accuracy": row["gate_accuracy"],
        "champion_version": str(row["champion_version"]) if row["champion_version"] else None,
        "champion_accuracy": row["champion_accuracy"],
        "dataset_version": row["dataset_version"],
        "review": row.get("review"),
        "reviewer": row.get("reviewer"),
        "review_comment": row.get("review_comment"),
    }


def _tag_gate_result(result: dict[str, Any]) -> None:
    """The decision and both scores as `gate_*` tags of the version in MLflow (and the review,
    once a person answered)."""
    name, version = result["model_name"], result["model_version"]
    keys = ["decision", "accuracy", "champion_version", "champion_accuracy"]
    keys += [key for key in ("review", "reviewer") if result.get(key)]
    for key in keys:
        ask_mlflow(
            f"tag {name} v{version}",
            lambda key=key: mlflow_client().set_model_version_tag(
                name, version, f"gate_{key}", str(result[key])
            ),
        )
    # A new decision has no answer yet: an earlier decision's review tags would misattribute it.
    unanswered = {f"gate_{key}" for key in ("review", "reviewer") if not result.get(key)}
    for tag in unanswered & set(version_tags(name, version)):
        ask_mlflow(
            f"untag {name} v{version}",
            lambda tag=tag: mlflow_client().delete_model_version_tag(name, version, tag),
        )


def gate_decision(
    accuracy: float,
    champion_accuracy: float | None,
    *,
    min_accuracy: float,
    promotion_margin: float,
    champion_version: str | None = None,
    label_change: str | None = None,
    allow_label_change: bool = False,
    require_approval: bool = False,
) -> tuple[str, str]:
    """(`promoted` | `challenger` | `refused` | `awaiting_approval`, reason): promote when
    accuracy >= min_accuracy and it is not worse than the champion's by more than
    promotion_margin (no champion: the minimum suffices). `label_change` (from
    `label_change_refusal`) says the champion has other labels: `refused` unless
    `allow_label_change`, which replaces it on the minimum alone. With `require_approval` a
    promotion becomes `awaiting_approval`: a person decides (`review`).
    """
    decision, reason = _verdict(
        accuracy,
        champion_accuracy,
        min_accuracy=min_accuracy,
        promotion_margin=promotion_margin,
        champion_version=champion_version,
        label_change=label_change,
        allow_label_change=allow_label_change,
    )
    if decision == "promoted" and require_approval:
        return AWAITING_APPROVAL, reason
    return decision, reason


def _verdict(
    accuracy: float,
    champion_accuracy: float | None,
    *,
    min_accuracy: float,
    promotion_margin: float,
    champion_version: str | None,
    label_change: str | None,
    allow_label_change: bool,
) -> tuple[str, str]:
    if label_change is not None:
        if not allow_label_change:
            return "refused", f"{label_change}: {LABEL_CHANGE_HINT}"
        if accuracy < min_accuracy:
            return "challenger", f"accuracy {accuracy:.4f} below min_accuracy {min_accuracy}"
        return "promoted", (
            f"allow_label_change: {label_change}; replaced without comparing,"
            f" accuracy {accuracy:.4f} >= min {min_accuracy}"
        )
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
    db,
    store,
    model_name,
    version,
    tags,
    *,
    min_accuracy,
    promotion_margin,
    allow_label_change,
    require_approval,
    cache_dir,
    catalog,
    note="",
) -> dict[str, Any]:
    champion_version = alias_version(model_name, CHAMPION)
    if champion_version == version:
        champion_version = None  # promoted earlier by hand: compare with nothing
    label_change = champion_tags = None
    if champion_version is not None:
        champion_tags = version_tags(model_name, champion_version)
        label_change = label_change_refusal(
            labels_of(tags),
            labels_of(champion_tags),
            model_name=model_name,
            champion_version=champion_version,
        )
    records, split, left_out = gate_images(
        db, catalog, tags, None if label_change else champion_tags, champion_version
    )
    candidate = load_model(model_name, version, cache_dir=cache_dir)
    accuracy, n = accuracy_on(candidate, store, records, cache_dir=cache_dir)
    champion_accuracy = None
    # A champion on other labels is never evaluated here: its accuracy on this dataset's
    # images means nothing (a ten-digit model on two-class photos scores 0).
    if champion_version is not None and label_change is None:
        champion = load_model(model_name, champion_version, cache_dir=cache_dir)
        champion_accuracy, _ = accuracy_on(champion, store, records, cache_dir=cache_dir)
    decision, reason = gate_decision(
        accuracy,
        champion_accuracy,
        min_accuracy=min_accuracy,
        promotion_margin=promotion_margin,
        champion_version=champion_version,
        label_change=label_change,
        allow_label_change=allow_label_change,
        require_approval=require_approval,
    )
    reason = f"{note}{reason} on {n} {split} images{left_out}"
    if decision == AWAITING_APPROVAL:
        reason += AWAITING_SUFFIX
    db.execute(
        # A new decision supersedes a person's answer to an earlier one (a version re-gated by
        # name after a rollback is asked again, not answered by a replay of the old answer).
        "UPDATE model_versions SET gate_accuracy = %s, champion_version = %s,"
        " champion_accuracy = %s, decision = %s, decision_reason = %s, decided_at = %s,"
        " review = NULL, reviewer = NULL, review_comment = NULL, reviewed_at = NULL"
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
    return _version_row(db, model_name, version)


def gate_images(
    db: Database,
    catalog,
    tags: dict[str, str],
    champion_tags: dict[str, str] | None,
    champion_version: str | None,
) -> tuple[list, str, str]:
    """The labelled images the gate compares on, their split, and what was left out (a note).

    The candidate's gate split (its `gate_split` tag: val, or test for a model trained on val),
    less the images the champion was trained on (`_trained_on`: the same image, or the same
    content under another key): a model scored on its own training images looks better than
    it is. Where that leaves none (the champion trained on this very split, `train_on_val`,
    or train images moved into val/), the test split less the same images.
    """
    dataset = tags["dataset_version"]
    split = tags.get("gate_split", "val")
    records = catalog.dataset_images(db, dataset, [split])
    if not records:
        raise Refusal(
            f"dataset {dataset} has no {split} images: the gate cannot compare"
            + (" (raise val_percent, or add a val/ split)" if split == "val" else "")
        )
    seen = _trained_on(db, catalog, champion_tags, dataset)
    kept = [r for r in records if r.image_id not in seen]
    if len(kept) == len(records):
        return records, split, ""
    left = len(records) - len(kept)
    note = f" ({left} {split} image{'s' * (left != 1)} left out: champion v{champion_version}"
    if not kept and split != "test":
        split = "test"
        kept = [r for r in catalog.dataset_images(db, dataset, [split]) if r.image_id not in seen]
        note = f" (val left out: champion v{champion_version}"
    if not kept:
        raise Refusal(
            f"champion v{champion_version} was trained on every val and test image of dataset"
            f" {dataset}: the gate cannot compare the two fairly; add images the champion has"
            " not seen, or promote by hand (`promote --model-version N`)"
        )
    return kept, split, f"{note} trained on them)"


def _trained_on(
    db: Database, catalog, champion_tags: dict[str, str] | None, dataset_version: str
) -> set[int]:
    """Images of `dataset_version` the champion was trained on (`catalog.trained_members`):
    its dataset version's train split (and val, for a model trained on val)."""
    if not champion_tags or not champion_tags.get("dataset_version"):
        return set()
    subsets = ["train", "val"] if champion_tags.get("gate_split") == "test" else ["train"]
    try:
        return catalog.trained_members(
            db, champion_tags["dataset_version"], subsets, among=dataset_version
        )
    except LookupError:  # a champion from outside this catalog (promoted by name)
        log.warning(
            "the champion's dataset version %s is not in this catalog: the gate cannot leave out"
            " the images it was trained on",
            champion_tags["dataset_version"],
        )
        return set()


def _version_row(db: Database, model_name: str, version: str) -> dict[str, Any]:
    """The version's `model_versions` row (lineage, the gate's decision, the review)."""
    rows = db.query(
        "SELECT * FROM model_versions WHERE model_name = %s AND model_version = %s",
        (model_name, int(version)),
    )
    if not rows:
        raise NoModelError(f"{model_name} v{version} has no model_versions row: never gated")
    return rows[0]


def recorded_review(
    db: Database, model_name: str, model_version: str
) -> tuple[str, str | None, str] | None:
    """(outcome, reviewer, comment) already written for the version, or None."""
    row = _version_row(db, model_name, str(int(model_version)))
    if row["review"] is None:
        return None
    return row["review"], row["reviewer"], row["review_comment"] or ""


def review_reason(outcome: str, reviewer: str | None, comment: str, gate_reason: str) -> str:
    """The decision reason after a person's answer (or its timeout), the gate's reason kept."""
    gate = gate_reason.removesuffix(AWAITING_SUFFIX)
    said = f": {comment.strip()}" if comment and comment.strip() else ""
    if outcome == APPROVED:
        return f"approved by {reviewer}{said} (gate: {gate})"
    if outcome == REJECTED:
        return f"rejected by {reviewer}{said} (gate: {gate})"
    return f"approval timed out: nobody answered, nothing moved (gate: {gate})"


def review(
    db: Database,
    model_name: str,
    model_version: str,
    outcome: str,
    *,
    reviewer: str | None,
    comment: str = "",
    actor: str,
) -> dict[str, Any]:
    """A person's answer to a version `awaiting_approval` (or the timeout of the question).

    `approved`: decision `promoted`, alias champion moves (alias_history's actor names the
    reviewer). `rejected` and `timed_out`: decision `challenger`, nothing moves. The answer,
    reviewer and comment are written to `model_versions` before any alias moves, so a retry
    after a crash replays them (and finishes the move) instead of asking again.

    Raises:
        Refusal: the version is not awaiting approval, or was already answered otherwise.
    """
    if outcome not in REVIEWS:
        raise ValueError(f"review outcome {outcome!r}; expected one of: {', '.join(REVIEWS)}")
    if outcome != TIMED_OUT and not reviewer:
        raise ValueError(f"a review that {outcome} needs the reviewer's name")
    version = str(int(model_version))
    with alias_lock(db, model_name) as lock:
        for alias in ALIASES:
            _reconcile(db, lock, model_name, alias, actor=actor)
        row = _version_row(db, model_name, version)
        if row["review"] is not None:
            if row["review"] != outcome:
                raise Refusal(
                    f"{model_name} v{version} was already {row['review']}"
                    f" ({row['decision_reason']}); not {outcome} now"
                )
            log.info("review of v%s already recorded: %s (replaying)", version, outcome)
        elif row["decision"] != AWAITING_APPROVAL:
            raise Refusal(
                f"{model_name} v{version} is not awaiting approval (gate decision:"
                f" {row['decision']}): not {outcome}"
            )
        else:
            row = _write_review(db, model_name, version, row, outcome, reviewer, comment)
        result = _gate_result(model_name, version, row)
        superseded = _approval_superseded(db, model_name, version, row)
        if outcome == APPROVED and superseded is not None:
            log.warning("the approval of v%s is not applied again: %s", version, superseded)
            result["decision"], result["reason"] = "challenger", superseded
        elif outcome == APPROVED and row["decision"] == "promoted":
            _move(
                db,
                lock,
                model_name,
                CHAMPION,
                version,
                actor=f"reviewer:{reviewer}",
                reason=row["decision_reason"],
            )
        _tag_gate_result(result)
    log.info("review: %s", result)
    return result


def _write_review(
    db: Database,
    model_name: str,
    version: str,
    row: dict[str, Any],
    outcome: str,
    reviewer: str | None,
    comment: str,
) -> dict[str, Any]:
    """The answer into the version's row (decision, reason, reviewer, comment); its new row.

    An approval promotes only over the champion the gate compared with (the person saw that
    comparison): when the champion moved while the question waited (a person's promote or
    rollback), the version stays challenger and the reason says to gate it again."""
    reason = review_reason(outcome, reviewer, comment, row["decision_reason"] or "")
    champion_now = alias_version(model_name, CHAMPION)
    gated_against = str(row["champion_version"]) if row["champion_version"] else None
    # (None at the gate and the version itself now: it was champion already when gated.)
    promoted = outcome == APPROVED and champion_now in (gated_against, version)
    if outcome == APPROVED and not promoted:
        log.warning(
            "champion moved while v%s awaited approval (v%s at the gate, v%s now): not promoted",
            version,
            gated_against,
            champion_now,
        )
        reason = (
            f"champion was v{gated_against} at the gate, v{champion_now} at approval: not"
            f" promoted over a version it was not compared with (gate it again by name:"
            f" promote --model-version {version}); {reason}"
        )
    db.execute(
        "UPDATE model_versions SET decision = %s, decision_reason = %s, review = %s,"
        " reviewer = %s, review_comment = %s, reviewed_at = %s"
        " WHERE model_name = %s AND model_version = %s",
        (
            "promoted" if promoted else "challenger",
            reason[:512],
            outcome,
            (reviewer or None) and reviewer[:255],
            (comment or None) and comment[:1024],
            utc_now(),
            model_name,
            int(version),
        ),
    )
    return _version_row(db, model_name, version)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#!|~])")


def markdown_text(value: Any) -> str:
    """`value` as literal Markdown text on one line: a label, key or MLflow tag in a reviewer's
    question shows as written, never as a link, an image, a heading or a table cell."""
    flat = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat)


def approval_request(
    db: Database, model_name: str, model_version: str, *, results_url: str | None = None
) -> tuple[str, str]:
    """(subject, Markdown body) of the question a reviewer sees: both scores, the dataset and
    model versions, links to the version and its training run in MLflow and to the results."""
    version = str(int(model_version))
    row = _version_row(db, model_name, version)
    ui = mlflow_ui_url()
    experiment = ask_mlflow(
        f"read run {row['run_id']}", lambda: mlflow_client().get_run(row["run_id"])
    ).info.experiment_id
    champion = (
        f"v{row['champion_version']}: {row['champion_accuracy']:.4f}"
        if row["champion_version"] and row["champion_accuracy"] is not None
        else "none to compare with"
    )
    lines = [
        f"The promotion gate would make **{markdown_text(model_name)} v{version}** the champion.",
        "",
        "| | |",
        "|---|---|",
        f"| candidate accuracy | v{version}: {row['gate_accuracy']:.4f} |",
        f"| champion accuracy | {champion} |",
        f"| dataset version | {markdown_text(row['dataset_version'])} |",
        f"| gate | {markdown_text(row['decision_reason'])} |",
        f"| trained by run | {markdown_text(row['run_key'])} |",
        "",
        f"- [model version in MLflow]({ui}/#/models/{model_name}/versions/{version})",
        f"- [training run in MLflow]({ui}/#/experiments/{experiment}/runs/{row['run_id']})",
    ]
    if results_url:
        lines.append(f"- [results page]({results_url})")
    lines += [
        "",
        "**Approve**: the champion moves to this version and this run scores with it."
        " **Reject**: it stays challenger and the run scores with the current champion.",
    ]
    return f"Promote {model_name} v{version} to champion?", "\n".join(lines)


def rollback(db: Database, model_name: str, model_version: str, *, actor: str, reason: str) -> dict:
    """Move `champion` back to an earlier registered version (which must exist)."""
    with alias_lock(db, model_name) as lock:
        version = resolve_model_version(model_name, model_version)
        mv = ask_mlflow(
            f"read {model_name} v{version}",
            lambda: mlflow_client().get_model_version(model_name, version),
        )
        _record_version(db, model_name, version, dict(mv.tags), mv.run_id)
        _reconcile(db, lock, model_name, CHALLENGER, actor=actor)
        moved = _move(
            db, lock, model_name, CHAMPION, version, actor=actor, reason=ROLLBACK_REASON + reason
        )
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
    parser.add_argument(
        "--allow-label-change",
        action="store_true",
        help=RUN_PARAMS["allow_label_change"].description,
    )
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
            allow_label_change=args.allow_label_change,
            explicit=True,  # a person named the version
        )
    for key, value in result.items():
        print(f"{key:<18} {value}")
    return 0


def add_review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-version", required=True, help="version awaiting approval")
    answer = parser.add_mutually_exclusive_group(required=True)
    answer.add_argument("--approve", action="store_true", help="make it champion")
    answer.add_argument("--reject", action="store_true", help="keep it challenger")
    parser.add_argument("--comment", default="", help="why (kept in model_versions)")


def cli_review(args: argparse.Namespace, settings: Any) -> int:
    """Answer a promotion awaiting approval from a terminal, e.g. one whose Airflow run was
    cancelled while it waited; the reviewer is the login name."""
    reviewer = f"cli:{os.environ.get('USER', 'unknown')}"
    result = review(
        Database(settings.mysql),
        settings.model_name,
        args.model_version,
        APPROVED if args.approve else REJECTED,
        reviewer=reviewer,
        comment=args.comment,
        actor=reviewer,
    )
    for key, value in result.items():
        print(f"{key:<18} {value}")
    return 0
