"""Training stage: ResNet18 on one dataset version, checkpointed per epoch, logged and registered in MLflow.

Shaped like torchvision's reference recipe: `train_model` is its `main`, composed of named steps
(`skip_or_reuse`, `load_data`, `build_training`, `resume_state`, `run_epochs` over
`train_one_epoch` and `evaluate`, `finish_run`). The DAG's `train_model` task and
`python -m pipeline train` call `train_model`, which returns references only (MLflow run id,
model version). What to train with, and whether to, is `pipeline.train_plan`'s (torch-free).

Retries: a checkpoint (model, optimizer, scheduler, RNG states, history, MLflow run id) is saved
after every epoch under `<model_name>/<run_key>/last.pt` in durable storage; a retried or killed
task with the same `run_key` (the Airflow run id) resumes after the last finished epoch and
keeps logging to the same MLflow run. Registration is keyed by `run_key` too, so a retry after
registration returns the version it already made. One attempt of a `run_key` trains at a time
(a MySQL named lock): one started while another still runs waits for it, then reuses or resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
import torchvision
from torch import nn

from pipeline import catalog, drift, model_files, registry
from pipeline.config import pause_point
from pipeline.data import (
    DeviceBatches,
    EvalPreset,
    ImageCache,
    ImageDataset,
    ImageDecodeError,
    MissingObjectError,
    TrainPreset,
    decode_image,
    default_num_workers,
    make_loader,
    to_model_input,
)
from pipeline.db import Database, HeldLock, named_lock, utc_now
from pipeline.errors import Refusal
from pipeline.model import build_model, freeze_backbone, pick_device, training_autocast
from pipeline.params import cli_run_key
from pipeline.records import ImageRecord
from pipeline.score import compute_metrics
from pipeline.store import ObjectStore, location_from_args
from pipeline.train_plan import TrainParams, decide_training

log = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0
# Below this many val images, early stopping picks epochs by noise (bench/results/train.md: on 33
# images, patience 3 stopped every seed at a chance-level epoch).
SMALL_VAL = 200
# How long an attempt waits for another attempt of its run key: the DAG task's execution_timeout.
TRAIN_LOCK_TIMEOUT_S = 6 * 3600
# Test-only pause point (seconds) after each epoch's checkpoint: a fault test stalls an attempt
# there, as a lost worker would. Unset in every deployment.
PAUSE_AFTER_CHECKPOINT_ENV = "PIPELINE_TEST_PAUSE_AFTER_CHECKPOINT_S"


def train_model(
    db: Database,
    store: ObjectStore,
    dataset_version: str,
    params: TrainParams,
    *,
    model_name: str,
    run_key: str,
    cache_dir: str | Path,
    checkpoint_store,
    force_retrain: bool = False,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Train on `dataset_version`, log to MLflow, register a version; returns references.

    Returns `{"skipped": True, ...}` when the champion was trained on this dataset version
    (unless `force_retrain`), and the already registered version when `run_key` made one.
    The run goes to the experiment named like the model; another `experiment` (benchmarks)
    registers versions the gate will not take (`registry.provenance_problem`).
    """
    catalog.get_dataset(db, dataset_version)  # LookupError for an unknown version
    # One attempt of a run key trains at a time: a retry (or `airflow tasks test`) started while
    # another attempt still trains (a zombie, a lost worker) waits for it, then reuses the
    # version it registered or resumes from its checkpoint.
    with named_lock(
        db,
        training_lock_name(model_name, run_key),
        timeout_s=TRAIN_LOCK_TIMEOUT_S,
        what=f"attempt of training run {run_key!r} of {model_name!r}",
    ) as lock:
        done = skip_or_reuse(
            db,
            dataset_version,
            model_name=model_name,
            run_key=run_key,
            force_retrain=force_retrain,
        )
        if done is not None:
            return done
        return train_and_register(
            db,
            store,
            dataset_version,
            params,
            model_name=model_name,
            run_key=run_key,
            cache_dir=cache_dir,
            checkpoint_store=checkpoint_store,
            experiment=experiment,
            lock=lock,
        )


def training_lock_name(model_name: str, run_key: str) -> str:
    """The `named_lock` an attempt of `run_key` holds while it trains and registers."""
    return f"train/{model_name}/{run_key}"


def train_and_register(
    db: Database,
    store: ObjectStore,
    dataset_version: str,
    params: TrainParams,
    *,
    model_name: str,
    run_key: str,
    cache_dir: str | Path,
    checkpoint_store,
    experiment: str | None,
    lock: HeldLock,
) -> dict[str, Any]:
    """`train_model`'s work under its lock: load the data, resume or start, run the epochs in
    the MLflow run, register. Checkpoints and the registration happen only while `lock` holds."""
    import mlflow

    checkpoint_store = RecordedCheckpoints(checkpoint_store, db)
    seed_everything(params.seed)
    device = pick_device()
    data = load_data(
        db, store, dataset_version, params, cache_dir=cache_dir, on_gpu=device.type == "cuda"
    )
    _warn_of_noisy_stopping(params, len(data["val_records"]))
    training = build_training(params, device, data, store=store)
    ckpt_name = checkpoint_name(model_name, run_key)
    identity = checkpoint_identity(dataset_version, params)
    records = (data["train_records"], data["val_records"])
    experiment_id = mlflow.set_experiment(experiment or model_name).experiment_id
    progress = resume_state(
        training,
        checkpoint_store,
        ckpt_name,
        identity,
        records=records,
        run_problem=partial(unresumable_run, experiment_id=experiment_id, run_key=run_key),
    )
    num_workers = default_num_workers() if params.num_workers is None else params.num_workers
    train_loader, val_loader = build_loaders(
        data, params, device, num_workers=num_workers, epoch=progress.epoch + 1
    )

    def save() -> None:
        state = checkpoint_state(
            training, progress, identity, label_map=data["label_map"], records=records
        )
        lock.ensure_held()
        save_checkpoint(checkpoint_store, ckpt_name, state)
        pause_point(PAUSE_AFTER_CHECKPOINT_ENV)

    with mlflow.start_run(
        run_id=progress.run_id, run_name=None if progress.run_id else f"train {run_key}"[:250]
    ) as run:
        if progress.run_id is None:
            log_run_params(
                data,
                params,
                training,
                dataset_version=dataset_version,
                model_name=model_name,
                run_key=run_key,
                num_workers=num_workers,
            )
        else:
            log_unlogged_epochs(progress.run_id, progress.history)
        progress.run_id = run.info.run_id
        run_epochs(training, progress, train_loader, val_loader, params, save=save)
        lock.ensure_held()
        result = finish_run(
            db,
            store,
            training,
            progress,
            data,
            val_loader,
            model_name=model_name,
            run_key=run_key,
            dataset_version=dataset_version,
            params=params,
        )
    checkpoint_store.delete(ckpt_name)
    return result


