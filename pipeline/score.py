"""Scoring stage: plan shards, score one shard into `predictions`, evaluate a model version.

Choices (see also docs/design.md and migration 0003):

- The model reference (alias or version) is resolved to a concrete version once, by
  `plan_scoring`; every shard gets that number, so a promotion during a run cannot mix versions.
- What is scored: the test subset of the latest dataset version of bucket+prefix and every live
  inbox image (`subsets`), minus images this version already scored (unless `force`).
  Shard of an image = `image_id % shards`: stable, independent of scan order, no coordination.
- A shard streams its images in id-ordered pages (keyset), overlaps S3 GET + decode (thread pool,
  at most ~2 batches ahead) with batched inference under `torch.inference_mode()`, and writes each
  batch as one multi-row upsert in its own transaction. A killed shard leaves only whole batches;
  a rerun skips them (anti-join on `predictions`) and fills in the rest: exactly one row per
  (image, model name, model version).
- An object that vanished, changed, or fails to decode is marked rejected in the catalog (later
  runs skip it), counted by reason in the summary, and the shard goes on.
- Evaluation reads the version's labelled predictions of the `test` subset; per-class metrics
  cover the labels seen as truth or prediction (scikit-learn's default), a class never predicted
  has precision 0. Its tables are rewritten in one transaction; metrics go to the version's
  MLflow run (`test_accuracy`, `test_macro_f1`) and to model version tags.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import catalog
from pipeline.catalog import INBOX, ImageRecord
from pipeline.db import Database, utc_now
from pipeline.errors import Refusal
from pipeline.params import PRECISIONS, RUN_PARAMS, cli_run_key
from pipeline.store import ObjectStore, add_location_arguments, location_from_args

log = logging.getLogger(__name__)

DEFAULT_SUBSETS = ("test", INBOX)
SCORABLE_SUBSETS = ("train", "val", "test", INBOX)
TOP_K = 3
PAGE_SIZE = 1000
EVALUATED_SUBSETS = ("test",)
_PROGRESS_EVERY_S = 10.0

_COLUMNS = (
    "image_id",
    "etag",
    "model_name",
    "model_version",
    "predicted_label",
    "confidence",
    "top_k",
    "true_label",
    "correct",
    "subset",
    "dataset_version",
    "mlflow_run_id",
    "run_key",
    "scored_at",
)
_KEY = ("image_id", "model_name", "model_version")
_UPSERT_HEAD = f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES "
_UPSERT_TAIL = " ON DUPLICATE KEY UPDATE " + ", ".join(
    f"{c} = VALUES({c})" for c in _COLUMNS if c not in _KEY
)
_ROW = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"


def _check_subsets(subsets: Sequence[str]) -> None:
    bad = [s for s in subsets if s not in SCORABLE_SUBSETS]
    if bad or not subsets:
        raise Refusal(
            f"unknown subsets {list(subsets)}; expected some of: {', '.join(SCORABLE_SUBSETS)}"
        )


def check_labels(model_labels: Sequence[str], dataset_labels: Sequence[str], *, what: str) -> None:
    """Refuse a model whose classes differ from the catalog's labels, naming both lists."""
    if sorted(model_labels) != sorted(dataset_labels):
        raise Refusal(
            f"{what}: the model's classes {sorted(model_labels)} differ from the catalog's labels "
            f"{sorted(dataset_labels)}; score with a model trained on this dataset "
            "(or retrain on it first)"
        )


# ----------------------------------------------------------------------------- selection


def _selection(
    bucket: str,
    prefix: str,
    dataset_version: str | None,
    subsets: Sequence[str],
) -> list[tuple[str, str, tuple]]:
    """(subset kind, FROM/WHERE sql, args) for each part of the selection; columns i.*, label."""
    parts = []
    labelled = [s for s in subsets if s != INBOX]
    if labelled and dataset_version:
        parts.append(("labelled", *catalog.membership_query(dataset_version, labelled)))
    if INBOX in subsets:
        parts.append((INBOX, *catalog.inbox_query(bucket, prefix)))
    return parts


# Scored means scored in its current content: an object overwritten under its key keeps its id.
_NOT_SCORED = (
    " AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.image_id = i.id AND p.etag = i.etag"
    " AND p.model_name = %s AND p.model_version = %s)"
)


