"""Scoring, predictions, evaluation and views against real S3, MySQL and MLflow (tiny images)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import catalog, registry, report, score, train
from pipeline.db import utc_now
from pipeline.demo_data import render_digits
from pipeline.upload import upload_tree

PREFIX = "ds"
SIZE = 16
REPO = Path(__file__).resolve().parents[2]


def _broken_jpeg() -> bytes:
    """A JPEG cut in half: its header passes the scan, its pixels fail to decode."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def _noise_png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def digits(db, store, tmp_path):
    """Digits (5 per label, 2 of them test) and 4 inbox images, scanned; returns the scan summary."""
    render_digits(tmp_path / "digits", size=SIZE, per_label=5, inbox=4, test_percent=40)
    upload_tree(store, tmp_path / "digits", PREFIX)
    return catalog.scan(db, store, PREFIX)


def _register(mlflow_names, label_map, dataset_version, run_key="run-1") -> str:
    import torch

    from pipeline.model import build_model

    torch.manual_seed(0)
    mlflow.set_experiment(mlflow_names["experiment"])
    with mlflow.start_run():
        return train.log_and_register(
            build_model(len(label_map)),
            model_name=mlflow_names["model_name"],
            label_map=label_map,
            image_size=SIZE,
            dataset_version=dataset_version,
            run_key=run_key,
        )


@pytest.fixture
def champion(db, digits, mlflow_names):
    """A registered (random-init) model on the digits' labels, promoted to champion."""
    version = _register(mlflow_names, digits_label_map(db), digits["dataset_version"])
    registry.move_alias(
        db, mlflow_names["model_name"], "champion", version, actor="pytest", reason="fixture"
    )
    return version


def digits_label_map(db) -> dict[str, int]:
    rows = db.query("SELECT label_map FROM dataset_versions")
    return json.loads(rows[0]["label_map"])


def _expected(db) -> dict[int, str | None]:
    """image_id -> true label (None for inbox) of everything scoring should cover."""
    rows = db.query(
        "SELECT id, subset, label FROM images WHERE subset IN ('test', 'inbox') AND status = 'ok'"
    )
    return {int(r["id"]): r["label"] for r in rows}


def _score_all(db, store, plan, tmp_cache, **kwargs) -> list[dict]:
    return [
        score.score_shard(
            db,
            store,
            model_name=plan["model_name"],
            model_version=plan["model_version"],
            shard=shard,
            shards=plan["n_shards"],
            prefix=PREFIX,
            cache_dir=tmp_cache,
            dataset_version=plan["dataset_version"],
            **({"batch_size": 4, "workers": 4} | kwargs),
        )
        for shard in range(plan["n_shards"])
    ]


def _plan(db, store, mlflow_names, **kwargs):
    return score.plan_scoring(
        db, store.bucket, PREFIX, model_name=mlflow_names["model_name"], shards=2, **kwargs
    )


def _cli_env(db, store, mlflow_names, tmp_cache) -> dict[str, str]:
    """The environment of a `python -m pipeline ...` process on this test's services."""
    return {
        **os.environ,
        "MYSQL_DATABASE": db.name,
        "S3_BUCKET": store.bucket,
        "S3_PREFIX": PREFIX,
        "MODEL_NAME": mlflow_names["model_name"],
        "PIPELINE_CACHE_DIR": str(tmp_cache),
    }


def _predictions(db) -> list[dict]:
    return db.query("SELECT * FROM predictions ORDER BY image_id")


def test_scoring_writes_one_row_per_image_and_a_second_run_writes_nothing(
    db, store, mlflow_names, champion, tmp_cache
):
    expected = _expected(db)
    assert sum(label is None for label in expected.values()) == 4
    plan = _plan(db, store, mlflow_names)
    assert plan["model_version"] == champion
    assert plan["to_score"] == len(expected)
    assert (plan["to_score_labelled"], plan["to_score_inbox"]) == (len(expected) - 4, 4)
    assert plan["shards"] == [0, 1]

    summaries = _score_all(db, store, plan, tmp_cache, run_key="manual__1")
    assert sum(s["scored"] for s in summaries) == len(expected)
    assert all(s["model_version"] == champion and not s["rejected"] for s in summaries)
    rows = _predictions(db)
    assert {r["image_id"]: r["true_label"] for r in rows} == expected
    for r in rows:
        assert r["model_name"] == mlflow_names["model_name"]
        assert r["model_version"] == int(champion)
        assert r["run_key"] == "manual__1"
        top_k = json.loads(r["top_k"])
        assert len(top_k) == 3 and top_k[0]["label"] == r["predicted_label"]
        assert top_k[0]["prob"] == pytest.approx(r["confidence"])
        if r["true_label"] is None:
            assert r["subset"] == "inbox" and r["correct"] is None
        else:
            assert r["subset"] == "test"
            assert r["correct"] == int(r["predicted_label"] == r["true_label"])

    again = _plan(db, store, mlflow_names)
    assert again["to_score"] == 0 and again["shards"] == []
    assert sum(s["scored"] for s in _score_all(db, store, plan, tmp_cache)) == 0
    assert _predictions(db) == rows