def _warn_of_noisy_stopping(params: TrainParams, n_val: int) -> None:
    if params.patience and n_val < SMALL_VAL:
        log.warning(
            "early stopping on %d val images: their accuracy is mostly noise and may stop at a"
            " chance-level epoch (bench/results/train.md); consider patience 0",
            n_val,
        )


def skip_or_reuse(
    db: Database, dataset_version: str, *, model_name: str, run_key: str, force_retrain: bool
) -> dict[str, Any] | None:
    """The result of a run that needs no training, or None to train.

    Skipped when the champion or another version was trained on `dataset_version` (unless
    `force_retrain`); reused when `run_key` already registered a version (a retry after
    registration).
    """
    if not force_retrain and registry.champion_dataset_version(model_name) == dataset_version:
        champion = registry.resolve_model_version(model_name, registry.CHAMPION)
        log.info("dataset %s unchanged since champion v%s: skipping", dataset_version, champion)
        return {
            "skipped": True,
            "reason": "dataset unchanged since the champion was trained",
            "dataset_version": dataset_version,
            "champion_version": champion,
        }
    existing = registry.find_version_by_run_key(model_name, run_key, dataset_version)
    if not existing:
        trained = (
            None if force_retrain else registry.version_trained_on(db, model_name, dataset_version)
        )
        if trained is None:
            return None
        log.info("dataset %s already trained: v%s; skipping", dataset_version, trained)
        return {
            "skipped": True,
            "reason": f"dataset already trained: v{trained} (force_retrain trains it again)",
            "dataset_version": dataset_version,
            "trained_version": trained,
        }
    # A crash between registering and settling may have left a duplicate behind.
    existing = registry.settle_registration(model_name, run_key, existing, dataset_version)
    mv = registry.mlflow_client().get_model_version(model_name, existing)
    log.info("run %s already registered %s v%s: nothing to train", run_key, model_name, existing)
    registry.record_version(db, model_name, existing)  # a crash may have come between
    return {
        "skipped": False,
        "reused": True,
        "model_version": existing,
        "run_id": mv.run_id,
        "dataset_version": dataset_version,
    }


# ----------------------------------------------------------------------------- checkpoints


# Under PIPELINE_WORK_BUCKET (pipeline.config.work_bucket), outside MLflow's `artifacts/` root.
CHECKPOINT_PREFIX = "imgpipe-work/checkpoints"


class S3CheckpointStore:
    """Checkpoints as objects under `prefix` in the pipeline's own work bucket.

    `store` is the work bucket (`pipeline.config.work_bucket`), never the image bucket: whoever
    may upload images must not be able to plant what training loads back. Pass `image_bucket`
    and a store in it is refused.
    """

    def __init__(
        self, store, prefix: str = CHECKPOINT_PREFIX, *, image_bucket: str | None = None
    ) -> None:
        if image_bucket is not None and store.bucket == image_bucket:
            raise ValueError(
                f"checkpoints must not live in the image bucket {image_bucket!r}; "
                "set PIPELINE_WORK_BUCKET (default: MLFLOW_ARTIFACT_BUCKET) to a bucket only "
                "the pipeline writes"
            )
        self.store, self.prefix = store, prefix.strip("/")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def load(self, name: str) -> bytes | None:
        if self.store.head(self._key(name)) is None:
            return None
        return self.store.get_bytes(self._key(name))

    def save(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self._key(name), data)  # a PUT replaces atomically

    def delete(self, name: str) -> None:
        self.store.delete(self._key(name))

    def describe(self, name: str) -> str:
        return f"s3://{self.store.bucket}/{self._key(name)}"