def _count_by_shard(
    db: Database,
    parts: list[tuple[str, str, tuple]],
    *,
    model_name: str,
    model_version: str,
    shards: int,
    force: bool,
) -> dict[str, Counter]:
    """{part kind ("labelled"/"inbox"): Counter(shard -> images to score)}."""
    counts: dict[str, Counter] = {}
    for kind, sql, args in parts:
        per_shard = counts.setdefault(kind, Counter())
        extra = "" if force else _NOT_SCORED
        extra_args = () if force else (model_name, int(model_version))
        rows = db.query(
            f"SELECT s.id %% %s AS shard, COUNT(*) AS n FROM ({sql}{extra}) s GROUP BY 1",
            (shards, *args, *extra_args),
        )
        for r in rows:
            per_shard[int(r["shard"])] += int(r["n"])
    return counts


def _iter_records(
    db: Database,
    parts: list[tuple[str, str, tuple]],
    *,
    model_name: str,
    model_version: str,
    shard: int,
    shards: int,
    force: bool,
    page_size: int = PAGE_SIZE,
) -> Iterator[ImageRecord]:
    """Images of one shard still to score, streamed in id-ordered pages (keyset pagination)."""
    for _, sql, args in parts:
        last_id = 0
        while True:
            extra = "" if force else _NOT_SCORED
            extra_args = () if force else (model_name, int(model_version))
            rows = db.query(
                f"{sql} AND i.id > %s AND i.id %% %s = %s{extra} ORDER BY i.id LIMIT %s",
                (*args, last_id, shards, shard, *extra_args, page_size),
            )
            yield from (catalog.image_record(r) for r in rows)
            if len(rows) < page_size:
                break
            last_id = int(rows[-1]["id"])


# ----------------------------------------------------------------------------- plan


def plan_scoring(
    db: Database,
    bucket: str,
    prefix: str,
    *,
    model_name: str,
    model_ref: str | int = "champion",
    shards: int = 2,
    force: bool = False,
    subsets: Sequence[str] = DEFAULT_SUBSETS,
) -> dict[str, Any]:
    """Resolve the model once and count the work per shard.

    Returns {model_name, model_version, dataset_version, to_score (also split into
    to_score_labelled and to_score_inbox), shards (numbers with work), n_shards, counts}. NoModelError without the requested alias/version; ValueError when the
    model's classes differ from the dataset's labels (and labelled images are to be scored).
    """
    from pipeline import registry

    _check_subsets(subsets)
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    version = registry.resolve_model_version(model_name, model_ref)
    dataset = catalog.resolve_dataset(db, bucket, prefix)
    dataset_version = dataset["dataset_version"]
    parts = _selection(bucket, prefix, dataset_version, subsets)
    by_kind = _count_by_shard(
        db, parts, model_name=model_name, model_version=version, shards=shards, force=force
    )
    counts = sum(by_kind.values(), Counter())
    if sum(by_kind.get("labelled", Counter()).values()):
        tags = registry.version_tags(model_name, version)
        model_labels = list(json.loads(tags.get("label_map", "{}")))
        check_labels(model_labels, list(dataset["label_map"]), what=f"{model_name} v{version}")
    plan = {
        "model_name": model_name,
        "model_version": version,
        "dataset_version": dataset_version,
        "bucket": bucket,
        "prefix": catalog.normalize_prefix(prefix),
        "to_score": sum(counts.values()),
        "to_score_labelled": sum(by_kind.get("labelled", Counter()).values()),
        "to_score_inbox": sum(by_kind.get(INBOX, Counter()).values()),
        "n_shards": shards,
        "shards": sorted(s for s, n in counts.items() if n),
        "counts": {str(s): counts[s] for s in sorted(counts)},
        "force": force,
    }
    log.info(
        "plan: %s v%s, %d images to score in shards %s of %d (dataset %s)",
        model_name,
        version,
        plan["to_score"],
        plan["shards"],
        shards,
        dataset_version,
    )
    return plan


# ----------------------------------------------------------------------------- score


def upsert_predictions(cur, rows: Sequence[tuple]) -> None:
    """One multi-row upsert of prediction rows (values in `_COLUMNS` order) on a cursor."""
    cur.execute(
        _UPSERT_HEAD + ", ".join([_ROW] * len(rows)) + _UPSERT_TAIL,
        [v for r in rows for v in r],
    )


