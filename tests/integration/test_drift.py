"""Drift check on real images against real S3, MySQL and MLflow: a tiny model trained once on
eight digits, then windows of new inbox images scored and checked (one Airflow run id each)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from pipeline import catalog, drift, registry, score, train
from pipeline.demo_data import render_digits
from pipeline.train_plan import TrainParams
from pipeline.upload import upload_tree

PREFIX = "ds"
SIZE = 32
UNSEEN = ("eight", "nine")
TINY = TrainParams(epochs=2, batch_size=32, image_size=SIZE, num_workers=0, augment=False)


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    """Digits zero-seven (40 each, 30 % of train as val), a model trained on them and promoted;
    plus `fresh` (unused digits zero-seven) and `unseen` (eights and nines) image files."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.db import create_database, drop_database, migrate
    from pipeline.store import ObjectStore

    suffix = uuid.uuid4().hex[:10]
    db_name = f"{settings.mysql.database}_test_drift_{suffix}"
    db = create_database(settings.mysql, db_name)
    migrate(db)
    store = ObjectStore(settings.s3, f"test-drift-{suffix}")
    store.ensure_bucket()
    name = f"test-drift-{suffix}"
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    tmp = tmp_path_factory.mktemp("drift")
    try:
        dataset = tmp / "digits"
        render_digits(dataset, size=SIZE, per_label=40, inbox=0, test_percent=20)
        for split in ("train", "test"):
            for label in UNSEEN:
                shutil.rmtree(dataset / split / label)
        used = {p.name for p in dataset.rglob("*.png")}
        every = tmp / "every"
        render_digits(every, size=SIZE, inbox=0, test_percent=20)
        fresh = sorted(
            p for p in every.rglob("*.png") if p.name not in used and p.parent.name not in UNSEEN
        )
        fresh = [fresh[i] for i in np.random.default_rng(0).permutation(len(fresh))]
        unseen = sorted(p for p in every.rglob("*.png") if p.parent.name in UNSEEN)
        upload_tree(store, dataset, PREFIX)
        version = catalog.scan(db, store, PREFIX, val_percent=30)["dataset_version"]
        cache = tmp / "cache"
        trained = train.train_model(
            db,
            store,
            version,
            TINY,
            model_name=name,
            run_key="manual__drift",
            cache_dir=cache,
            checkpoint_store=train.LocalCheckpointStore(tmp / "ckpt"),
            experiment=name,
        )
        registry.move_alias(
            db, name, "champion", trained["model_version"], actor="pytest", reason="fixture"
        )
        yield {
            "db": db,
            "store": store,
            "model_name": name,
            "model_version": trained["model_version"],
            "dataset_version": version,
            "cache": cache,
            "fresh": fresh,
            "unseen": [unseen[i] for i in np.random.default_rng(1).permutation(len(unseen))],
            "tmp": tmp,
        }
    finally:
        client = MlflowClient(settings.mlflow_tracking_uri)
        for cleanup in (
            lambda: client.delete_registered_model(name),
            lambda: client.delete_experiment(client.get_experiment_by_name(name).experiment_id),
        ):
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - a failed fixture may not have made them
                pass
        store.delete_bucket()
        drop_database(settings.mysql, db_name)