class LocalCheckpointStore:
    """Checkpoints as files under `root` (written to a temp file, then renamed)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None

    def save(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def describe(self, name: str) -> str:
        return str(self.root / name)


class RecordedCheckpoints:
    """A checkpoint store (`S3CheckpointStore`, `LocalCheckpointStore`) whose loads must match
    a digest recorded in MySQL when the pipeline saved there (table `checkpoints`).

    The work bucket is MLflow's artifact bucket by default, which MLflow's users can write
    through its artifact proxy: a checkpoint put there by anyone else (their weights at the
    last epoch: registered as the pipeline's, with a digest of their own) is refused with a
    warning naming it, and training starts over; its first save replaces it. The digest of a
    save being uploaded is accepted too: a save killed or failed mid-upload resumes from
    whichever of the two the store holds, not from nothing.
    """

    def __init__(self, store, db: Database) -> None:
        self.store, self.db = store, db

    def _key(self, name: str) -> tuple[str, str]:
        location = self.describe(name)
        return location, hashlib.sha256(location.encode()).hexdigest()

    def load(self, name: str) -> bytes | None:
        data = self.store.load(name)
        if data is None:
            return None
        location, key = self._key(name)
        rows = self.db.query(
            "SELECT sha256, pending_sha256 FROM checkpoints WHERE location_sha256 = %s", (key,)
        )
        digest = hashlib.sha256(data).hexdigest()
        if not rows or digest not in (rows[0]["sha256"], rows[0]["pending_sha256"]):
            log.warning(
                "checkpoint %s refused: not one this pipeline saved there (its SHA-256 %s is not"
                " the one recorded in MySQL); starting over",
                location,
                digest[:12],
            )
            return None
        return data

    def save(self, name: str, data: bytes) -> None:
        """Record the digest as pending, upload, then record it as saved: whatever fails in
        between, the store holds bytes of one of the two recorded digests."""
        location, key = self._key(name)
        digest = hashlib.sha256(data).hexdigest()
        self.db.execute(
            "INSERT INTO checkpoints (location_sha256, location, sha256, pending_sha256,"
            " size_bytes, saved_at) VALUES (%s, %s, NULL, %s, %s, %s) ON DUPLICATE KEY UPDATE"
            " pending_sha256 = VALUES(pending_sha256), size_bytes = VALUES(size_bytes),"
            " saved_at = VALUES(saved_at)",
            (key, location[:2048], digest, len(data), utc_now()),
        )
        self.store.save(name, data)
        self.db.execute(
            "UPDATE checkpoints SET sha256 = %s, pending_sha256 = NULL"
            " WHERE location_sha256 = %s AND pending_sha256 = %s",
            (digest, key, digest),
        )

    def delete(self, name: str) -> None:
        self.store.delete(name)
        self.db.execute("DELETE FROM checkpoints WHERE location_sha256 = %s", (self._key(name)[1],))

    def describe(self, name: str) -> str:
        return self.store.describe(name)


def checkpoint_name(model_name: str, run_key: str) -> str:
    """The checkpoint's name in its store: `<model_name>/<run_key>/last.pt`, made path-safe."""
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in f"{model_name}/{run_key}")
    return f"{safe}/last.pt"


def plain_data(value: Any, where: str = "checkpoint") -> Any:
    """`value` as tensors and plain data only (what `torch.load(weights_only=True)` accepts).

    NumPy scalars become Python numbers; anything else that is not a tensor, a number, a string,
    None, or a dict/list/tuple of those raises TypeError naming where it is, at save time rather
    than as a refused checkpoint at resume.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, plain_data(v, f"{where}[{k!r}]")) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(plain_data(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"{where} is a {type(value).__name__}: a checkpoint holds tensors and plain data only"
    )


def save_checkpoint(store, name: str, state: dict[str, Any]) -> None:
    """Write `state` (`checkpoint_state`) as checkpoint `name` of `store`, replacing it whole."""
    buffer = io.BytesIO()
    torch.save(plain_data(state), buffer)
    store.save(name, buffer.getvalue())


def load_checkpoint(store, name: str) -> dict[str, Any] | None:
    """Checkpoint `name` of `store` (tensors on the CPU), or None when there is none or it is refused.

    Loaded with `weights_only=True`: tensors and plain data only, never code. Bytes that are not
    such a checkpoint (a planted pickle, a truncated upload) are refused with a warning naming
    them, and training starts over; its first save replaces them.
    """
    data = store.load(name)
    if data is None:
        return None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, they are not our checkpoint
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        log.warning(
            "checkpoint %s refused: not tensors and plain data (%s); starting over",
            store.describe(name),
            reason,
        )
        return None
    if not isinstance(state, dict):
        log.warning(
            "checkpoint %s refused: holds a %s, not a dict; starting over",
            store.describe(name),
            type(state).__name__,
        )
        return None
    return state


def checkpoint_identity(dataset_version: str, params: TrainParams) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed: the same data and params."""
    return {"dataset_version": dataset_version, "params": asdict(params)}