def _write_batch(db: Database, rows: list[tuple], embeddings: list[tuple] = ()) -> None:
    # One transaction per batch: a kill leaves whole batches only; an upsert is safe to rerun
    # when MySQL drops the connection mid-batch. The batch's drift embeddings go with it.
    from pipeline.drift import upsert_embeddings

    def write(cur) -> None:
        upsert_predictions(cur, rows)
        upsert_embeddings(cur, embeddings)

    db.transact(write)


_CORRECT = _COLUMNS.index("correct")


@dataclass
class ShardStats:
    """What a shard did so far: predictions written, how many labelled and correct, rejections."""

    scored: int = 0
    labelled: int = 0
    correct: int = 0
    rejected: Counter = field(default_factory=Counter)

    def add_rows(self, rows: Sequence[tuple]) -> None:
        correct = [r[_CORRECT] for r in rows if r[_CORRECT] is not None]
        self.scored += len(rows)
        self.labelled += len(correct)
        self.correct += sum(correct)

    def add_rejections(self, failures: Sequence[tuple[ImageRecord, str]]) -> None:
        self.rejected.update(catalog.split_reason(reason)[0] for _, reason in failures)

    @property
    def done(self) -> int:
        return self.scored + sum(self.rejected.values())


def check_shard(
    *,
    shard: int,
    shards: int,
    model_version: str | int,
    precision: str,
    subsets: Sequence[str],
) -> str:
    """Refuse arguments no retry can fix; returns the version as a string."""
    _check_subsets(subsets)
    if precision not in PRECISIONS:
        raise Refusal(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if not 0 <= shard < shards:
        raise Refusal(f"shard must be in 0..{shards - 1}, got {shard}")
    if not str(model_version).isdigit():
        raise Refusal(
            f"model_version must be a concrete version number, got {model_version!r}"
            " (resolve aliases once with plan_scoring)"
        )
    return str(model_version)


def scoring_model(loaded, precision: str, db: Database, store: ObjectStore, *, cache_dir):
    """(module, device, resolved precision) that score `loaded` at `precision`.

    int8 is an ONNX Runtime session on the CPU, exported and calibrated on the first use of the
    version, then read from the cache; the other precisions run the PyTorch module where it is.
    """
    import torch

    from pipeline.model import resolve_precision

    if precision == "int8":
        from pipeline.onnx_runtime import int8_model

        module, device = int8_model(loaded, db, store, cache_dir=cache_dir), torch.device("cpu")
    else:
        module = loaded.module
        device = next(module.parameters()).device
    return module, device, resolve_precision(precision, device)


def score_shard(
    db: Database,
    store: ObjectStore,
    *,
    model_name: str,
    model_version: str | int,
    shard: int,
    shards: int,
    prefix: str,
    cache_dir: str | Path,
    dataset_version: str | None = None,
    force: bool = False,
    run_key: str | None = None,
    precision: str = "auto",
    subsets: Sequence[str] = DEFAULT_SUBSETS,
    batch_size: int | None = None,
    workers: int = 8,
) -> dict[str, Any]:
    """Score the images of one shard with one concrete model version; returns a summary.

    `dataset_version` (whose test subset is scored) defaults to the latest of store.bucket +
    `prefix`; pass the plan's so every shard of a run scores the same set. Idempotent.
    `batch_size` defaults to one that fills the device (`inference.default_batch_size`).
    """
    from pipeline import registry
    from pipeline.data import EvalPreset, ImageCache
    from pipeline.inference import StageClock, predict_stream

    version = check_shard(
        shard=shard,
        shards=shards,
        model_version=model_version,
        precision=precision,
        subsets=subsets,
    )
    dataset = catalog.resolve_dataset(db, store.bucket, prefix, dataset_version)
    dataset_version = dataset["dataset_version"]
    parts = _selection(store.bucket, prefix, dataset_version, subsets)
    select = {"model_name": model_name, "model_version": version, "shards": shards, "force": force}
    by_kind = _count_by_shard(db, parts, **select)
    total = sum(c[shard] for c in by_kind.values())
    stats, clock = ShardStats(), StageClock()
    where = {"model_name": model_name, "model_version": version, "shard": shard, "shards": shards}
    if total == 0:
        log.info("shard %d/%d: nothing to score for %s v%s", shard, shards, model_name, version)
        return _shard_summary(where, dataset_version, precision, stats, clock, 0.0)

    loaded = registry.load_model(model_name, version, cache_dir=cache_dir)
    if by_kind.get("labelled", Counter())[shard]:
        check_labels(loaded.labels, list(dataset["label_map"]), what=f"{model_name} v{version}")
    module, device, precision = scoring_model(loaded, precision, db, store, cache_dir=cache_dir)
    cache = ImageCache(cache_dir)
    cache.trim()  # room for this shard's copies
    started = time.monotonic()
    stream = predict_stream(
        module,
        _iter_records(db, parts, shard=shard, **select),
        lambda record: cache.get(store, record),
        refetch=lambda record: cache.refresh(store, record),
        labels=loaded.labels,
        preset=EvalPreset(loaded.image_size),
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        top_k=TOP_K,
        clock=clock,
        embed=drift_projector(loaded, precision, device, cache_dir=cache_dir),
    )
    _write_stream(
        db, stream, stats, clock, loaded, dataset_version, run_key, progress=(shard, shards, total)
    )
    summary = _shard_summary(
        where, dataset_version, precision, stats, clock, time.monotonic() - started
    )
    _log_summary(summary)
    return summary


def _write_stream(
    db: Database,
    stream: Iterable[Any],
    stats: ShardStats,
    clock: Any,
    loaded: Any,
    dataset_version: str,
    run_key: str | None,
    *,
    progress: tuple[int, int, int],
) -> None:
    """Write each scored batch of `stream` as it comes (`write_scored`, rows naming `loaded`'s
    version and run), timing the writes on `clock` and logging progress (shard, shards, total)
    every few seconds."""
    columns = {
        "model_name": loaded.model_name,
        "model_version": int(loaded.model_version),
        "dataset_version": dataset_version,
        "mlflow_run_id": loaded.run_id,
        "run_key": run_key,
    }
    shard, shards, total = progress
    started = last_log = time.monotonic()
    for scored in stream:
        t0 = time.perf_counter()
        write_scored(db, scored, stats, **columns)
        clock.add("write", t0)
        if time.monotonic() - last_log >= _PROGRESS_EVERY_S:
            last_log = time.monotonic()
            _log_progress(shard, shards, stats.done, total, last_log - started)


def _log_summary(summary: dict[str, Any]) -> None:
    log.info(
        "shard %d/%d: scored %d images with %s v%s (%s) in %.1fs (%.1f img/s, %s), rejected %s",
        summary["shard"],
        summary["shards"],
        summary["scored"],
        summary["model_name"],
        summary["model_version"],
        summary["precision"],
        summary["seconds"],
        summary["images_per_s"],
        ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items()),
        summary["rejected"] or "none",
    )