def _shifted(path: Path, how: str) -> bytes:
    import io

    img = Image.open(path).convert("RGB")
    if how == "inverted":
        img = ImageOps.invert(img)
    elif how == "blurred":
        img = img.filter(ImageFilter.GaussianBlur(radius=4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _score_window(
    world, run_id: str, files: list[Path], how: str = "as-is", subsets=("inbox",), check_it=True
):
    """Upload `files` (transformed) into inbox/, scan, score as Airflow run `run_id`, check."""
    store, db = world["store"], world["db"]
    for path in files:
        data = path.read_bytes() if how == "as-is" else _shifted(path, how)
        store.put_bytes(f"{PREFIX}/inbox/{run_id}-{path.name}", data)
    catalog.scan(db, store, PREFIX, val_percent=30)
    summary = score.score_shard(
        db,
        store,
        model_name=world["model_name"],
        model_version=world["model_version"],
        shard=0,
        shards=1,
        prefix=PREFIX,
        cache_dir=world["cache"],
        dataset_version=world["dataset_version"],
        run_key=run_id,
        subsets=subsets,
        batch_size=16,
        workers=4,
    )
    return summary, check(world, run_id) if check_it else None


def check(world, run_id: str, **thresholds):
    return drift.check_drift(
        world["db"],
        model_name=world["model_name"],
        model_version=world["model_version"],
        run_key=run_id,
        cache_dir=world["cache"],
        thresholds=drift.Thresholds(**thresholds),
    )


def _take(world, n: int) -> list[Path]:
    """`n` fresh digits no other window used (identical files in two windows would be one
    image scored twice)."""
    taken, world["fresh"] = world["fresh"][:n], world["fresh"][n:]
    assert len(taken) == n
    return taken


def test_registered_version_carries_its_reference_as_data(world):
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version(world["model_name"], world["model_version"])
    assert len(mv.tags[drift.REFERENCE_SHA_TAG]) == 64
    ref = drift.load_reference(
        world["model_name"], world["model_version"], cache_dir=world["cache"]
    )
    assert ref is not None and len(ref.labels) == 8
    assert set(ref.meta["val_label_distribution"]) == set(ref.labels)
    assert ref.pca_mean.shape == (512,) and ref.dims == min(32, ref.meta["n_fit"] - 1)
    assert ref.embeddings.shape == (ref.meta["n_reference"], ref.dims)


def test_test_split_and_inbox_are_checked_separately_and_a_rerun_adds_no_rows(world):
    """The first run scores the test split too; its shard rerun and check rerun duplicate
    nothing (one embedding per image and run, one report per subset and run)."""
    files = _take(world, 40)
    summary, report = _score_window(world, "run-first", files, subsets=("test", "inbox"))
    db = world["db"]
    n_test = db.query("SELECT COUNT(*) AS n FROM predictions WHERE subset = 'test'")[0]["n"]
    assert report["subsets"]["inbox"]["n_images"] == 40
    assert report["subsets"]["test"]["n_images"] == n_test
    assert report["subsets"]["inbox"]["status"] == drift.CHECKED
    assert report["subsets"]["inbox"]["drifted"] is False, report

    before = db.query("SELECT COUNT(*) AS n FROM drift_embeddings")[0]["n"]
    assert before == summary["scored"] == 40 + n_test
    score.score_shard(
        db,
        world["store"],
        model_name=world["model_name"],
        model_version=world["model_version"],
        shard=0,
        shards=1,
        prefix=PREFIX,
        cache_dir=world["cache"],
        run_key="run-first",
        subsets=("test", "inbox"),
        force=True,
    )
    check(world, "run-first")
    assert db.query("SELECT COUNT(*) AS n FROM drift_embeddings")[0]["n"] == before
    rows = db.query("SELECT subset, verdict FROM v_drift_history WHERE run_key = 'run-first'")
    assert sorted(r["subset"] for r in rows) == ["inbox", "test"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_new_images_like_the_training_data_are_not_flagged(world, seed):
    _, report = _score_window(world, f"run-fresh-{seed}", _take(world, 60))
    inbox = report["subsets"]["inbox"]
    assert inbox["status"] == drift.CHECKED and inbox["n_images"] == 60
    assert inbox["drifted"] is False, inbox


@pytest.mark.parametrize("how", ["inverted", "blurred"])
def test_colour_inverted_or_blurred_images_are_flagged(world, how):
    _, report = _score_window(world, f"run-{how}", _take(world, 60), how)
    inbox = report["subsets"]["inbox"]
    assert inbox["drifted"] is True, inbox
    assert "embeddings" in inbox["reasons"]
    assert report["drifted"] is True
    row = world["db"].query(
        "SELECT drifted, verdict FROM v_drift_history WHERE run_key = %s AND subset = 'inbox'",
        (f"run-{how}",),
    )
    assert row[0]["drifted"] == 1 and row[0]["verdict"].startswith("drift: ")
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version(world["model_name"], world["model_version"])
    metrics = MlflowClient().get_run(mv.run_id).data.metrics
    assert metrics["drift_inbox_drifted"] == 1.0
    assert {"drift_inbox_mmd_p_value", "drift_inbox_label_shift"} <= set(metrics)


def test_a_class_the_model_never_saw_is_flagged(world):
    _, report = _score_window(world, "run-unseen", world["unseen"][:60])
    assert report["subsets"]["inbox"]["drifted"] is True, report["subsets"]["inbox"]


def test_a_tiny_or_empty_window_says_not_enough_images(world):
    _, report = _score_window(world, "run-tiny", _take(world, 5))
    inbox = report["subsets"]["inbox"]
    assert inbox["status"] == drift.NOT_ENOUGH and inbox["drifted"] is False
    assert inbox["message"] == "not enough images: 5 scored, at least 30 needed"
    empty = check(world, "run-that-scored-nothing")
    assert all(v["status"] == drift.NOT_ENOUGH for v in empty["subsets"].values())
    assert empty["drifted"] is False


def test_small_inbox_runs_add_up_to_one_verdict_then_start_over(world):
    """Hourly inbox runs score a few images each: the inbox window holds what the version
    scored since its last inbox verdict, so small runs add up until there are enough."""
    _, report = _score_window(world, "run-roll-base", _take(world, 30))
    assert report["subsets"]["inbox"]["status"] == drift.CHECKED  # the window starts after it
    seen = []
    for i in range(3):
        _, report = _score_window(world, f"run-roll-{i}", _take(world, 12))
        inbox = report["subsets"]["inbox"]
        seen.append((inbox["status"], inbox["n_images"]))
    assert seen == [(drift.NOT_ENOUGH, 12), (drift.NOT_ENOUGH, 24), (drift.CHECKED, 36)]
    assert report["subsets"]["inbox"]["drifted"] is False
    assert check(world, "run-roll-2")["subsets"]["inbox"]["n_images"] == 36  # a rerun: same
    _, report = _score_window(world, "run-roll-after", _take(world, 5))
    inbox = report["subsets"]["inbox"]
    assert (inbox["status"], inbox["n_images"]) == (drift.NOT_ENOUGH, 5)
    window = "SELECT window_since, window_until FROM drift_reports WHERE run_key = %s AND subset = 'inbox'"
    first = world["db"].query(window, ("run-roll-2",))
    assert first[0]["window_since"] < first[0]["window_until"]
    # Another run checks a window of its own; then run-roll-2's check runs again (cleared, or
    # retried after its MLflow logging failed): the same window, the same verdict, the same
    # time (before: the window started after the other run's verdict: "not enough images").
    _, report = _score_window(world, "run-roll-later", _take(world, 30))
    assert report["subsets"]["inbox"]["status"] == drift.CHECKED
    again = check(world, "run-roll-2")["subsets"]["inbox"]
    assert (again["status"], again["n_images"]) == (drift.CHECKED, 36)
    assert world["db"].query(window, ("run-roll-2",)) == first

    # Images a run scored but did not check (its check failed) are in the next window, also
    # when another run's check runs again meanwhile (its verdict is newer than its window).
    _score_window(world, "run-unchecked", _take(world, 12), check_it=False)
    check(world, "run-roll-later")
    _, report = _score_window(world, "run-next", _take(world, 20))
    assert report["subsets"]["inbox"]["n_images"] == 32