def resumable(state: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint (None: none) continues the run `identity` describes."""
    return state is not None and state.get("identity") == identity


def resume_state(
    training: Training,
    checkpoint_store,
    ckpt_name: str,
    identity: dict[str, Any],
    *,
    records: tuple[Sequence[ImageRecord], Sequence[ImageRecord]],
    run_problem: Callable[[str], str | None] | None = None,
) -> Progress:
    """The run's progress: from its checkpoint when there is one for `identity`, else fresh.
    `run_problem(run_id)` says why the checkpoint's MLflow run cannot be continued (deleted,
    another experiment's or run key's): then the training starts over in a new run.

    Resuming restores the model, optimizer, schedule and RNG into `training`; a checkpoint for
    other data or params is ignored (and overwritten after the first epoch). `records` are this
    attempt's (train, val) images: the ones that failed to decode before are found among them
    by image id (an image left out since, gone or rejected, is no longer one of them).
    """
    state = load_checkpoint(checkpoint_store, ckpt_name)
    if not resumable(state, identity):
        if state is not None:
            log.warning("checkpoint %s is for other data/params: starting over", ckpt_name)
        return Progress()
    problem = run_problem(state["run_id"]) if run_problem is not None else None
    if problem:
        log.warning("checkpoint %s: %s: starting over in a new run", ckpt_name, problem)
        return Progress()
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    log.info(
        "resuming from %s after epoch %d", checkpoint_store.describe(ckpt_name), state["epoch"]
    )
    return Progress(
        epoch=state["epoch"],
        history=state["history"],
        best=state["best"],
        run_id=state["run_id"],
        stopped_early=state.get(
            "stopped_early",  # a checkpoint from before it was saved: the same rule
            patience_exhausted(
                state["epoch"], state["best"]["epoch"], identity["params"]["patience"]
            ),
        ),
        bad_train=_indices_of(state.get("bad_train_ids", ()), records[0]),
        bad_val=_indices_of(state.get("bad_val_ids", ()), records[1]),
    )


def unresumable_run(run_id: str, *, experiment_id: str, run_key: str) -> str | None:
    """Why the MLflow run `run_id` of a checkpoint cannot be continued, or None. An MLflow
    outage raises (`ServiceUnavailable`): it is no reason to start hours of training over."""
    from pipeline import registry

    run = registry.ask_mlflow(
        f"read run {run_id}", lambda: registry.mlflow_client().get_run(run_id), missing=None
    )
    if run is None:
        return f"its MLflow run {run_id} is gone"
    if run.info.lifecycle_stage != "active":
        return f"its MLflow run {run_id} was deleted"
    if run.info.experiment_id != experiment_id:
        return f"its MLflow run {run_id} is of experiment {run.info.experiment_id}"
    if run.data.tags.get("run_key") != run_key:
        return f"its MLflow run {run_id} is run key {run.data.tags.get('run_key')!r}'s"
    return None


def _indices_of(image_ids: Iterable[int], records: Sequence[ImageRecord]) -> set[int]:
    wanted = set(image_ids)
    return {i for i, record in enumerate(records) if record.image_id in wanted}


def checkpoint_state(
    training: Training,
    progress: Progress,
    identity: dict[str, Any],
    *,
    label_map: dict[str, int],
    records: tuple[Sequence[ImageRecord], Sequence[ImageRecord]],
) -> dict[str, Any]:
    """What a checkpoint holds after `progress.epoch`: all `resume_state` restores, and more.
    Images that failed to decode are saved by image id (`records`: the (train, val) images the
    loaders' indices point into), since a retry may load fewer of them."""
    return {
        "identity": identity,
        "epoch": progress.epoch,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": progress.history,
        "best": progress.best,
        "run_id": progress.run_id,
        "stopped_early": progress.stopped_early,
        "bad_train_ids": sorted(records[0][i].image_id for i in progress.bad_train),
        "bad_val_ids": sorted(records[1][i].image_id for i in progress.bad_val),
        "label_map": label_map,
    }


# ----------------------------------------------------------------------------- data


def load_data(
    db: Database,
    store: ObjectStore,
    dataset_version: str,
    params: TrainParams,
    *,
    cache_dir: str | Path,
    on_gpu: bool = False,
) -> dict[str, Any]:
    """Train and val datasets of a dataset version, fetched into the content-keyed cache.

    Objects gone since the scan are marked rejected and left out. `on_gpu`: JPEGs come as bytes
    for nvJPEG (`data.DeviceBatches`) and the random crop and jitter run on the device on whole
    batches (`TrainPreset.on_device`). `labels` are the class names in index order.
    """
    info = catalog.get_dataset(db, dataset_version)
    label_map: dict[str, int] = info["label_map"]
    train_records = catalog.dataset_images(db, dataset_version, ["train"])
    val_records = _of_trained_labels(
        catalog.dataset_images(db, dataset_version, ["val"]), label_map, dataset_version
    )
    if not train_records:
        raise ValueError(f"dataset {dataset_version} has no train images")
    if not val_records:
        raise ValueError(
            f"dataset {dataset_version} has no validation images (add a val/ split or "
            "raise val_percent)"
        )
    if params.train_on_val and not catalog.dataset_images(db, dataset_version, ["test"]):
        raise ValueError(
            f"dataset {dataset_version} has no test images: train_on_val needs them, the gate"
            " compares models on test when val is trained on"
        )
    cache = ImageCache(cache_dir)
    started = time.monotonic()
    failures = cache.fill(store, train_records + val_records, copy_required=True)
    log.info(
        "data: %d train, %d val images cached in %.1fs",
        len(train_records),
        len(val_records),
        time.monotonic() - started,
    )
    if failures:
        records = train_records + val_records
        catalog.mark_rejected(
            db, [(r, failures[r.image_id]) for r in records if r.image_id in failures]
        )

    def build(records, preset):
        kept = [r for r in records if r.image_id not in failures]
        paths = [cache.path(r) for r in kept]
        targets = [label_map[r.label] for r in kept]
        return kept, ImageDataset(paths, targets, preset, encoded=on_gpu)

    # train_on_val: val is trained on too (and still reported each epoch, in-sample).
    train_pool = train_records + val_records if params.train_on_val else train_records
    train_kept, train_set = build(
        train_pool, TrainPreset(params.image_size, params.augment, batch_augment=on_gpu)
    )
    val_kept, val_set = build(val_records, EvalPreset(params.image_size))
    untrained = sorted(set(label_map) - {r.label for r in train_kept})
    if untrained:  # the version's images changed since the check of its counts
        raise Refusal(
            f"labels {untrained} of dataset {dataset_version} have no usable train image any more"
            " (deleted, changed or rejected since its scan): the model could never predict"
            " them. Scan the bucket again (a new dataset version), or restore the images"
        )
    return {
        "info": info,
        "label_map": label_map,
        "labels": sorted(label_map, key=label_map.get),
        "train_records": train_kept,
        "val_records": val_kept,
        "train_set": train_set,
        "val_set": val_set,
        "missing": len(failures),
        "cache": cache,
    }


def reference_loader(
    db: Database,
    store: ObjectStore,
    data: dict[str, Any],
    params: TrainParams,
    device: torch.device,
    val_loader: Iterable,
    dataset_version: str,
) -> Iterable:
    """The images the drift reference is taken from: val, held out from training. With
    `train_on_val` val was trained on (its confidences in-sample: every held-out image would
    look drifted), so the test images are, as the gate compares on them."""
    if not params.train_on_val:
        return val_loader
    label_map, cache = data["label_map"], data["cache"]
    records = _of_trained_labels(
        catalog.dataset_images(db, dataset_version, ["test"]), label_map, dataset_version
    )
    failures = cache.fill(store, records, copy_required=True)
    kept = [r for r in records if r.image_id not in failures]
    log.info("drift reference: %d test images (train_on_val trains on val)", len(kept))
    test_set = ImageDataset(
        [cache.path(r) for r in kept],
        [label_map[r.label] for r in kept],
        EvalPreset(params.image_size),
        encoded=device.type == "cuda",
    )
    return eval_loader(test_set, params, device, num_workers=0)


def _of_trained_labels(
    records: list[ImageRecord], label_map: dict[str, int], dataset_version: str
) -> list[ImageRecord]:
    """`records` of the labels the model is trained on: val images of a label with no train
    image (accepted with `allow_unseen_labels`) have no class to be scored against."""
    unseen = sorted({r.label for r in records if r.label not in label_map})
    if unseen:
        log.warning(
            "dataset %s: val images of labels with no train image %s are left out of validation",
            dataset_version,
            unseen,
        )
    return [r for r in records if r.label in label_map]


def build_loaders(
    data: dict[str, Any],
    params: TrainParams,
    device: torch.device,
    *,
    num_workers: int,
    epoch: int,
) -> tuple[Iterable, Iterable]:
    """(train, val) loaders; the train order is seeded by the first `epoch` to run, so a resumed
    run does not replay the first epoch's. On a GPU, batches are decoded and resized there.
    """
    train_loader = make_loader(
        data["train_set"],
        batch_size=params.batch_size,
        shuffle=True,
        num_workers=num_workers,
        seed=params.seed + epoch,
    )
    if device.type == "cuda":
        # Decoded by nvJPEG and resized on the GPU one batch ahead of the step.
        train_loader = DeviceBatches(train_loader, data["train_set"].preset.source_size, device)
    return train_loader, eval_loader(data["val_set"], params, device, num_workers=num_workers)


def eval_loader(dataset, params: TrainParams, device: torch.device, *, num_workers: int):
    """Batches of `dataset` in order, twice the training batch (val, the drift reference's
    images); on a GPU decoded and resized there."""
    loader = make_loader(
        dataset,
        batch_size=params.batch_size * 2,
        shuffle=False,
        num_workers=num_workers,
        seed=params.seed,
    )
    return DeviceBatches(loader, params.image_size, device) if device.type == "cuda" else loader


# ----------------------------------------------------------------------------- model


@dataclass
class Training:
    """What the epochs run with: the model (and its compiled twin), loss, optimizer, schedule."""

    model: nn.Module
    step_model: nn.Module  # `model` compiled, or `model`; it shares the parameters
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    transform: Callable[[torch.Tensor], torch.Tensor]  # a uint8 batch on the device → model input


def build_training(
    params: TrainParams, device: torch.device, data: dict[str, Any], *, store: ObjectStore
) -> Training:
    """ResNet18 for `data`'s classes on `device`, with the loss, optimizer, schedule, mixed
    precision and batch transform of `params` (and of `data`'s train preset).
    """
    n_classes = len(data["labels"])
    model = build_model(n_classes, weights=params.weights, store=store)
    if params.freeze_backbone:
        freeze_backbone(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    # The compiled module shares its parameters with `model`, whose state dict stays plain.
    step_model = torch.compile(model) if params.compile else model
    weight = (
        _class_weights(data["train_set"].targets, n_classes).to(device)
        if params.class_weighting == "balanced"
        else None
    )
    criterion = nn.CrossEntropyLoss(
        weight=weight, label_smoothing=params.label_smoothing, ignore_index=-1
    )
    optimizer = _optimizer(model, params)
    scheduler = _scheduler(optimizer, params)
    autocast_dtype, scaler = training_autocast(device)
    return Training(
        model=model,
        step_model=step_model,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        autocast_dtype=autocast_dtype,
        scaler=scaler,
        transform=data["train_set"].preset.on_device,
    )


def _optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=params.learning_rate, momentum=0.9, weight_decay=params.weight_decay
        )
    # The fused CUDA kernel updates every parameter in a few launches instead of per tensor.
    fused = bool(trainable) and trainable[0].is_cuda
    return torch.optim.AdamW(
        trainable, lr=params.learning_rate, weight_decay=params.weight_decay, fused=fused or None
    )


def _scheduler(
    optimizer: torch.optim.Optimizer, params: TrainParams
) -> torch.optim.lr_scheduler.LRScheduler:
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    if params.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, params.epochs // 3))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _class_weights(targets: Sequence[int], n_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(list(targets)), minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


# ----------------------------------------------------------------------------- loop


def train_one_epoch(
    model,
    criterion,
    optimizer,
    loader,
    device,
    *,
    epoch: int,
    epochs: int,
    scaler=None,
    autocast_dtype=None,
    transform=None,
):
    """One pass over the loader; returns loss, accuracy, images/s and indices that failed to decode.

    Batches arrive as `uint8` and become model input on the device (`transform`, default
    `to_model_input`; a preset's `on_device` augments there). Loss and accuracy add up on the
    device and are read only at log time, so the host never waits for the GPU inside an epoch.
    `autocast_dtype` (bf16 or fp16) turns on autocast; `scaler` is fp16's GradScaler.
    """
    transform = transform or to_model_input
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    failed: list[int] = []
    steps = len(loader)
    started = last_log = time.monotonic()
    for step, (images, targets, indices) in enumerate(loader, 1):
        bad = targets < 0
        good = len(targets) - int(bad.sum())
        if good < len(targets):
            failed.extend(indices[bad].tolist())
        if not good:
            continue
        images = transform(images.to(device, non_blocking=True))
        images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model(images)
            loss = criterion(output, targets)  # ignore_index=-1 leaves undecodable images out
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().float() * good
        correct += (output.argmax(1) == targets).sum()  # a target of -1 never matches
        seen += good
        now = time.monotonic()
        if now - last_log >= _LOG_EVERY_S or step == steps:
            rate = seen / (now - started)
            eta = (steps - step) * (now - started) / step
            log.info(
                "epoch %d/%d step %d/%d loss %.4f acc %.4f %.1f img/s ETA %.0fs",
                epoch,
                epochs,
                step,
                steps,
                float(loss_sum) / max(seen, 1),
                int(correct) / max(seen, 1),
                rate,
                eta,
            )
            last_log = now
    total_loss, total_correct = float(loss_sum), int(correct)  # waits for the last step
    elapsed = time.monotonic() - started
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": total_correct / max(seen, 1),
        "images_per_s": seen / elapsed if elapsed else 0.0,
        "failed": failed,
    }