def write_scored(
    db: Database,
    scored,
    stats: ShardStats,
    *,
    model_name: str,
    model_version: int,
    dataset_version: str,
    mlflow_run_id: str,
    run_key: str | None,
) -> None:
    """One scored batch into MySQL: its rejections, then its predictions and drift embeddings
    in one transaction (a retried or killed shard rewrites rows, never doubles them)."""
    _reject(db, scored.failures, stats)
    if not scored.predictions:
        return
    rows = prediction_rows(
        scored.predictions,
        model_name=model_name,
        model_version=model_version,
        dataset_version=dataset_version,
        mlflow_run_id=mlflow_run_id,
        run_key=run_key,
        scored_at=utc_now(),
    )
    embedded = _embedding_rows(scored, rows, run_key)
    _write_batch(db, rows, *([embedded] if embedded else []))
    stats.add_rows(rows)


def drift_projector(loaded, precision: str, device, *, cache_dir):
    """The version's drift projection on `device`, or None: no reference, or int8 scoring
    (ONNX Runtime gives no penultimate layer to hook; the drift check then finds no images)."""
    from pipeline import drift

    if precision == "int8":
        log.info("int8 scoring: no drift embeddings for %s", loaded.model_version)
        return None
    try:
        reference = drift.load_reference(
            loaded.model_name, loaded.model_version, cache_dir=cache_dir
        )
    except Refusal as exc:  # predictions still written: the drift check reports the refusal
        log.error("no drift embeddings for this scoring: %s", exc)
        return None
    if reference is None:
        log.info("%s v%s has no drift reference", loaded.model_name, loaded.model_version)
        return None
    return reference.projector(device)