def test_an_image_overwritten_under_its_key_is_scored_again_and_old_rows_stop_showing(
    db, store, mlflow_names, champion, tmp_cache
):
    plan = _plan(db, store, mlflow_names)
    _score_all(db, store, plan, tmp_cache, run_key="manual__1")
    inbox = db.query("SELECT id, object_key, etag FROM images WHERE subset = 'inbox' LIMIT 1")[0]
    test = db.query("SELECT id, object_key, etag FROM images WHERE subset = 'test' LIMIT 1")[0]
    for seed, image in enumerate((inbox, test)):  # new content under the same keys
        store.put_bytes(image["object_key"], _noise_png(seed))
    rescanned = catalog.scan(db, store, PREFIX)
    new_etag = {
        r["id"]: r["etag"]
        for r in db.query(
            "SELECT id, etag FROM images WHERE id IN (%s, %s)", (inbox["id"], test["id"])
        )
    }
    assert new_etag[inbox["id"]] != inbox["etag"] and new_etag[test["id"]] != test["etag"]
    # Until it is scored again, the old content's prediction is not shown for the new content.
    latest = db.query(
        "SELECT * FROM v_inbox_latest_predictions WHERE image_id = %s", (inbox["id"],)
    )
    assert latest[0]["predicted_label"] is None

    again = _plan(db, store, mlflow_names)
    assert again["dataset_version"] == rescanned["dataset_version"]
    assert again["to_score"] == 2  # the two overwritten images, nothing else
    assert sum(s["scored"] for s in _score_all(db, store, again, tmp_cache)) == 2
    rows = {r["image_id"]: r for r in _predictions(db)}
    assert len(rows) == len(_expected(db))  # still one row per image
    for image in (inbox, test):
        assert rows[image["id"]]["etag"] == new_etag[image["id"]]
    assert rows[test["id"]]["dataset_version"] == rescanned["dataset_version"]
    latest = db.query(
        "SELECT * FROM v_inbox_latest_predictions WHERE image_id = %s", (inbox["id"],)
    )
    assert latest[0]["predicted_label"] == rows[inbox["id"]]["predicted_label"]
    assert _plan(db, store, mlflow_names)["to_score"] == 0


def test_a_cached_copy_damaged_on_disk_is_fetched_again_not_rejected(
    db, store, mlflow_names, champion, tmp_cache
):
    """A local copy with the right size and wrong bytes (bit rot, a torn write): the image is
    judged by the object S3 holds, the copy replaced, and it is scored like the others."""
    from pipeline.data import ImageCache

    cache = ImageCache(tmp_cache)
    victim = catalog.inbox_images(db, store.bucket, PREFIX)[0]
    copy = cache.path(victim)
    copy.parent.mkdir(parents=True, exist_ok=True)
    good = store.get_bytes(victim.object_key)
    copy.write_bytes(bytes(len(good)))  # as many bytes as the object, all zero

    plan = _plan(db, store, mlflow_names)
    shards = _score_all(db, store, plan, tmp_cache)
    assert not any(s["rejected"] for s in shards)
    row = db.query("SELECT status, reject_reason FROM images WHERE id = %s", (victim.image_id,))
    assert row == [{"status": "ok", "reject_reason": None}]
    assert victim.image_id in {r["image_id"] for r in _predictions(db)}
    assert copy.read_bytes() == good