def evaluate(model, criterion, loader, device, *, autocast_dtype=None):
    """Loss, accuracy and (target, predicted) index pairs on a loader, in eval mode."""
    model.eval()
    total_loss = 0.0
    pairs: list[tuple[int, int]] = []
    failed: list[int] = []
    with torch.inference_mode():
        for images, targets, indices in loader:
            bad = targets < 0
            failed.extend(indices[bad].tolist())
            if bad.all():
                continue
            images = to_model_input(images.to(device, non_blocking=True))
            images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                output = model(images)
            keep = ~bad.to(device)
            total_loss += float(criterion(output[keep].float(), targets[keep])) * int(keep.sum())
            pairs.extend(zip(targets[keep].tolist(), output[keep].argmax(1).tolist(), strict=True))
    n = len(pairs)
    return {
        "loss": total_loss / max(n, 1),
        "accuracy": sum(t == p for t, p in pairs) / max(n, 1),
        "pairs": pairs,
        "failed": failed,
    }


@dataclass
class Progress:
    """Where a run stands: the last finished epoch, its history, the best epoch, the MLflow run.

    `best` is {"accuracy", "epoch", "state": the weights on the CPU, or None}. Indices of images
    that failed to decode are gathered for the rejection at the end. All of it is checkpointed.
    """

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(
        default_factory=lambda: {"accuracy": -1.0, "epoch": 0, "state": None}
    )
    run_id: str | None = None
    stopped_early: bool = False
    bad_train: set[int] = field(default_factory=set)
    bad_val: set[int] = field(default_factory=set)