def _embedding_rows(scored, rows: Sequence[tuple], run_key: str | None) -> list[tuple]:
    from pipeline.drift import embedding_rows

    if scored.embeddings is None:
        return []
    return embedding_rows(
        [record for record, _ in scored.predictions],
        scored.embeddings,
        model_name=rows[0][_COLUMNS.index("model_name")],
        model_version=rows[0][_COLUMNS.index("model_version")],
        run_key=run_key,
        created_at=rows[0][_COLUMNS.index("scored_at")],
    )


def _reject(db: Database, failures: Sequence[tuple[ImageRecord, str]], stats: ShardStats) -> None:
    """Images found gone, changed or undecodable while scoring: rejected in the catalog."""
    for record, reason in failures:
        log.warning("image %s (%s) rejected: %s", record.image_id, record.object_key, reason)
    if failures:
        catalog.mark_rejected(db, failures)
        stats.add_rejections(failures)


def _shard_summary(
    where: dict[str, Any],
    dataset_version: str,
    precision: str,
    stats: ShardStats,
    clock,
    elapsed: float,
) -> dict[str, Any]:
    return where | {
        "dataset_version": dataset_version,
        "precision": precision,
        "scored": stats.scored,
        "labelled": stats.labelled,
        "correct": stats.correct,
        "rejected": dict(stats.rejected),
        "images_per_s": round(stats.scored / elapsed, 2) if elapsed > 0 else 0.0,
        "seconds": round(elapsed, 3),
        "stage_seconds": {k: round(v, 3) for k, v in sorted(clock.seconds.items())},
    }


def prediction_rows(
    predictions: Sequence[tuple[ImageRecord, Any]],
    *,
    model_name: str,
    model_version: int,
    dataset_version: str | None,
    mlflow_run_id: str | None,
    run_key: str | None,
    scored_at: datetime,
) -> list[tuple]:
    """`predictions` rows (values in `_COLUMNS` order) for (record, Prediction) pairs."""
    rows = []
    for record, pred in predictions:
        correct = None if record.label is None else int(pred.label == record.label)
        top_k = [{"label": lb, "prob": p} for lb, p in zip(pred.labels, pred.probs, strict=True)]
        rows.append(
            (
                record.image_id,
                record.etag,
                model_name,
                model_version,
                pred.label,
                pred.confidence,
                json.dumps(top_k, ensure_ascii=False),
                record.label,
                correct,
                record.subset,
                dataset_version if record.subset != INBOX else None,
                mlflow_run_id,
                run_key,
                scored_at,
            )
        )
    return rows