def test_scoring_keeps_the_image_cache_in_its_budget_without_evicting_what_it_just_read(
    db, store, mlflow_names, champion, tmp_cache, monkeypatch
):
    """`PIPELINE_CACHE_MAX_GB=0`: copies last used long ago (another dataset's) are deleted
    after the shard; the copies this shard read stay (another run may be reading them)."""
    import os
    import time

    from pipeline.data import ImageCache
    from pipeline.records import ImageRecord

    monkeypatch.setenv("PIPELINE_CACHE_MAX_GB", "0")
    cache = ImageCache(tmp_cache)
    stale = cache.path(ImageRecord(10**9, store.bucket, "old/a/1.png", "e", "test", "a"))
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"x" * 5000)
    long_ago = time.time() - 7 * 24 * 3600
    os.utime(stale, (long_ago, long_ago))

    _score_all(db, store, _plan(db, store, mlflow_names), tmp_cache)
    assert not stale.exists()
    scored = catalog.inbox_images(db, store.bucket, PREFIX)
    assert scored and all(cache.path(r).exists() for r in scored)


_DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # no file past 64 bytes: EFBIG
    from pipeline.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_cache_disk_that_takes_no_more_copies_slows_scoring_but_fails_training(
    db, store, digits, mlflow_names, champion, tmp_cache
):
    """A full cache disk (the kernel's file size limit refuses every write past 64 bytes):
    scoring has the bytes in memory and goes on without copies, with one warning; training,
    whose loader opens the copies, fails at once naming the cache."""
    registry.load_model(mlflow_names["model_name"], champion, cache_dir=tmp_cache)
    env = _cli_env(db, store, mlflow_names, tmp_cache)
    run = [sys.executable, "-c", _DISK_FULL]
    scored = subprocess.run(
        [*run, "score", "--batch-size", "4", "--shards", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    output = scored.stdout + scored.stderr
    assert scored.returncode == 0, output[-3000:]
    assert output.count("cannot keep copies (File too large): reading from S3 without") == 1
    rows = db.query("SELECT image_id, COUNT(*) AS n FROM predictions GROUP BY image_id")
    assert {r["image_id"] for r in rows} == set(_expected(db)) and {r["n"] for r in rows} == {1}
    assert not [p for p in (tmp_cache / "images").rglob("*") if p.is_file()]

    trained = subprocess.run(
        [*run, "train", "--dataset-version", digits["dataset_version"], "--epochs", "1"]
        + ["--min-images-per-label", "1", "--force-retrain"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    output = trained.stdout + trained.stderr
    assert trained.returncode != 0
    assert f"the image cache {tmp_cache / 'images'} cannot keep a copy of" in output, output[-3000:]
    assert "free space there or lower PIPELINE_CACHE_MAX_GB" in output


def test_a_cached_model_copy_damaged_on_disk_is_downloaded_again(mlflow_names, champion, tmp_cache):
    """The weights of a cached model version no longer match their registered SHA-256 (a disk
    error): the copy is replaced from the artifact store, not refused on every run."""
    from pipeline import model_files

    name = mlflow_names["model_name"]
    registry.load_model(name, champion, cache_dir=tmp_cache)
    local = Path(tmp_cache) / "models" / registry.safe_name(name) / champion
    weights = model_files.find_file(local, model_files.WEIGHTS_FILE)
    good = weights.read_bytes()
    weights.write_bytes(good[:-64] + bytes(64))

    loaded = registry.load_model(name, champion, cache_dir=tmp_cache)
    assert loaded.model_version == champion
    assert weights.read_bytes() == good
    leftovers = [p.name for p in local.parent.iterdir() if p.name != champion]
    assert leftovers == []  # no stale or partial download directories


def test_forced_rescore_overwrites_the_rows_it_already_has(
    db, store, mlflow_names, champion, tmp_cache
):
    plan = _plan(db, store, mlflow_names)
    _score_all(db, store, plan, tmp_cache, run_key="manual__1")
    before = _predictions(db)

    forced = _plan(db, store, mlflow_names, force=True)
    assert forced["to_score"] == len(before)
    summaries = _score_all(db, store, forced, tmp_cache, force=True, run_key="manual__2")
    assert sum(s["scored"] for s in summaries) == len(before)
    after = _predictions(db)
    assert [r["image_id"] for r in after] == [r["image_id"] for r in before]
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert all(r["run_key"] == "manual__2" for r in after)
    assert all(a["scored_at"] > b["scored_at"] for a, b in zip(after, before, strict=True))


def test_int8_scoring_calibrates_once_on_the_dataset_and_writes_every_row(
    db, store, mlflow_names, champion, tmp_cache, monkeypatch
):
    from pipeline import onnx_runtime

    calibrated = []
    original = onnx_runtime.calibration_images

    def recording(*args, **kwargs):
        images = original(*args, **kwargs)
        calibrated.append(tuple(images.shape))
        return images

    monkeypatch.setattr(onnx_runtime, "calibration_images", recording)
    expected = _expected(db)
    labels = set(digits_label_map(db))
    plan = _plan(db, store, mlflow_names)

    def score_int8(batch_size: int, force: bool) -> int:
        summaries = _score_all(
            db,
            store,
            plan,
            tmp_cache,
            precision="int8",
            force=force,
            batch_size=batch_size,
            workers=2,
        )
        return sum(s["scored"] for s in summaries)

    assert score_int8(batch_size=4, force=False) == len(expected)
    n_calibration = db.query(
        "SELECT COUNT(*) AS n FROM dataset_version_images WHERE dataset_version = %s"
        " AND subset IN ('train', 'val')",
        (plan["dataset_version"],),
    )[0]["n"]
    # One calibration for both shards, on every train/val image of this small dataset.
    assert calibrated == [(n_calibration, 3, SIZE, SIZE)]
    rows = _predictions(db)
    assert {r["image_id"]: r["true_label"] for r in rows} == expected
    for r in rows:
        top_k = json.loads(r["top_k"])
        assert len(top_k) == 3 and {t["label"] for t in top_k} <= labels
        assert top_k[0]["label"] == r["predicted_label"]
        assert [t["prob"] for t in top_k] == sorted((t["prob"] for t in top_k), reverse=True)

    # Other batch sizes (5 leaves remainders) run through the same cached file.
    assert score_int8(batch_size=5, force=True) == len(expected)
    assert len(calibrated) == 1
    assert len(list((tmp_cache / "models").glob("*/onnx/*.int8.onnx"))) == 1
    assert [r["predicted_label"] for r in _predictions(db)] == [r["predicted_label"] for r in rows]

    # The cached file damaged on local disk (same size): quantized again, never loaded.
    (cached,) = (tmp_cache / "models").glob("*/onnx/*.int8.onnx")
    data = bytearray(cached.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    cached.write_bytes(bytes(data))
    assert score_int8(batch_size=4, force=True) == len(expected)
    assert len(calibrated) == 2
    assert [r["predicted_label"] for r in _predictions(db)] == [r["predicted_label"] for r in rows]


_DIES_MID_SHARD = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline import score
    from pipeline.__main__ import main

    original, calls = score._write_batch, []

    def dies_in_second_batch(db, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            return original(db, rows)
        with db.transaction() as cur:
            score.upsert_predictions(cur, rows)
            os.kill(os.getpid(), signal.SIGKILL)  # inserted, never committed

    score._write_batch = dies_in_second_batch
    sys.exit(main(["score", "--batch-size", "4", "--shards", "1"]))
    """
)


def test_a_shard_killed_mid_way_then_rerun_leaves_exactly_one_row_per_image(
    db, store, mlflow_names, champion, tmp_cache
):
    env = _cli_env(db, store, mlflow_names, tmp_cache)
    killed = subprocess.run(
        [sys.executable, "-c", _DIES_MID_SHARD], env=env, cwd=REPO, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    # Only the first batch committed; the second batch's rows died with its transaction.
    assert len(_predictions(db)) == 4

    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline", "score", "--batch-size", "4"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    expected = _expected(db)
    assert f"{len(expected) - 4} images to score" in rerun.stdout
    rows = db.query(
        "SELECT image_id, COUNT(*) AS n FROM predictions GROUP BY image_id ORDER BY image_id"
    )
    assert {r["image_id"] for r in rows} == set(expected)
    assert {r["n"] for r in rows} == {1}
    # The CLI evaluates after scoring every shard.
    assert "accuracy" in rerun.stdout
    assert db.query("SELECT n_images FROM evaluations")[0]["n_images"] == sum(
        label is not None for label in expected.values()
    )


# (true, predicted): a 3/3, b 1/2, c 2/3 correct.
HAND_PAIRS = [
    ("a", "a"),
    ("a", "a"),
    ("a", "b"),
    ("b", "b"),
    ("b", "c"),
    ("c", "c"),
    ("c", "a"),
    ("c", "c"),
]
HAND_CONFUSION = {
    ("a", "a"): 2,
    ("a", "b"): 1,
    ("b", "b"): 1,
    ("b", "c"): 1,
    ("c", "a"): 1,
    ("c", "c"): 2,
}
HAND_CLASSES = {  # label: (precision, recall, f1, support)
    "a": (2 / 3, 2 / 3, 2 / 3, 3),
    "b": (1 / 2, 1 / 2, 1 / 2, 2),
    "c": (2 / 3, 2 / 3, 2 / 3, 3),
}


def _prediction_row(image_id, model_name, version, predicted, true, *, subset="test", **extra):
    values = {
        "image_id": image_id,
        "etag": extra.get("etag"),
        "model_name": model_name,
        "model_version": int(version),
        "predicted_label": predicted,
        "confidence": extra.get("confidence", 0.9),
        "top_k": json.dumps([{"label": predicted, "prob": extra.get("confidence", 0.9)}]),
        "true_label": true,
        "correct": None if true is None else int(true == predicted),
        "subset": subset,
        "dataset_version": extra.get("dataset_version"),
        "mlflow_run_id": "run",
        "run_key": None,
        "scored_at": extra.get("scored_at", utc_now()),
    }
    return tuple(values[c] for c in score._COLUMNS)


def _insert(db, rows) -> None:
    """Upsert `rows`; those without an ETag are made for the image's current content."""
    with db.transaction() as cur:
        score.upsert_predictions(cur, rows)
        cur.execute(
            "UPDATE predictions p JOIN images i ON i.id = p.image_id SET p.etag = i.etag"
            " WHERE p.etag IS NULL"
        )


def test_evaluation_matches_a_hand_computed_confusion_matrix(db, digits, mlflow_names):
    name = mlflow_names["model_name"]
    dataset_version = digits["dataset_version"]
    version = _register(mlflow_names, {"a": 0, "b": 1, "c": 2}, dataset_version)
    test_records = catalog.dataset_images(db, dataset_version, ["test"])
    test_ids = [r.image_id for r in test_records]
    ids = test_ids[: len(HAND_PAIRS)]
    rows = [
        _prediction_row(i, name, version, p, t, dataset_version=dataset_version)
        for i, (t, p) in zip(ids, HAND_PAIRS, strict=True)
    ]
    inbox = catalog.inbox_images(db, digits["bucket"], PREFIX)[0].image_id
    rows.append(_prediction_row(inbox, name, version, "a", None, subset="inbox"))
    # Scored once, then deleted or rejected: such predictions are not evaluated either.
    gone, damaged = test_ids[len(HAND_PAIRS)], test_ids[len(HAND_PAIRS) + 1]
    rows += [_prediction_row(i, name, version, "c", "a") for i in (gone, damaged)]
    _insert(db, rows)
    db.execute("UPDATE images SET deleted_at = NOW(6) WHERE id = %s", (gone,))
    catalog.mark_rejected(db, [(test_records[len(HAND_PAIRS) + 1], "decode_failed: truncated")])

    result = score.evaluate(db, model_name=name, model_version=version)
    assert result["dataset_version"] == dataset_version
    assert result["n_images"] == 8
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3, abs=1e-6)
    stored = db.query("SELECT * FROM evaluations")
    assert len(stored) == 1 and stored[0]["n_correct"] == 5
    assert stored[0]["accuracy"] == pytest.approx(5 / 8)
    classes = db.query("SELECT * FROM evaluation_classes ORDER BY label")
    assert [c["label"] for c in classes] == sorted(HAND_CLASSES)
    for c in classes:
        got = (c["precision_score"], c["recall_score"], c["f1_score"], c["support"])
        assert got == pytest.approx(HAND_CLASSES[c["label"]])
    cells = db.query("SELECT true_label, predicted_label, n FROM confusion_matrix")
    assert {(c["true_label"], c["predicted_label"]): c["n"] for c in cells} == HAND_CONFUSION

    client = MlflowClient()
    mv = client.get_model_version(name, version)
    assert float(mv.tags["test_accuracy"]) == pytest.approx(5 / 8)
    assert mv.tags["test_n_images"] == "8"
    metrics = client.get_run(mv.run_id).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(5 / 8)
    assert metrics["test_macro_f1"] == pytest.approx(11 / 18, abs=1e-6)

    # Nothing changed (a nightly run of an unchanged bucket): nothing rewritten, no MLflow
    # point more.
    written = db.query("SELECT evaluated_at FROM evaluations")
    points = len(client.get_metric_history(mv.run_id, "test_accuracy"))
    same = score.evaluate(db, model_name=name, model_version=version)
    assert same == result
    assert db.query("SELECT evaluated_at FROM evaluations") == written
    assert len(client.get_metric_history(mv.run_id, "test_accuracy")) == points

    # Re-evaluation replaces the version's rows: fix one mistake, a off-diagonal cell disappears.
    _insert(db, [_prediction_row(ids[2], name, version, "a", "a")])
    again = score.evaluate(db, model_name=name, model_version=version)
    assert again["accuracy"] == pytest.approx(6 / 8)
    cells = db.query("SELECT true_label, predicted_label, n FROM confusion_matrix")
    assert ("a", "b") not in {(c["true_label"], c["predicted_label"]) for c in cells}
    assert len(db.query("SELECT * FROM evaluations")) == 1
    assert len(client.get_metric_history(mv.run_id, "test_accuracy")) == points + 1

    text = report.format_report(report.load_evaluation(db, name, version))
    assert "accuracy     0.7500  (6/8)" in text
    assert "confusion matrix" in text


def _alias(db, model_name, alias, version, moved_at="2024-01-01 00:00:00") -> None:
    db.execute(
        "INSERT INTO alias_history (model_name, alias, from_version, to_version, actor, reason,"
        " moved_at) VALUES (%s, %s, NULL, %s, 'pytest', 'test', %s)",
        (model_name, alias, version, moved_at),
    )


def test_views_answer_the_documented_questions(db, digits):
    ids = {
        subset: [
            int(r["id"])
            for r in db.query(
                "SELECT id FROM images WHERE subset = %s AND status = 'ok' ORDER BY id", (subset,)
            )
        ]
        for subset in ("test", "inbox")
    }
    t1, t2, t3 = ids["test"][:3]
    i1, i2, i3, i4 = ids["inbox"]
    m = "m"
    early, late = "2024-01-01 00:00:00", "2024-01-02 00:00:00"
    _insert(
        db,
        [
            # champion v1
            _prediction_row(t1, m, 1, "0", "0", confidence=0.95),
            _prediction_row(t2, m, 1, "1", "2", confidence=0.40),
            _prediction_row(t3, m, 1, "2", "2", confidence=0.55),
            _prediction_row(i1, m, 1, "7", None, subset="inbox", confidence=0.3, scored_at=early),
            _prediction_row(i2, m, 1, "8", None, subset="inbox", confidence=0.9, scored_at=late),
            # challenger v2
            _prediction_row(t1, m, 2, "0", "0", confidence=0.99),
            _prediction_row(t2, m, 2, "2", "2", confidence=0.70),
            _prediction_row(t3, m, 2, "2", "2", confidence=0.80),
            _prediction_row(i1, m, 2, "9", None, subset="inbox", confidence=0.5, scored_at=late),
            _prediction_row(i2, m, 2, "8", None, subset="inbox", confidence=0.5, scored_at=early),
        ],
    )
    _alias(db, m, "champion", 1)
    _alias(db, m, "challenger", 2)

    acc = db.query("SELECT * FROM v_accuracy_by_model_version ORDER BY model_version")
    assert [(r["model_version"], r["alias"], r["n_labelled"]) for r in acc] == [
        (1, "champion", 3),
        (2, "challenger", 3),
    ]
    assert [float(r["accuracy"]) for r in acc] == pytest.approx([2 / 3, 1.0])

    confusion = db.query("SELECT true_label, predicted_label, n FROM v_champion_confusion")
    assert {(r["true_label"], r["predicted_label"]): r["n"] for r in confusion} == {
        ("0", "0"): 1,
        ("2", "1"): 1,
        ("2", "2"): 1,
    }

    # An image deleted, one rejected later and one overwritten under its key count nowhere any
    # more (their predictions stay in `predictions`, for lineage).
    for change in (
        "UPDATE images SET deleted_at = NOW(6) WHERE id = %s",
        "UPDATE images SET status = 'rejected', reject_reason = 'label_conflict' WHERE id = %s",
        "UPDATE images SET etag = 'overwritten' WHERE id = %s",
    ):
        state = db.query(
            "SELECT deleted_at, status, reject_reason, etag FROM images WHERE id = %s", (t2,)
        )[0]
        db.execute(change, (t2,))
        gone = db.query("SELECT model_version, n_labelled FROM v_accuracy_by_model_version")
        assert sorted((r["model_version"], r["n_labelled"]) for r in gone) == [(1, 2), (2, 2)]
        wrong = db.query("SELECT n FROM v_champion_confusion WHERE true_label <> predicted_label")
        assert wrong == []  # t2 was v1's only mistake
        assert db.query("SELECT image_id FROM v_champion_challenger_disagreements") == [
            {"image_id": i1}
        ]
        db.execute(
            "UPDATE images SET deleted_at = %s, status = %s, reject_reason = %s, etag = %s"
            " WHERE id = %s",
            (*state.values(), t2),
        )

    queue = db.query("SELECT image_id, confidence FROM v_review_queue ORDER BY confidence")
    assert [(r["image_id"], r["confidence"]) for r in queue] == [
        (i1, 0.3),
        (t2, 0.40),
        (t3, 0.55),
    ]

    disagreements = db.query("SELECT * FROM v_champion_challenger_disagreements ORDER BY image_id")
    assert [(r["image_id"], r["champion_label"], r["challenger_label"]) for r in disagreements] == (
        sorted([(t2, "1", "2"), (i1, "7", "9")])
    )
    assert {(r["champion_version"], r["challenger_version"]) for r in disagreements} == {(1, 2)}

    inbox = db.query("SELECT * FROM v_inbox_latest_predictions ORDER BY image_id")
    assert [(r["image_id"], r["model_version"], r["predicted_label"]) for r in inbox] == [
        (i1, 2, "9"),
        (i2, 1, "8"),
        (i3, None, None),
        (i4, None, None),
    ]

    # Promoting v2 moves every champion view to it.
    _alias(db, m, "champion", 2, moved_at=late)
    confusion = db.query("SELECT model_version, n FROM v_champion_confusion")
    assert {r["model_version"] for r in confusion} == {2}
    assert sum(r["n"] for r in confusion) == 3
    # Ties on confidence (0.5) come in image order.
    assert [r["image_id"] for r in db.query("SELECT image_id FROM v_review_queue")] == sorted(
        [i1, i2]
    )

    # Every example query of docs/sql.md, in its order, answers with the rows the data above
    # implies (v2 is champion and challenger now; timestamps left out, decimals as floats).
    key = {
        r["id"]: r["object_key"]
        for r in db.query("SELECT id, object_key FROM images WHERE subset = 'inbox'")
    }
    expected = [
        [
            (1, None, 3, 0.6667, None),
            (2, "challenger", 3, 1.0, None),
            (2, "champion", 3, 1.0, None),
        ],
        [],  # the champion's mistakes: v2 has none
        [("0", 1.0, 1.0), ("2", 2.0, 1.0)],
        [(i1, key[i1], "inbox", "9", 0.5, None), (i2, key[i2], "inbox", "8", 0.5, None)],
        [],  # no disagreement: both aliases are on v2
        [
            (key[i1], "9", 0.5, 2),
            (key[i2], "8", 0.9, 1),
            (key[i3], None, None, None, None),
            (key[i4], None, None, None, None),
        ],
        [(2,)],
        [  # lineage: no model_versions rows in this test, so the training columns are empty
            (key[i2], "8", 1, "run", None, None, None, None),
            (key[i1], "9", 2, "run", None, None, None, None),
            (key[i1], "7", 1, "run", None, None, None, None),
            (key[i2], "8", 2, "run", None, None, None, None),
        ],
        [(None, 2, "test", 3), (None, 1, "test", 3), (None, 2, "inbox", 2), (None, 1, "inbox", 2)],
        [],  # no stored evaluation yet
        [],  # nothing rejected while scoring
        [],  # drift history: no check ran here (tests/integration/test_drift.py)
        [],  # drifted runs
        [],  # promotions a person decided (tests/integration/test_train.py has some)
        [],  # questions still open
    ]
    queries = _doc_queries()
    assert len(queries) == len(expected)
    for statement, rows_expected in zip(queries, expected, strict=True):
        rows = db.query(statement.replace("'image-classifier'", "'m'"))
        # Sorted: ties in ORDER BY (equal confidences or times) may come in either order.
        assert sorted(map(_plain, rows), key=repr) == sorted(rows_expected, key=repr), statement


def _plain(row: dict) -> tuple:
    """A result row without timestamps, decimals as floats: comparable with literals."""
    return tuple(
        float(v) if isinstance(v, Decimal) else v
        for v in row.values()
        if not isinstance(v, datetime)
    )


def _doc_queries() -> list[str]:
    text = (REPO / "docs" / "sql.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    return [s for s in statements if s and not all(ln.startswith("--") for ln in s.splitlines())]


def test_a_model_with_other_classes_is_refused_with_both_lists(db, store, digits, mlflow_names):
    version = _register(mlflow_names, {"cat": 0, "dog": 1}, digits["dataset_version"])
    with pytest.raises(ValueError, match=r"\['cat', 'dog'\].*\['eight', 'five', "):
        score.plan_scoring(
            db, store.bucket, PREFIX, model_name=mlflow_names["model_name"], model_ref=version
        )
    # Inbox-only scoring has no labels to compare, so it is allowed.
    plan = score.plan_scoring(
        db,
        store.bucket,
        PREFIX,
        model_name=mlflow_names["model_name"],
        model_ref=version,
        subsets=("inbox",),
    )
    assert plan["to_score"] == 4


def test_vanished_images_are_rejected_and_the_shard_continues(
    db, store, tmp_path, mlflow_names, tmp_cache
):
    render_digits(tmp_path / "digits", size=SIZE, per_label=5, inbox=4, test_percent=40)
    (tmp_path / "digits" / "inbox" / "broken.jpg").write_bytes(_broken_jpeg())
    upload_tree(store, tmp_path / "digits", PREFIX)
    scanned = catalog.scan(db, store, PREFIX)
    # The scan decodes what it reads whole: the broken JPEG never reaches scoring.
    assert scanned["reasons"] == {catalog.REJECT_UNDECODABLE: 1}
    version = _register(mlflow_names, digits_label_map(db), scanned["dataset_version"])
    registry.move_alias(db, mlflow_names["model_name"], "champion", version, actor="t", reason="t")
    gone = db.query("SELECT id, object_key FROM images WHERE subset = 'test' ORDER BY id LIMIT 1")[
        0
    ]
    store.delete(gone["object_key"])
    broken = db.query("SELECT id FROM images WHERE object_key LIKE '%%broken.jpg'")[0]["id"]
    expected = _expected(db)
    assert broken not in expected

    plan = _plan(db, store, mlflow_names)
    assert plan["to_score"] == len(expected)
    summaries = _score_all(db, store, plan, tmp_cache)
    rejected: dict[str, int] = {}
    for s in summaries:
        for reason, n in s["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    assert rejected == {"missing_object": 1}
    assert sum(s["scored"] for s in summaries) == len(expected) - 1
    scored = {r["image_id"] for r in _predictions(db)}
    assert scored == set(expected) - {gone["id"]}
    reasons = {
        r["id"]: r["reject_reason"]
        for r in db.query("SELECT id, reject_reason FROM images WHERE status = 'rejected'")
    }
    assert reasons[gone["id"]].startswith("missing_object")
    assert reasons[broken].startswith("decode_failed")
    # Later runs skip them: nothing left to score.
    assert _plan(db, store, mlflow_names)["to_score"] == 0


def test_scoring_without_a_champion_names_what_to_run_first(db, store, digits, mlflow_names):
    with pytest.raises(registry.NoModelError, match="python -m pipeline train"):
        _plan(db, store, mlflow_names)


def test_a_model_download_finishing_after_anothers_keeps_the_first_and_sweeps_leftovers(
    mlflow_names, champion, tmp_cache
):
    """Two shards on one worker download a new champion at once: the one finishing second
    finds the version in place and uses it (before: `Directory not empty`, a failed try).
    Download directories that killed processes left behind an hour ago are deleted."""
    import os
    import time

    name = mlflow_names["model_name"]
    local = Path(tmp_cache) / "models" / registry.safe_name(name) / champion
    local.parent.mkdir(parents=True)
    killed = local.with_name(f"{champion}.dead.tmp")
    (killed / "model").mkdir(parents=True)
    hour_ago = time.time() - 2 * 3600
    os.utime(killed, (hour_ago, hour_ago))
    running = local.with_name(f"{champion}.live.tmp")  # another process's download, under way
    running.mkdir()

    registry._download_model(name, champion, local)  # the first to finish
    first = (local / "MLmodel").stat().st_ino
    registry._download_model(name, champion, local)  # the second: its copy is dropped
    assert (local / "MLmodel").stat().st_ino == first
    assert registry.load_model(name, champion, cache_dir=tmp_cache).model_version == champion
    assert sorted(p.name for p in local.parent.iterdir()) == sorted([champion, running.name])