def run_epochs(
    training: Training,
    progress: Progress,
    train_loader: Iterable,
    val_loader: Iterable,
    params: TrainParams,
    *,
    save: Callable[[], None],
) -> None:
    """The epochs after `progress.epoch`: train, step the schedule, validate, log to the active
    MLflow run, track the best val epoch (its weights only with `patience`), `save()` a
    checkpoint; stop early after `patience`.
    """
    import mlflow

    last = progress.epoch if progress.stopped_early else params.epochs  # resumed after a stop
    for epoch in range(progress.epoch + 1, last + 1):
        train_stats = train_one_epoch(
            training.step_model,
            training.criterion,
            training.optimizer,
            train_loader,
            training.device,
            epoch=epoch,
            epochs=params.epochs,
            scaler=training.scaler,
            autocast_dtype=training.autocast_dtype,
            transform=training.transform,
        )
        training.scheduler.step()
        val_stats = evaluate(
            training.model,
            training.criterion,
            val_loader,
            training.device,
            autocast_dtype=training.autocast_dtype,
        )
        progress.bad_train.update(train_stats["failed"])
        progress.bad_val.update(val_stats["failed"])
        row = epoch_row(epoch, train_stats, val_stats, lr=training.optimizer.param_groups[0]["lr"])
        progress.history.append(row)
        log.info(
            "epoch %d/%d train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f img/s",
            epoch,
            params.epochs,
            row["train_loss"],
            row["train_accuracy"],
            row["val_loss"],
            row["val_accuracy"],
            row["images_per_s"],
        )
        progress.best = update_best(
            progress.best,
            epoch,
            val_stats["accuracy"],
            # Only early stopping keeps an earlier epoch's weights: copy them only then.
            (lambda: cpu_copy(training.model)) if params.patience else (lambda: None),
        )
        progress.epoch = epoch
        progress.stopped_early = patience_exhausted(epoch, progress.best["epoch"], params.patience)
        save()
        # After the checkpoint: an epoch whose checkpoint failed is run again by the retry,
        # which must not find its metrics logged twice (`log_unlogged_epochs` on resume).
        mlflow.log_metrics(epoch_metrics(row), step=epoch)
        if progress.stopped_early:
            log.info("early stop: no val improvement for %d epochs", params.patience)
            break


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """An epoch's MLflow metrics: its history row less `epoch`."""
    return {k: v for k, v in row.items() if k != "epoch"}


def log_unlogged_epochs(run_id: str, history: Sequence[dict[str, Any]]) -> None:
    """Log the epochs of a resumed run's checkpoint whose metrics MLflow lacks (the attempt
    died between its checkpoint and its logging)."""
    import mlflow

    from pipeline import registry

    logged = {
        m.step
        for m in registry.ask_mlflow(
            f"read metrics of run {run_id}",
            lambda: registry.mlflow_client().get_metric_history(run_id, "val_accuracy"),
        )
    }
    for row in history:
        if row["epoch"] not in logged:
            log.info("logging epoch %d of the checkpoint, which its attempt did not", row["epoch"])
            mlflow.log_metrics(epoch_metrics(row), step=row["epoch"])


def epoch_row(
    epoch: int, train_stats: dict[str, Any], val_stats: dict[str, Any], *, lr: float
) -> dict[str, Any]:
    """One epoch's line of the history (and its MLflow metrics, less `epoch`)."""
    return {
        "epoch": epoch,
        "train_loss": train_stats["loss"],
        "train_accuracy": train_stats["accuracy"],
        "val_loss": val_stats["loss"],
        "val_accuracy": val_stats["accuracy"],
        "images_per_s": train_stats["images_per_s"],
        "lr": lr,
    }