def _log_progress(shard: int, shards: int, done: int, total: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    log.info(
        "shard %d/%d: %d/%d images, %.1f img/s, ETA %.0fs", shard, shards, done, total, rate, eta
    )


# ----------------------------------------------------------------------------- evaluate


def compute_metrics(
    pairs: Sequence[tuple[str, str]], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1/support and confusion counts from (true, predicted).

    Per-class rows cover `labels` when given (training reports every class of the model, in
    its order), else the labels seen as truth or prediction (scikit-learn's default).
    """
    confusion = Counter(pairs)
    if labels is None:
        labels = sorted({t for t, _ in pairs} | {p for _, p in pairs})
    n = len(pairs)
    correct = sum(v for (t, p), v in confusion.items() if t == p)
    per_class = {}
    for label in labels:
        tp = confusion[(label, label)]
        predicted = sum(v for (_, p), v in confusion.items() if p == label)
        support = sum(v for (t, _), v in confusion.items() if t == label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "n_images": n,
        "n_correct": correct,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(per_class) if per_class else 0.0,
        "per_class": per_class,
        "confusion": dict(confusion),
    }


def evaluate(
    db: Database,
    *,
    model_name: str,
    model_version: str | int,
    dataset_version: str | None = None,
    subsets: Sequence[str] = EVALUATED_SUBSETS,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Evaluate a version on its labelled predictions; rewrite its evaluation rows atomically.

    Only predictions of images that are still usable members of `dataset_version` (accepted,
    live, unchanged; default: the dataset of the version's latest prediction) in `subsets`
    count: an image deleted or rejected since it was scored, or the inbox, never does.
    Returns {model_name, model_version, dataset_version, n_images, accuracy, macro_f1,
    per_class}. With no such predictions nothing is written and n_images is 0.
    """
    version = int(model_version)
    if dataset_version is None:
        dataset_version = last_scored_dataset(db, model_name, version)
    pairs = []
    if dataset_version is not None:
        pairs = labelled_pairs(db, model_name, version, dataset_version, subsets)
    metrics = compute_metrics(pairs)
    result = {
        "model_name": model_name,
        "model_version": str(version),
        "dataset_version": dataset_version,
        "n_images": metrics["n_images"],
        "accuracy": round(metrics["accuracy"], 6),
        "macro_f1": round(metrics["macro_f1"], 6),
        "per_class": {
            label: {k: round(v, 6) if isinstance(v, float) else v for k, v in c.items()}
            for label, c in metrics["per_class"].items()
        },
    }
    if not metrics["n_images"]:
        log.warning("%s v%s has no labelled predictions to evaluate", model_name, version)
        return result
    if stored_confusion(db, model_name, version) == metrics["confusion"]:
        # The nightly run of an unchanged bucket: no rewrite, no point more in MLflow's history.
        log.info(
            "evaluation of %s v%s unchanged (%d images, accuracy %.4f): nothing written",
            model_name,
            version,
            metrics["n_images"],
            metrics["accuracy"],
        )
        return result
    # MLflow first: rows in MySQL mean MLflow has the metrics too (a retry after a failed
    # MLflow call finds the rows unwritten, and logs again).
    if log_to_mlflow:
        _log_to_mlflow(model_name, str(version), metrics)
    write_evaluation(db, model_name, version, metrics)
    log.info(
        "evaluated %s v%s on %d images: accuracy %.4f, macro-F1 %.4f",
        model_name,
        version,
        metrics["n_images"],
        metrics["accuracy"],
        metrics["macro_f1"],
    )
    return result


def last_scored_dataset(db: Database, model_name: str, version: int) -> str | None:
    """The dataset version of `version`'s latest prediction (None: it predicted nothing)."""
    latest = db.query(
        "SELECT dataset_version FROM predictions WHERE model_name = %s AND model_version = %s"
        " AND dataset_version IS NOT NULL ORDER BY scored_at DESC, id DESC LIMIT 1",
        (model_name, version),
    )
    return latest[0]["dataset_version"] if latest else None


def labelled_pairs(
    db: Database, model_name: str, version: int, dataset_version: str, subsets: Sequence[str]
) -> list[tuple[str, str]]:
    """(true, predicted) labels of `version`'s predictions of the usable members of
    `dataset_version` in `subsets` (`catalog.membership_query`)."""
    members, member_args = catalog.membership_query(dataset_version, subsets)
    rows = db.query(
        "SELECT p.true_label, p.predicted_label FROM predictions p"
        f" JOIN ({members}) AS mem ON mem.id = p.image_id AND mem.etag = p.etag"
        " WHERE p.model_name = %s AND p.model_version = %s AND p.true_label IS NOT NULL",
        (*member_args, model_name, version),
    )
    return [(r["true_label"], r["predicted_label"]) for r in rows]


def stored_confusion(
    db: Database, model_name: str, version: int
) -> dict[tuple[str, str], int] | None:
    """The confusion counts of `version`'s stored evaluation, or None without one. Equal counts
    mean the same metrics: they are computed from them."""
    if not db.query(
        "SELECT 1 FROM evaluations WHERE model_name = %s AND model_version = %s",
        (model_name, version),
    ):
        return None
    rows = db.query(
        "SELECT true_label, predicted_label, n FROM confusion_matrix"
        " WHERE model_name = %s AND model_version = %s",
        (model_name, version),
    )
    return {(r["true_label"], r["predicted_label"]): int(r["n"]) for r in rows}


def write_evaluation(db: Database, model_name: str, version: int, metrics: dict[str, Any]) -> None:
    """Replace `version`'s evaluation rows (summary, per class, confusion) in one transaction."""
    key = (model_name, version)
    with db.transaction() as cur:
        for table in ("evaluations", "evaluation_classes", "confusion_matrix"):
            cur.execute(f"DELETE FROM {table} WHERE model_name = %s AND model_version = %s", key)
        cur.execute(
            "INSERT INTO evaluations (model_name, model_version, n_images, n_correct, accuracy,"
            " macro_f1, evaluated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                *key,
                metrics["n_images"],
                metrics["n_correct"],
                metrics["accuracy"],
                metrics["macro_f1"],
                utc_now(),
            ),
        )
        cur.executemany(
            "INSERT INTO evaluation_classes (model_name, model_version, label, precision_score,"
            " recall_score, f1_score, support) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (*key, label, c["precision"], c["recall"], c["f1"], c["support"])
                for label, c in metrics["per_class"].items()
            ],
        )
        cur.executemany(
            "INSERT INTO confusion_matrix (model_name, model_version, true_label, predicted_label, n)"
            " VALUES (%s, %s, %s, %s, %s)",
            [(*key, t, p, n) for (t, p), n in sorted(metrics["confusion"].items())],
        )


def _log_to_mlflow(model_name: str, model_version: str, metrics: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = client.get_model_version(model_name, model_version).run_id
    for name in ("accuracy", "macro_f1"):
        client.log_metric(run_id, f"test_{name}", metrics[name])
        client.set_model_version_tag(
            model_name, model_version, f"test_{name}", f"{metrics[name]:.6f}"
        )
    client.set_model_version_tag(
        model_name, model_version, "test_n_images", str(metrics["n_images"])
    )


# ----------------------------------------------------------------------------- CLI


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--model-version", help="a registered version number")
    ref.add_argument("--model-ref", default="champion", help="an alias (default: champion)")
    shards = RUN_PARAMS["shards"].default  # one default for the DAG's form and the CLI
    parser.add_argument(
        "--shards", type=int, default=shards, help=f"number of shards (default {shards})"
    )
    parser.add_argument("--shard", type=int, help="score only this shard (default: all, in turn)")
    parser.add_argument(
        "--force-rescore",
        "--force",
        dest="force_rescore",
        action="store_true",
        help="rescore images already scored by this version (the DAG's force_rescore)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default: bf16 on a GPU, fp32 on a CPU); fp32; bf16 autocast; int8 through"
        " ONNX Runtime on the CPU (quantized on first use)",
    )
    add_location_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 512 on a GPU, 64 on a CPU"
    )
    parser.add_argument("--workers", type=int, default=8, help="fetch/decode threads")
    parser.add_argument(
        "--run-key", help="recorded with every prediction (default: cli__<UTC time>)"
    )


def cli_score(args: argparse.Namespace, settings: Any) -> int:
    db = Database(settings.mysql)
    run_key = args.run_key or cli_run_key()
    store, prefix = location_from_args(settings, args, max_pool_connections=max(32, args.workers))
    plan = plan_scoring(
        db,
        store.bucket,
        prefix,
        model_name=settings.model_name,
        model_ref=args.model_version or args.model_ref,
        shards=args.shards,
        force=args.force_rescore,
    )
    print(
        f"{plan['model_name']} v{plan['model_version']}: {plan['to_score']} images to score"
        f" (dataset {plan['dataset_version']})"
    )
    if args.shard is not None and not 0 <= args.shard < args.shards:
        raise ValueError(f"--shard must be in 0..{args.shards - 1}, got {args.shard}")
    todo = [args.shard] if args.shard is not None else plan["shards"]
    for shard in todo:
        s = score_shard(
            db,
            store,
            model_name=plan["model_name"],
            model_version=plan["model_version"],
            shard=shard,
            shards=args.shards,
            prefix=prefix,
            cache_dir=settings.cache_dir,
            dataset_version=plan["dataset_version"],
            force=args.force_rescore,
            run_key=run_key,
            precision=args.precision,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        print(
            f"shard {shard}/{args.shards}: scored {s['scored']} ({s['images_per_s']} img/s),"
            f" rejected {sum(s['rejected'].values())} {s['rejected'] or ''}".rstrip()
        )
    if args.shard is None:
        e = evaluate(
            db,
            model_name=plan["model_name"],
            model_version=plan["model_version"],
            dataset_version=plan["dataset_version"],
        )
        if e["n_images"]:
            print(
                f"evaluation on {e['n_images']} test images: accuracy {e['accuracy']:.4f},"
                f" macro-F1 {e['macro_f1']:.4f}  (details: python -m pipeline report)"
            )
    return 0
