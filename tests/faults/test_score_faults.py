"""Scoring faults with real processes: the S3 server killed mid-shard, a MySQL connection killed
inside a prediction upsert. Nothing is rejected for an outage; every image ends with exactly
one prediction."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace

import pytest

from pipeline import catalog, registry, score
from pipeline.demo_data import render_digits
from pipeline.errors import ServiceUnavailable
from pipeline.store import ObjectStore
from pipeline.upload import upload_tree
from tests.faults.not_s3_server import NotS3Server
from tests.faults.private_s3 import PrivateS3, wait_until
from tests.faults.test_scan_faults import count
from tests.integration.test_score import (
    PREFIX,
    SIZE,
    _expected,
    _register,
    digits_label_map,
)


def _champion(db, store, mlflow_names, tmp_path, per_label: int) -> dict:
    """Digits in `store`, scanned, a random-init champion on their labels; returns the plan."""
    render_digits(tmp_path / "digits", size=SIZE, per_label=per_label, inbox=6, test_percent=60)
    upload_tree(store, tmp_path / "digits", PREFIX)
    scanned = catalog.scan(db, store, PREFIX)
    version = _register(mlflow_names, digits_label_map(db), scanned["dataset_version"])
    registry.move_alias(db, mlflow_names["model_name"], "champion", version, actor="t", reason="t")
    return score.plan_scoring(
        db, store.bucket, PREFIX, model_name=mlflow_names["model_name"], shards=1
    )


def _score(db, store, plan, cache_dir, **kwargs) -> dict:
    return score.score_shard(
        db,
        store,
        model_name=plan["model_name"],
        model_version=plan["model_version"],
        shard=0,
        shards=1,
        prefix=PREFIX,
        cache_dir=cache_dir,
        dataset_version=plan["dataset_version"],
        **({"batch_size": 4, "workers": 1} | kwargs),
    )


def _one_prediction_each(db, expected: dict) -> None:
    rows = db.query("SELECT image_id, COUNT(*) AS n FROM predictions GROUP BY image_id")
    assert {int(r["image_id"]) for r in rows} == set(expected)
    assert all(r["n"] == 1 for r in rows)


def test_s3_killed_while_scoring_rejects_nothing_and_the_retry_scores_every_image_once(
    settings, db, mlflow_names, tmp_path
):
    s3 = PrivateS3(tmp_path / "s3", settings.s3)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.start(bucket)
    try:
        store = ObjectStore(s3.settings, bucket)
        plan = _champion(db, store, mlflow_names, tmp_path, per_label=16)
        expected = _expected(db)
        assert plan["to_score"] == len(expected) > 60
        errors = s3.kill_during(
            lambda: _score(db, store, plan, tmp_path / "cache"),
            lambda: count(db, "SELECT COUNT(*) FROM predictions") >= 8,
        )
        assert len(errors) == 1 and isinstance(errors[0], ServiceUnavailable), errors
        assert f"S3 at {s3.endpoint}" in str(errors[0])
        assert count(db, "SELECT COUNT(*) FROM images WHERE status <> 'ok'") == 0
        scored_before = count(db, "SELECT COUNT(*) FROM predictions")
        assert 8 <= scored_before < len(expected)

        s3.start(bucket)  # the outage ends; Airflow's retry runs the shard again
        retry = _score(db, ObjectStore(s3.settings, bucket), plan, tmp_path / "cache")
        assert retry["scored"] == len(expected) - scored_before and retry["rejected"] == {}
        _one_prediction_each(db, expected)
    finally:
        s3.kill()


def test_an_ingress_answering_404_for_s3_rejects_nothing(
    settings, db, store, mlflow_names, tmp_path
):
    """S3 behind an ingress whose backend is gone (restarting, a wrong route): every GET gets
    "404 page not found" as text/plain. That is no S3 answer about the objects: the shard fails
    as an outage naming the endpoint, and no image is rejected as missing."""
    plan = _champion(db, store, mlflow_names, tmp_path, per_label=2)
    expected = _expected(db)
    ingress = NotS3Server(404)
    try:
        behind = ObjectStore(replace(settings.s3, endpoint_url=ingress.uri), store.bucket)
        with pytest.raises(ServiceUnavailable, match=f"S3 at {ingress.uri}: .*404 page not found"):
            _score(db, behind, plan, tmp_path / "cache")
        assert ingress.requests > 0
    finally:
        ingress.close()
    assert count(db, "SELECT COUNT(*) FROM images WHERE status <> 'ok'") == 0
    assert count(db, "SELECT COUNT(*) FROM predictions") == 0

    retry = _score(db, store, plan, tmp_path / "cache")  # the route is back
    assert retry["scored"] == len(expected) and retry["rejected"] == {}
    _one_prediction_each(db, expected)


def test_mysql_connection_killed_inside_an_upsert_is_retried_with_one_row_per_image(
    db, store, mlflow_names, tmp_path, caplog
):
    plan = _champion(db, store, mlflow_names, tmp_path, per_label=3)
    expected = _expected(db)
    first_id = min(expected)
    # An uncommitted prediction of the first image holds its row lock: the shard's first
    # upsert waits on it, and the test kills that waiting connection.
    blocker = db.connect()
    errors: list[BaseException] = []
    results: list[dict] = []
    try:
        with blocker.cursor() as cur:
            cur.execute(
                "INSERT INTO predictions (image_id, model_name, model_version, predicted_label,"
                " confidence, top_k, subset, mlflow_run_id, scored_at)"
                " VALUES (%s, %s, %s, 'x', 0, '[]', 'test', 'blocker', NOW(6))",
                (first_id, plan["model_name"], int(plan["model_version"])),
            )

        def run() -> None:
            try:
                results.append(_score(db, store, plan, tmp_path / "cache", batch_size=64))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        caplog.set_level(logging.WARNING, logger="pipeline.db")
        scoring = threading.Thread(target=run)
        scoring.start()
        waiting = "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND INFO LIKE %s"
        like = "INSERT INTO predictions%"
        wait_until(lambda: db.query(waiting, (db.name, like)), what="the upsert to wait")
        victim = db.query(waiting, (db.name, like))[0]["ID"]
        db.execute("KILL CONNECTION %s", (victim,))
        time.sleep(0.2)
        blocker.rollback()  # the in-task retry can now write its batch
        scoring.join(timeout=120)
    finally:
        blocker.close()

    assert errors == [] and results[0]["scored"] == len(expected)
    assert any(
        "MySQL at" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records
    )
    _one_prediction_each(db, expected)


def test_a_cached_copy_cut_short_is_fetched_again(db, store, tmp_path):
    from pipeline.data import ImageCache
    from tests.integration.test_catalog import png

    store.put_bytes(f"{PREFIX}/inbox/a.png", png(5))
    catalog.scan(db, store, PREFIX)
    record = catalog.inbox_images(db, store.bucket, PREFIX)[0]
    assert record.size == len(png(5))
    cache = ImageCache(tmp_path / "cache")
    path = cache.path(record)
    path.parent.mkdir(parents=True)
    path.write_bytes(png(5)[:-10])  # e.g. a crash of another writer on a shared volume

    assert cache.get(store, record) == png(5)
    assert path.read_bytes() == png(5)
    assert list(path.parent.glob("*.tmp")) == []
    assert cache.fill(store, [record]) == {}