def update_best(
    best: dict[str, Any],
    epoch: int,
    val_accuracy: float,
    weights: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """The best epoch after `epoch`: `epoch`, with `weights()`, if its val accuracy beats the
    best's (a tie keeps the earlier epoch), else `best` unchanged.
    """
    if val_accuracy > best["accuracy"]:
        return {"accuracy": val_accuracy, "epoch": epoch, "state": weights()}
    return best


def patience_exhausted(epoch: int, best_epoch: int, patience: int) -> bool:
    """Whether to stop after `epoch`: `patience` epochs (0: never stop) since the best one."""
    return bool(patience) and epoch - best_epoch >= patience


def kept_weights(best: dict[str, Any], patience: int) -> dict[str, torch.Tensor] | None:
    """The weights registered: with early stopping (`patience` > 0) the best val epoch's; else
    None, the model's own: the last epoch's.

    Choosing an epoch on a small val split is noise (bench/results/train.md: on 33 val images
    the "best" epoch was 1, 3 and 12 of 15 and cost 11 points of test accuracy); under the
    cosine schedule the last epoch is the best or close to it.
    """
    return best["state"] if patience else None


def kept_epoch(progress: Progress, patience: int) -> int:
    """The epoch whose weights `kept_weights` registers."""
    return (
        progress.best["epoch"]
        if patience and progress.best["state"] is not None
        else progress.epoch
    )


def cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `model`'s state dict on the CPU, unaffected by further training."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- MLflow run


def log_run_params(
    data: dict[str, Any],
    params: TrainParams,
    training: Training,
    *,
    dataset_version: str,
    model_name: str,
    run_key: str,
    num_workers: int,
) -> None:
    """Tags, params and dataset counts of a new MLflow run (a resumed run has them already)."""
    import mlflow

    mlflow.set_tags(
        {"run_key": run_key, "dataset_version": dataset_version, "model_name": model_name}
    )
    mlflow.log_params(
        asdict(params)
        | {
            "dataset_version": dataset_version,
            "n_train": len(data["train_records"]),
            "n_val": len(data["val_records"]),
            "n_classes": len(data["labels"]),
            "class_names": json.dumps(data["labels"], ensure_ascii=False)[:6000],
            "code_version": code_version(),
            "device": training.device.type,
            "num_workers": num_workers,
            "autocast": str(training.autocast_dtype).removeprefix("torch."),
            "torch_version": torch.__version__,
        }
    )
    mlflow.log_dict(data["info"]["counts"], "dataset_counts.json")
    excluded = data["info"].get("excluded_labels") or {}
    if excluded:
        # small_label_policy=exclude left these out of the dataset version: say so in the run.
        log.warning("labels left out of dataset %s (too few images): %s", dataset_version, excluded)
        mlflow.set_tag("excluded_labels", json.dumps(excluded, ensure_ascii=False)[:5000])


def finish_run(
    db: Database,
    store: ObjectStore,
    training: Training,
    progress: Progress,
    data: dict[str, Any],
    val_loader: Iterable,
    *,
    model_name: str,
    run_key: str,
    dataset_version: str,
    params: TrainParams,
) -> dict[str, Any]:
    """Evaluate the kept weights, reject what failed to decode, log the reports, register the
    model and record its version; returns `train_model`'s result.
    """
    import mlflow

    model = training.model
    final = evaluate_kept(training, progress, val_loader, params)
    rejected = _reject_undecodable(
        db,
        store,
        data["cache"],
        [
            (data["train_records"], progress.bad_train),
            (data["val_records"], progress.bad_val | set(final["failed"])),
        ],
    )
    mlflow.log_metrics(
        {
            "kept_val_accuracy": final["accuracy"],
            "kept_epoch": kept_epoch(progress, params.patience),
            "best_val_epoch": progress.best["epoch"],
            "decode_failures": rejected,
        }
    )
    _log_reports(progress.history, final["pairs"], data["labels"])
    reference = drift.build_reference(
        model,
        reference_loader(db, store, data, params, training.device, val_loader, dataset_version),
        training.device,
        labels=data["labels"],
        autocast_dtype=training.autocast_dtype,
        seed=params.seed,
    )
    model_version = log_and_register(
        model,
        model_name=model_name,
        label_map=data["label_map"],
        image_size=params.image_size,
        dataset_version=dataset_version,
        run_key=run_key,
        extra_tags={
            "val_accuracy": f"{final['accuracy']:.6f}",
            "mlflow_run_id": progress.run_id,
            # The split the gate compares on: val, unless the model trained on it.
            "gate_split": "test" if params.train_on_val else "val",
        },
        drift_reference=reference,
    )
    registry.record_version(db, model_name, model_version)
    return {
        "skipped": False,
        "model_version": model_version,
        "run_id": progress.run_id,
        "dataset_version": dataset_version,
        "val_accuracy": round(final["accuracy"], 6),
        "epochs_run": len(progress.history),
        "stopped_early": progress.stopped_early,
        "decode_failures": rejected,
        "missing_objects": data["missing"],
    }


def evaluate_kept(
    training: Training, progress: Progress, val_loader: Iterable, params: TrainParams
) -> dict[str, Any]:
    """Load the weights training keeps (the best epoch's, with early stopping) into the model
    and evaluate them on val."""
    weights = kept_weights(progress.best, params.patience)
    if weights is not None:
        training.model.load_state_dict(weights)
    return evaluate(
        training.model,
        training.criterion,
        val_loader,
        training.device,
        autocast_dtype=training.autocast_dtype,
    )


def log_and_register(
    model,
    *,
    model_name: str,
    label_map: dict[str, int],
    image_size: int,
    dataset_version: str,
    run_key: str,
    extra_tags: dict[str, str] | None = None,
    drift_reference: drift.DriftReference | None = None,
) -> str:
    """Log `model` to the active MLflow run and register it; returns the model version.

    The model is weights (safetensors) plus their meaning (JSON), inside a pyfunc model from
    code (`pipeline/mlflow_pyfunc.py`) that users load by alias; the weights' SHA-256 is a
    version tag that the pipeline checks before it uses them (`model_files.read_weights`).
    `drift_reference` (`drift.build_reference` on val) is stored beside them, its SHA-256 a tag
    too. Registration is keyed by `run_key`: an existing version is returned.
    """
    import mlflow
    from mlflow.models import infer_signature

    existing = registry.find_version_by_run_key(model_name, run_key, dataset_version)
    if existing:
        log.info("model %s v%s already registered for run %s", model_name, existing, run_key)
        return registry.settle_registration(model_name, run_key, existing, dataset_version)
    example = np.random.default_rng(0).random((2, 3, image_size, image_size), dtype=np.float32)
    model = model.cpu().eval()
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory(prefix="imgpipe-model-") as tmp:
        files = model_files.write_files(
            model, Path(tmp), label_map=label_map, image_size=image_size
        )
        digest = model_files.file_sha256(files["weights"])
        if drift_reference is not None:
            files |= drift_reference.write(Path(tmp))
            extra_tags = (extra_tags or {}) | {
                drift.REFERENCE_SHA_TAG: model_files.file_sha256(files["drift"])
            }
        mlflow.log_dict(label_map, "label_map.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(model_files.PYFUNC_CODE),
            artifacts={name: str(path) for name, path in files.items()},
            signature=infer_signature(example, output),
            input_example=example,
            # Explicit requirements: MLflow's inference imports the model in a subprocess (~10 s).
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"safetensors=={safetensors.__version__}",
            ],
        )
    tags = {
        "dataset_version": dataset_version,
        "run_key": run_key,
        "label_map": json.dumps(label_map, ensure_ascii=False, sort_keys=True),
        "image_size": str(image_size),
        "weights_sha256": digest,
        **(extra_tags or {}),
    }
    mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
    version = registry.settle_registration(model_name, run_key, mv.version, dataset_version)
    log.info("registered %s v%s (run %s)", model_name, version, run_key)
    return version


def _reject_undecodable(db, store, cache: ImageCache, groups) -> int:
    """Mark images that failed to decode as rejected, with the decoder's reason; returns how many.

    `groups`: (records, failed indices into them) for train and val. The
    verdict is on the object as S3 has it, not on the local copy the loader read: a copy
    damaged on disk (or unreadable for a moment) is replaced and the image kept.
    """
    rejections = []
    for records, failed in groups:
        for index in sorted(failed):
            record = records[index]
            try:
                decode_image(cache.refresh(store, record))
            except MissingObjectError as exc:
                rejections.append((record, str(exc)))
            except ImageDecodeError as exc:
                rejections.append((record, f"decode_failed: {exc}"))
            else:
                log.warning(
                    "%s failed to decode from its cached copy but decodes from S3: the copy"
                    " was replaced (removed, on a full cache disk) and the image kept (not in this"
                    " run's training)",
                    record.object_key,
                )
    if rejections:
        log.warning("%d images failed to decode: marked rejected", len(rejections))
        catalog.mark_rejected(db, rejections)
    return len(rejections)


# A picture of more classes is unreadable and costly: 300 labels took 32 s and 5.9 GB to draw.
CONFUSION_FIGURE_MAX_LABELS = 60


def confusion_figure(cm: np.ndarray, labels: Sequence[str]):
    """The confusion matrix as a matplotlib figure (at most 30 inches square), or None above
    CONFUSION_FIGURE_MAX_LABELS labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    if n > CONFUSION_FIGURE_MAX_LABELS:
        return None
    size = min(30.0, max(4.0, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    # Labels are folder names anyone writing the bucket picks: `$...$` is no math to typeset
    # (matplotlib failed on `$\\foo$` after the last epoch, and no model was registered).
    ax.set_xticks(range(n), labels, rotation=90, parse_math=False)
    ax.set_yticks(range(n), labels, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(cm), strict=True):
        ax.text(
            j,
            i,
            str(cm[i, j]),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if cm[i, j] > cm.max() / 2 else "black",
        )
    ax.set_title("validation confusion matrix")
    fig.tight_layout()
    return fig


def _log_reports(history: list[dict], pairs: list[tuple[int, int]], labels: list[str]) -> None:
    """Confusion matrix and learning curves (PNG), per-class precision/recall/F1 (CSV, JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    n = len(labels)
    cm = np.zeros((n, n), dtype=int)
    for t, p in pairs:
        cm[t, p] += 1
    metrics = compute_metrics([(labels[t], labels[p]) for t, p in pairs], labels)
    rows = ["label,precision,recall,f1,support"]
    table = []
    for label in labels:
        c = metrics["per_class"][label]
        table.append({"label": label, **c})
        quoted = '"' + label.replace('"', '""') + '"'
        rows.append(f"{quoted},{c['precision']:.4f},{c['recall']:.4f},{c['f1']:.4f},{c['support']}")
    mlflow.log_text("\n".join(rows) + "\n", "per_class_metrics.csv")
    mlflow.log_dict(
        {"labels": labels, "confusion_matrix": cm.tolist(), "per_class": table},
        "val_evaluation.json",
    )
    mlflow.log_metric("val_macro_f1", metrics["macro_f1"])

    fig = confusion_figure(cm, labels)
    if fig is None:
        log.info(
            "no confusion_matrix.png for %d labels (over %d): val_evaluation.json holds the matrix",
            n,
            CONFUSION_FIGURE_MAX_LABELS,
        )
    else:
        mlflow.log_figure(fig, "confusion_matrix.png")
        plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "learning_curves.png")
    plt.close(fig)


def code_version() -> str:
    """The git commit of the code (with `-dirty`), or the package version outside a checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"imgpipe-{version('imgpipe')}"
        except PackageNotFoundError:
            return "unknown"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic kernels on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------- CLI


def cli_train(args: argparse.Namespace, settings: Any) -> int:
    """`python -m pipeline train`: refuse an untrainable dataset, train, print the references."""
    db = Database(settings.mysql)
    store, prefix = location_from_args(settings, args)
    dataset = catalog.resolve_dataset(db, store.bucket, prefix, args.dataset_version)
    version = dataset["dataset_version"]
    should_train, why = decide_training(
        db,
        dataset,
        settings.model_name,
        allow_label_change=args.allow_label_change,
        min_images_per_label=args.min_images_per_label,
        allow_unseen_labels=args.allow_unseen_labels,
        force_retrain=args.force_retrain,
    )
    log.info("training decision: %s (%s)", "train" if should_train else "skip", why)
    params = TrainParams.from_dict({f.name: getattr(args, f.name) for f in fields(TrainParams)})
    run_key = args.run_key or cli_run_key()
    result = train_model(
        db,
        store,
        version,
        params,
        model_name=settings.model_name,
        run_key=run_key,
        cache_dir=settings.cache_dir,
        checkpoint_store=S3CheckpointStore(
            store.with_bucket(settings.work_bucket), image_bucket=store.bucket
        ),
        force_retrain=args.force_retrain,
    )
    for key, value in result.items():
        print(f"{key:<18} {value}")
    return 0
