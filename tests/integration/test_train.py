"""Training and the promotion gate against real S3, MySQL and MLflow (tiny images, one epoch)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import torch
from mlflow import MlflowClient

from pipeline import catalog, drift, registry, score, train
from pipeline.demo_data import render_digits
from pipeline.model import Prediction
from pipeline.train_plan import TrainParams
from pipeline.upload import upload_tree

TINY = TrainParams(epochs=1, batch_size=16, image_size=32, num_workers=0, augment=False)


@pytest.fixture
def dataset(db, store, tmp_path):
    """Digits, 6 per label, scanned; returns the dataset version."""
    render_digits(tmp_path / "digits", size=32, per_label=6, inbox=0)
    upload_tree(store, tmp_path / "digits", "ds")
    return catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]


@pytest.fixture
def trainer(db, store, dataset, mlflow_names, tmp_cache):
    def run(run_key: str, params=TINY, *, on: str | None = None, **kwargs):
        """`train_model` of `run_key` on the fixture's dataset version (or `on`)."""
        return train.train_model(
            db,
            store,
            on or dataset,
            params,
            model_name=mlflow_names["model_name"],
            run_key=run_key,
            cache_dir=tmp_cache,
            checkpoint_store=kwargs.pop("checkpoint_store", train.S3CheckpointStore(store)),
            experiment=mlflow_names["experiment"],
            **kwargs,
        )

    return run


def _gate(db, store, names, version, tmp_cache, **kwargs):
    return registry.promote(
        db,
        store,
        names["model_name"],
        version,
        min_accuracy=kwargs.get("min_accuracy", 0.0),
        promotion_margin=kwargs.get("promotion_margin", 0.0),
        actor="pytest",
        cache_dir=tmp_cache,
        require_approval=kwargs.get("require_approval", False),
        explicit=kwargs.get("explicit", False),
    )


def test_training_registers_a_version_with_its_lineage_and_a_retry_reuses_it(
    trainer, dataset, mlflow_names, store, db
):
    result = trainer("manual__run-1")
    client = MlflowClient()
    mv = client.get_model_version(mlflow_names["model_name"], result["model_version"])
    assert mv.tags["dataset_version"] == dataset
    assert mv.tags["run_key"] == "manual__run-1"
    assert mv.tags["image_size"] == "32"
    label_map = json.loads(mv.tags["label_map"])
    assert sorted(label_map, key=label_map.get) == sorted(label_map)
    assert len(label_map) == 10
    run = client.get_run(result["run_id"])
    assert run.data.params["dataset_version"] == dataset
    assert run.data.params["epochs"] == "1"
    assert {"train_loss", "val_accuracy", "kept_val_accuracy", "kept_epoch"} <= set(
        run.data.metrics
    )
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"confusion_matrix.png", "learning_curves.png", "per_class_metrics.csv"} <= artifacts
    assert "label_map.json" in artifacts
    # The checkpoint is gone once the version is registered.
    assert list(store.iter_objects(train.CHECKPOINT_PREFIX)) == []

    again = trainer("manual__run-1")
    assert again["model_version"] == result["model_version"] and again["reused"]
    versions = client.search_model_versions(f"name='{mlflow_names['model_name']}'")
    assert len(versions) == 1

    # SQL knows the version from registration on, before any gate decided on it.
    row = db.query("SELECT * FROM model_versions WHERE model_name = %s", (mv.name,))
    assert len(row) == 1
    assert (row[0]["model_version"], row[0]["run_id"], row[0]["dataset_version"]) == (
        int(result["model_version"]),
        result["run_id"],
        dataset,
    )
    assert row[0]["run_key"] == "manual__run-1" and row[0]["decision"] is None

    # "Which data and which run produced this prediction?" (docs/sql.md, v_prediction_lineage)
    record = catalog.dataset_images(db, dataset, ["test"])[0]
    with db.transaction() as cur:
        score.upsert_predictions(
            cur,
            score.prediction_rows(
                [(record, Prediction(("3",), (0.9,)))],
                model_name=mv.name,
                model_version=int(result["model_version"]),
                dataset_version=dataset,
                mlflow_run_id=result["run_id"],
                run_key="scheduled__score-1",
                scored_at=datetime(2026, 1, 1),
            ),
        )
    scan = db.query("SELECT MIN(id) AS id FROM scans WHERE dataset_version = %s", (dataset,))[0]
    lineage = db.query(
        "SELECT * FROM v_prediction_lineage WHERE object_key = %s", (record.object_key,)
    )
    assert len(lineage) == 1
    got = lineage[0]
    assert (got["model_version"], got["mlflow_run_id"]) == (
        int(result["model_version"]),
        result["run_id"],
    )
    assert got["training_run_key"] == "manual__run-1"
    assert got["scoring_run_key"] == "scheduled__score-1"
    assert got["training_dataset_version"] == dataset
    assert got["training_scan_id"] == scan["id"] is not None


def test_a_cached_copy_damaged_on_disk_is_not_a_rejection(trainer, db, store, dataset, tmp_cache):
    """A train image's local copy has the object's size but not its bytes (bit rot, a torn
    write): it fails to decode in the loader, but the object in S3 decodes, so training
    replaces the copy and keeps the image instead of rejecting it for good."""
    from pipeline.data import ImageCache

    cache = ImageCache(tmp_cache)
    records = catalog.dataset_images(db, dataset, ["train"])
    cache.fill(store, records)
    victim = records[0]
    good = cache.path(victim).read_bytes()
    cache.path(victim).write_bytes(bytes(len(good)))

    trainer("run-damaged-copy")
    row = db.query("SELECT status, reject_reason FROM images WHERE id = %s", (victim.image_id,))
    assert row == [{"status": "ok", "reject_reason": None}]
    assert cache.path(victim).read_bytes() == good


def test_a_run_cleared_after_the_bucket_changed_trains_on_the_new_dataset_version(
    trainer, db, store, dataset, mlflow_names, tmp_cache, tmp_path
):
    """The same run key (an Airflow run cleared and run again) on another dataset version
    trains and registers for that version instead of returning the old version's model."""
    first = trainer("manual__cleared")
    render_digits(tmp_path / "redrawn", size=40, per_label=6, inbox=0)
    upload_tree(store, tmp_path / "redrawn", "ds")  # every image replaced under its key
    changed = catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]
    assert changed != dataset

    again = trainer("manual__cleared", on=changed, force_retrain=True)
    assert not again.get("reused") and again["model_version"] != first["model_version"]
    tags = registry.version_tags(mlflow_names["model_name"], again["model_version"])
    assert tags["dataset_version"] == changed
    name = mlflow_names["model_name"]
    assert (
        registry.find_version_by_run_key(name, "manual__cleared", dataset) == first["model_version"]
    )
    assert (
        registry.find_version_by_run_key(name, "manual__cleared", changed) == again["model_version"]
    )


def test_gate_promotes_the_first_model_then_keeps_the_champion_against_a_worse_one(
    trainer, db, store, mlflow_names, tmp_cache
):
    first = trainer("run-1")
    decision = _gate(db, store, mlflow_names, first["model_version"], tmp_cache)
    assert decision["decision"] == "promoted" and decision["champion_version"] is None
    assert registry.resolve_model_version(mlflow_names["model_name"]) == first["model_version"]

    second = trainer("run-2", force_retrain=True)
    # Unreachable minimum: the new version must become challenger, the champion stays.
    decision = _gate(db, store, mlflow_names, second["model_version"], tmp_cache, min_accuracy=1.0)
    assert decision["decision"] == "challenger"
    assert decision["champion_version"] == first["model_version"]
    assert decision["champion_accuracy"] is not None
    name = mlflow_names["model_name"]
    assert registry.resolve_model_version(name, "champion") == first["model_version"]
    assert registry.resolve_model_version(name, "challenger") == second["model_version"]
    tags = registry.version_tags(name, second["model_version"])
    assert tags["gate_decision"] == "challenger"

    # A retried gate replays the recorded decision and records no second alias move.
    again = _gate(db, store, mlflow_names, second["model_version"], tmp_cache, min_accuracy=0.0)
    assert again["decision"] == "challenger"
    rows = db.query("SELECT alias, from_version, to_version FROM alias_history ORDER BY id")
    assert [(r["alias"], r["from_version"], r["to_version"]) for r in rows] == [
        ("champion", None, int(first["model_version"])),
        ("challenger", None, int(second["model_version"])),
    ]
    recorded = db.query("SELECT model_version, decision FROM model_versions ORDER BY 1")
    assert [(r["model_version"], r["decision"]) for r in recorded] == [
        (int(first["model_version"]), "promoted"),
        (int(second["model_version"]), "challenger"),
    ]

    rolled = registry.rollback(db, name, second["model_version"], actor="pytest", reason="test")
    assert rolled["decision"] == "rolled_back"
    assert registry.resolve_model_version(name) == second["model_version"]
    assert registry.champion_at(db, name, datetime.now(UTC).replace(tzinfo=None)) == str(
        second["model_version"]
    )


def test_a_dataset_whose_version_the_gate_kept_out_is_not_trained_again(
    trainer, db, store, dataset, mlflow_names, tmp_cache, tmp_path
):
    """The champion trained on an older dataset; the new dataset's version was kept out. The
    next nightly run finds nothing new to train (before: it trained, registered and gated the
    same data every night), nor does one after a change to test images only."""
    from pipeline.train_plan import decide_training

    first = trainer("nightly-1")
    assert _gate(db, store, mlflow_names, first["model_version"], tmp_cache)["decision"] == (
        "promoted"
    )
    render_digits(tmp_path / "redrawn", size=40, per_label=6, inbox=0)
    upload_tree(store, tmp_path / "redrawn", "ds")
    changed = catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]
    second = trainer("nightly-2", on=changed)
    assert second["skipped"] is False
    kept_out = _gate(db, store, mlflow_names, second["model_version"], tmp_cache, min_accuracy=1.0)
    assert kept_out["decision"] == "challenger"

    name = mlflow_names["model_name"]
    assert registry.version_trained_on(db, name, changed) == second["model_version"]
    # The DAG's check_dataset and the CLI decide so.
    info = catalog.get_dataset(db, changed)
    should_train, why = decide_training(db, info, name, min_images_per_label=2)
    assert not should_train and f"already trained: v{second['model_version']}" in why
    assert decide_training(db, info, name, min_images_per_label=2, force_retrain=True)[0]
    third = trainer("nightly-3", on=changed)  # `airflow tasks test train_model`, the CLI
    assert third["skipped"] and third["trained_version"] == second["model_version"]
    # A recorded version that is not MLflow's version of that number any more (the model was
    # deleted and made again: numbers start at 1 again) stops no training.
    key = (name, int(second["model_version"]))
    db.execute(
        "UPDATE model_versions SET run_id = 'another-run' WHERE model_name = %s"
        " AND model_version = %s",
        key,
    )
    assert registry.version_trained_on(db, name, changed) is None
    db.execute(
        "UPDATE model_versions SET run_id = %s WHERE model_name = %s AND model_version = %s",
        (second["run_id"], *key),
    )
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == sorted(
        int(v) for v in (first["model_version"], second["model_version"])
    )
    # A new test image: a new dataset version with the same train and val images.
    extra = next((tmp_path / "redrawn" / "test").iterdir())
    store.put_bytes(f"ds/test/{extra.name}/extra.png", next(extra.iterdir()).read_bytes())
    only_test = catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]
    assert only_test != changed
    assert registry.version_trained_on(db, name, only_test) == second["model_version"]
    assert trainer("nightly-3b", on=only_test)["skipped"]
    # A version recorded before training fingerprints were stored gets one from its members.
    fingerprint = catalog.get_dataset(db, changed)["training_fingerprint"]
    db.execute("UPDATE dataset_versions SET training_fingerprint = NULL")
    assert catalog.training_fingerprint(db, changed) == fingerprint
    assert registry.version_trained_on(db, name, only_test) == second["model_version"]

    forced = trainer("nightly-4", on=changed, force_retrain=True)
    assert forced["skipped"] is False and forced["model_version"] not in (
        first["model_version"],
        second["model_version"],
    )


def test_a_replayed_promotion_over_a_champion_since_replaced_is_decided_again(
    trainer, db, store, mlflow_names, tmp_cache
):
    name = mlflow_names["model_name"]
    first = trainer("run-1")["model_version"]
    _gate(db, store, mlflow_names, first, tmp_cache)
    second = trainer("run-2", force_retrain=True)["model_version"]
    promoted = _gate(db, store, mlflow_names, second, tmp_cache, promotion_margin=1.0)
    assert (promoted["decision"], promoted["champion_version"]) == ("promoted", first)
    # As if v2's alias move had failed: the champion is v1, then another run promotes v3.
    registry.move_alias(db, name, "champion", first, actor="pytest", reason="v2's move failed")
    third = trainer("run-3", force_retrain=True)["model_version"]
    _gate(db, store, mlflow_names, third, tmp_cache, promotion_margin=1.0)
    assert registry.resolve_model_version(name) == third

    # v2's task retried: its decision was against v1, so it is not replayed over v3.
    again = _gate(db, store, mlflow_names, second, tmp_cache, min_accuracy=1.0)
    assert (again["decision"], again["champion_version"]) == ("challenger", third)
    assert registry.resolve_model_version(name) == third
    assert registry.resolve_model_version(name, "challenger") == second
    # A replay over the champion it was compared with still only replays.
    replay = _gate(db, store, mlflow_names, third, tmp_cache, min_accuracy=1.0)
    assert replay["decision"] == "promoted" and registry.resolve_model_version(name) == third


def test_approval_holds_a_promotion_until_a_person_answers(
    trainer, db, store, mlflow_names, tmp_cache, monkeypatch
):
    name = mlflow_names["model_name"]

    def awaiting(run_key: str) -> str:
        version = trainer(run_key, force_retrain=True)["model_version"]
        held = _gate(db, store, mlflow_names, version, tmp_cache, require_approval=True)
        assert held["decision"] == registry.AWAITING_APPROVAL, held
        assert registry.resolve_model_version(name, "challenger") == version
        return version

    def row(version: str) -> dict:
        return db.query(
            "SELECT decision, decision_reason, review, reviewer, review_comment, reviewed_at"
            " FROM model_versions WHERE model_name = %s AND model_version = %s",
            (name, int(version)),
        )[0]

    first = awaiting("run-1")
    assert registry.alias_version(name, "champion") is None  # nothing promoted yet
    subject, body = registry.approval_request(db, name, first, results_url="/imgpipe-results/")
    assert f"{name} v{first}" in subject
    reason = registry.markdown_text(row(first)["decision_reason"])
    for shown in (reason, "none to compare with", "/imgpipe-results/"):
        assert shown in body
    assert f"#/models/{name}/versions/{first}" in body and "/runs/" in body

    approved = registry.review(
        db, name, first, "approved", reviewer="alice", comment="looks right", actor="pytest"
    )
    assert approved["decision"] == "promoted" and approved["reviewer"] == "alice"
    assert registry.resolve_model_version(name) == first
    got = row(first)
    assert (got["review"], got["reviewer"], got["review_comment"]) == (
        "approved",
        "alice",
        "looks right",
    )
    assert got["reviewed_at"] is not None and "approved by alice" in got["decision_reason"]
    tags = registry.version_tags(name, first)
    assert (tags["gate_decision"], tags["gate_review"], tags["gate_reviewer"]) == (
        "promoted",
        "approved",
        "alice",
    )
    moves = db.query("SELECT alias, to_version, actor FROM alias_history ORDER BY id")
    assert moves[-1] == {"alias": "champion", "to_version": int(first), "actor": "reviewer:alice"}
    # A retry after the answer was written replays it: no second move; another answer is refused.
    registry.review(db, name, first, "approved", reviewer="alice", actor="pytest")
    assert db.query("SELECT COUNT(*) AS n FROM alias_history")[0]["n"] == len(moves)
    with pytest.raises(registry.Refusal, match="already approved"):
        registry.review(db, name, first, "rejected", reviewer="mallory", actor="pytest")

    second = awaiting("run-2")
    rejected = registry.review(
        db, name, second, "rejected", reviewer="bob", comment="not on a Friday", actor="pytest"
    )
    assert rejected["decision"] == "challenger" and rejected["champion_version"] == first
    assert registry.resolve_model_version(name) == first
    assert registry.resolve_model_version(name, "challenger") == second
    assert (row(second)["review"], row(second)["reviewer"]) == ("rejected", "bob")
    assert "rejected by bob: not on a Friday" in row(second)["decision_reason"]

    third = awaiting("run-3")
    timed_out = registry.review(db, name, third, "timed_out", reviewer=None, actor="pytest")
    assert timed_out["decision"] == "challenger" and row(third)["reviewer"] is None
    assert registry.resolve_model_version(name) == first
    assert db.query("SELECT COUNT(*) AS n FROM alias_history WHERE alias = 'champion'")[0]["n"] == 1

    # Only a version awaiting approval can be answered.
    fourth = trainer("run-4", force_retrain=True)["model_version"]
    _gate(db, store, mlflow_names, fourth, tmp_cache, min_accuracy=1.0, require_approval=True)
    with pytest.raises(registry.Refusal, match="not awaiting approval"):
        registry.review(db, name, fourth, "approved", reviewer="alice", actor="pytest")

    # From a terminal (a question left open by a cancelled run): the login name is the reviewer.
    from pipeline.__main__ import main

    fifth = awaiting("run-5")
    monkeypatch.setenv("MYSQL_DATABASE", db.name)
    monkeypatch.setenv("USER", "carol")
    cli = ["--model-name", name, "review", "--model-version"]
    assert main([*cli, fifth, "--reject", "--comment", "stale question"]) == 0
    assert (row(fifth)["review"], row(fifth)["reviewer"]) == ("rejected", "cli:carol")
    assert main([*cli, fourth, "--approve"]) == 1  # not awaiting approval
    assert registry.resolve_model_version(name) == first

    # Rolled back, then named by a person: decided again, and alice's answer is no longer its
    # answer, in MySQL or in MLflow's tags.
    registry.rollback(db, name, second, actor="pytest", reason="test")
    again = _gate(db, store, mlflow_names, first, tmp_cache, explicit=True)
    assert again["decision"] in ("promoted", "challenger") and row(first)["review"] is None
    tags = registry.version_tags(name, first)
    assert tags["gate_decision"] == again["decision"]
    assert "gate_review" not in tags and "gate_reviewer" not in tags


def test_train_on_val_trains_on_every_image_and_the_gate_compares_on_test(
    trainer, db, store, dataset, mlflow_names, tmp_cache
):
    from dataclasses import replace

    n = {s: len(catalog.dataset_images(db, dataset, [s])) for s in ("train", "val", "test")}
    result = trainer("run-tov", params=replace(TINY, train_on_val=True))
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.params["train_on_val"] == "True"
    assert int(run.data.params["n_train"]) == n["train"] + n["val"]
    name = mlflow_names["model_name"]
    assert registry.version_tags(name, result["model_version"])["gate_split"] == "test"
    # The drift reference is held out too: taken from test, not from the val images trained on
    # (their in-sample confidences made every held-out image look drifted).
    reference = drift.load_reference(name, result["model_version"], cache_dir=tmp_cache)
    assert n["test"] != n["val"]
    assert reference.meta["n_fit"] + reference.meta["n_reference"] == n["test"]

    decision = _gate(db, store, mlflow_names, result["model_version"], tmp_cache)
    assert decision["decision"] == "promoted"
    assert decision["reason"].endswith(f"on {n['test']} test images")

    # The next challenger (trained on train only) is gated on val, which the champion trained
    # on: it would look better there than it is. Both are compared on test instead.
    challenger = trainer("run-after-tov", force_retrain=True)
    decision = _gate(db, store, mlflow_names, challenger["model_version"], tmp_cache)
    assert decision["champion_version"] == result["model_version"]
    assert decision["reason"].endswith(
        f"on {n['test']} test images (val left out: champion v{result['model_version']}"
        " trained on them)"
    )

    with pytest.raises(ValueError, match="early stopping"):
        TrainParams.from_dict({"train_on_val": True, "patience": 2})


def test_train_images_moved_into_val_are_left_out_of_the_gate(
    trainer, db, store, dataset, mlflow_names, tmp_cache
):
    """The champion trained on some train images; a person then moves them into a val/
    split (S3: copy, delete: new keys, new image ids). The gate compares on that val: without
    them, as the same content under other keys (before: the champion was scored on them)."""
    champion = trainer("run-before-move")
    assert _gate(db, store, mlflow_names, champion["model_version"], tmp_cache)["decision"] == (
        "promoted"
    )
    for record in catalog.dataset_images(db, dataset, ["train"])[:6]:
        store.put_bytes(
            record.object_key.replace("ds/train/", "ds/val/", 1), store.get_bytes(record.object_key)
        )
        store.delete(record.object_key)
    moved = catalog.scan(db, store, "ds")["dataset_version"]
    assert len(catalog.dataset_images(db, moved, ["val"])) == 6
    challenger = trainer("run-after-move", on=moved)
    decision = _gate(db, store, mlflow_names, challenger["model_version"], tmp_cache)
    assert decision["reason"].endswith(
        f"test images (val left out: champion v{champion['model_version']} trained on them)"
    )


def test_a_label_whose_train_images_went_away_since_the_check_refuses_training(
    trainer, db, dataset
):
    """check_dataset passed on the version's counts; then every train image of one label is
    deleted (the inbox DAG's scan marks them): refused, naming the label, before an epoch
    (before: trained and registered a model that could never predict it)."""
    from pipeline.errors import Refusal

    db.execute("UPDATE images SET deleted_at = NOW(6) WHERE label = 'seven' AND subset = 'train'")
    with pytest.raises(Refusal, match=r"labels \['seven'\] .* no usable train image any more"):
        trainer("run-gone-label")


def test_an_empty_minimum_per_label_is_the_prefixs_saved_setting(
    db, store, dataset, mlflow_names, tmp_cache, monkeypatch, capsys
):
    """A person raises `min_images_per_label` on an unchanged bucket: the same dataset version
    (its row keeps the first scan's setting), the prefix's saved setting changes. Training
    without the param (the nightly run, a plain CLI call) checks against the saved one."""
    from pipeline.__main__ import main

    assert catalog.scan(db, store, "ds", min_images_per_label=50)["dataset_version"] == dataset
    monkeypatch.setenv("MYSQL_DATABASE", db.name)
    monkeypatch.setenv("S3_BUCKET", store.bucket)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_cache))
    argv = ["--model-name", mlflow_names["model_name"], "train", "--prefix", "ds"]
    assert main([*argv, "--epochs", "1", "--num-workers", "0"]) == 1
    assert "labels with fewer than 50 train images" in capsys.readouterr().err


def test_training_is_skipped_when_the_champion_was_trained_on_this_dataset(
    trainer, db, store, mlflow_names, tmp_cache
):
    first = trainer("run-1")
    _gate(db, store, mlflow_names, first["model_version"], tmp_cache)
    skipped = trainer("run-2")
    assert skipped["skipped"] and skipped["champion_version"] == first["model_version"]
    assert len(MlflowClient().search_model_versions(f"name='{mlflow_names['model_name']}'")) == 1


class _Interrupted(Exception):
    pass


class _DiesAfterFirstCheckpoint(train.S3CheckpointStore):
    """A real S3 checkpoint store whose process 'dies' right after the first epoch is saved."""

    def save(self, name, data):
        super().save(name, data)
        raise _Interrupted("killed after epoch checkpoint")


def test_interrupted_training_resumes_after_the_last_finished_epoch(trainer, store, mlflow_names):
    params = TrainParams(epochs=2, batch_size=16, image_size=32, num_workers=0)
    with pytest.raises(_Interrupted):
        trainer("run-x", params, checkpoint_store=_DiesAfterFirstCheckpoint(store))
    saved = train.load_checkpoint(
        train.S3CheckpointStore(store), train.checkpoint_name(mlflow_names["model_name"], "run-x")
    )
    assert saved["epoch"] == 1

    result = trainer("run-x", params)
    assert result["epochs_run"] == 2
    assert result["run_id"] == saved["run_id"]  # same MLflow run, continued
    history = MlflowClient().get_metric_history(result["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]


class _FailsSecondCheckpoint(train.S3CheckpointStore):
    """A real S3 checkpoint store whose second save fails (S3 down, the lock lost) unwritten."""

    saves = 0

    def save(self, name, data):
        self.saves += 1
        if self.saves == 2:
            raise _Interrupted("checkpoint of epoch 2 not written")
        super().save(name, data)


def test_an_epoch_whose_checkpoint_failed_logs_its_metrics_once(trainer, store, mlflow_names):
    """Epoch 2's checkpoint is not written: the retry resumes after epoch 1 and runs epoch 2
    again. Its metrics are in MLflow once (before: logged before the checkpoint, twice)."""
    params = TrainParams(epochs=3, batch_size=16, image_size=32, num_workers=0)
    with pytest.raises(_Interrupted):
        trainer("run-twice", params, checkpoint_store=_FailsSecondCheckpoint(store))
    result = trainer("run-twice", params)
    for metric in ("val_accuracy", "train_loss"):
        steps = [m.step for m in MlflowClient().get_metric_history(result["run_id"], metric)]
        assert sorted(steps) == [1, 2, 3], (metric, steps)


def test_a_checkpoint_whose_mlflow_run_was_deleted_starts_over(trainer, store, mlflow_names):
    """Someone deleted the failed attempt's run in the MLflow UI: its checkpoint cannot be
    continued there, so the retry trains from the start in a new run (before: every retry
    failed on 'Cannot start run ... deleted' until someone removed the checkpoint by hand)."""
    params = TrainParams(epochs=2, batch_size=16, image_size=32, num_workers=0)
    with pytest.raises(_Interrupted):
        trainer("run-deleted", params, checkpoint_store=_DiesAfterFirstCheckpoint(store))
    name = train.checkpoint_name(mlflow_names["model_name"], "run-deleted")
    saved = train.load_checkpoint(train.S3CheckpointStore(store), name)
    MlflowClient().delete_run(saved["run_id"])

    result = trainer("run-deleted", params)
    assert result["run_id"] != saved["run_id"] and result["epochs_run"] == 2
    history = MlflowClient().get_metric_history(result["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]


def _train_cli(db, store, mlflow_names, tmp_path, dataset, run_key, epochs):
    """(environment, argv) of a `python -m pipeline train` process on this test's services."""
    import os
    import sys

    env = {
        **os.environ,
        "MYSQL_DATABASE": db.name,
        "S3_BUCKET": store.bucket,
        "MODEL_NAME": mlflow_names["model_name"],
        "PIPELINE_CACHE_DIR": str(tmp_path / "cache"),
    }
    argv = [
        *(sys.executable, "-m", "pipeline", "train", "--prefix", "ds"),
        *("--dataset-version", dataset, "--run-key", run_key, "--epochs", str(epochs)),
        *("--num-workers", "0", "--min-images-per-label", "1"),
    ]
    return env, argv


def _first_checkpoint(process, checkpoints, ckpt: str) -> dict:
    """The checkpoint `ckpt`, once the training `process` has saved one (within 300 s)."""
    import time

    deadline = time.monotonic() + 300
    saved = None
    while saved is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        saved = train.load_checkpoint(checkpoints, ckpt)
    assert saved is not None, process.communicate()[0].decode(errors="replace")[-3000:]
    return saved


def test_training_killed_mid_run_resumes_after_its_last_checkpoint(
    db, store, dataset, mlflow_names, tmp_path, settings
):
    """A real SIGKILL of `python -m pipeline train`, then the same run key again."""
    import signal
    import subprocess

    epochs = 4
    env, argv = _train_cli(db, store, mlflow_names, tmp_path, dataset, "manual__killed", epochs)
    argv += ["--batch-size", "2", "--image-size", "64"]
    ckpt = train.checkpoint_name(mlflow_names["model_name"], "manual__killed")
    # The CLI keeps checkpoints in the work bucket (PIPELINE_WORK_BUCKET), not the image bucket.
    checkpoints = train.S3CheckpointStore(store.with_bucket(settings.work_bucket))
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _first_checkpoint(first, checkpoints, ckpt)  # one epoch saved, more to come
    first.send_signal(signal.SIGKILL)  # mid-epoch: no handler, no cleanup
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    killed_at = train.load_checkpoint(checkpoints, ckpt)
    assert 1 <= killed_at["epoch"] < epochs
    client = MlflowClient()
    assert client.search_model_versions(f"name='{mlflow_names['model_name']}'") == []

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert f"after epoch {killed_at['epoch']}" in output  # resumed, not started over
    versions = client.search_model_versions(f"name='{mlflow_names['model_name']}'")
    assert len(versions) == 1 and versions[0].run_id == killed_at["run_id"]
    steps = {m.step for m in client.get_metric_history(killed_at["run_id"], "val_accuracy")}
    assert steps == set(range(1, epochs + 1))
    assert train.load_checkpoint(checkpoints, ckpt) is None  # removed once registered


def test_a_stray_label_refuses_training_or_is_excluded_with_a_warning_in_mlflow(
    db, store, tmp_path, mlflow_names, tmp_cache
):
    import io

    from PIL import Image

    from pipeline.errors import Refusal
    from pipeline.train_plan import training_decision

    render_digits(tmp_path / "digits", size=32, per_label=8, inbox=0)
    upload_tree(store, tmp_path / "digits", "ds")
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 50).convert("RGB").save(buf, format="PNG")
    store.put_bytes("ds/train/stray folder/x.png", buf.getvalue())

    refused = catalog.scan(db, store, "ds", val_percent=30, min_images_per_label=2)
    info = catalog.get_dataset(db, refused["dataset_version"])
    assert min(n for label, n in info["counts"]["train"].items() if label != "stray folder") >= 2
    with pytest.raises(Refusal, match=r": 'stray folder' \(1\) .*small_label_policy"):
        training_decision(info, champion_dataset_version=None, min_images_per_label=2)

    summary = catalog.scan(db, store, "ds", small_label_policy="exclude")
    assert summary["excluded_labels"] == {"stray folder": 1}
    assert "stray folder" not in summary["label_map"] and len(summary["label_map"]) == 10
    info = catalog.get_dataset(db, summary["dataset_version"])
    assert info["excluded_labels"] == {"stray folder": 1}
    assert training_decision(info, champion_dataset_version=None, min_images_per_label=2)[0]
    result = train.train_model(
        db,
        store,
        summary["dataset_version"],
        TINY,
        model_name=mlflow_names["model_name"],
        run_key="manual__stray",
        cache_dir=tmp_cache,
        checkpoint_store=train.LocalCheckpointStore(tmp_path / "ckpt"),
        experiment=mlflow_names["experiment"],
    )
    run = MlflowClient().get_run(result["run_id"])
    assert json.loads(run.data.tags["excluded_labels"]) == {"stray folder": 1}


def test_a_val_label_with_no_train_image_is_left_out_of_validation(
    trainer, db, store, dataset, tmp_path
):
    """`allow_unseen_labels` accepts a label only under val/; training validates on the labels
    it trains (a KeyError of the label map before) and registers its model."""
    import io

    from PIL import Image

    from pipeline.train_plan import training_decision

    labels = sorted(p.name for p in (tmp_path / "digits" / "train").iterdir())  # `dataset`'s
    for i, label in enumerate([*labels, "fox"]):
        buf = io.BytesIO()
        Image.effect_noise((32, 32), 20 + i).convert("RGB").save(buf, format="PNG")
        store.put_bytes(f"ds/val/{label}/v{i}.png", buf.getvalue())
    summary = catalog.scan(db, store, "ds")
    assert summary["unseen_labels"] == ["fox"]
    info = catalog.get_dataset(db, summary["dataset_version"])
    assert training_decision(info, champion_dataset_version=None, allow_unseen_labels=True)[0]
    result = trainer("manual__val-only-label", on=summary["dataset_version"])
    params = MlflowClient().get_run(result["run_id"]).data.params
    assert (params["n_val"], params["n_classes"]) == (str(len(labels)), str(len(labels)))
    assert result["model_version"]


def _tiny_training(lr: float) -> train.Training:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return train.Training(
        model=model,
        step_model=model,
        criterion=torch.nn.CrossEntropyLoss(ignore_index=-1),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
        device=torch.device("cpu"),
        autocast_dtype=None,
        scaler=None,
        transform=None,
    )


class _NotToBeRead:
    def __len__(self):
        return 1

    def __iter__(self):
        raise AssertionError("a run resumed after its early stop trained another epoch")


def test_a_run_resumed_after_its_early_stop_trains_no_more_and_still_rejects_its_bad_images(
    mlflow_names, tmp_path
):
    """The crash comes after the early stop's checkpoint, before registration: the retry goes
    straight to registration, with the images that failed to decode before."""
    import mlflow

    from pipeline.records import ImageRecord

    images = torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8)
    batch = (images, torch.tensor([0, 1, -1, 0]), torch.arange(4))  # image 2 did not decode
    records = (
        [ImageRecord(100 + i, "b", f"train/a/{i}.png", "e", "train", "a") for i in range(4)],
        [ImageRecord(200 + i, "b", f"val/a/{i}.png", "e", "val", "a") for i in range(4)],
    )
    params = TrainParams(epochs=6, patience=1, num_workers=0)
    identity = train.checkpoint_identity("dv", params)
    store = train.LocalCheckpointStore(tmp_path)
    training, progress = _tiny_training(lr=0.0), train.Progress()  # lr 0: val never improves

    def save():
        state = train.checkpoint_state(
            training, progress, identity, label_map={"a": 0, "b": 1}, records=records
        )
        train.save_checkpoint(store, "m/run/last.pt", state)

    mlflow.set_experiment(mlflow_names["experiment"])
    with mlflow.start_run():
        train.run_epochs(training, progress, [batch], [batch], params, save=save)
    assert progress.stopped_early and progress.epoch == 2  # best epoch 1, patience 1

    retry = _tiny_training(lr=0.0)
    resumed = train.resume_state(retry, store, "m/run/last.pt", identity, records=records)
    assert (resumed.epoch, resumed.stopped_early) == (2, True)
    assert (resumed.bad_train, resumed.bad_val) == ({2}, {2})
    train.run_epochs(retry, resumed, _NotToBeRead(), _NotToBeRead(), params, save=save)
    assert resumed.epoch == 2 and len(resumed.history) == 2


def test_a_second_attempt_of_a_run_key_waits_for_the_first_and_takes_over_when_it_dies(
    db, store, dataset, mlflow_names, tmp_path, settings
):
    """Two real `python -m pipeline train` processes with one run key (a retry started while a
    lost attempt still trains): the second waits on the run key's lock instead of training
    beside it; SIGKILL of the first releases the lock, and the second resumes its checkpoint."""
    import signal
    import subprocess
    import time

    epochs, run_key = 3, "manual__overlap"
    env, argv = _train_cli(db, store, mlflow_names, tmp_path, dataset, run_key, epochs)
    argv += ["--batch-size", "4", "--image-size", "32"]
    ckpt = train.checkpoint_name(mlflow_names["model_name"], run_key)
    checkpoints = train.S3CheckpointStore(store.with_bucket(settings.work_bucket))
    # The first attempt stalls after its first epoch's checkpoint, as a lost worker would.
    first = subprocess.Popen(
        argv,
        env={**env, train.PAUSE_AFTER_CHECKPOINT_ENV: "600"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    second = None
    try:
        saved = _first_checkpoint(first, checkpoints, ckpt)
        assert saved["epoch"] == 1
        deadline = time.monotonic() + 300

        log_path = tmp_path / "second.log"
        with open(log_path, "wb") as out:
            second = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        while "waiting up to" not in log_path.read_text() and time.monotonic() < deadline:
            assert second.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert "waiting up to" in log_path.read_text()
        time.sleep(2)  # the second attempt must still be waiting: no epoch of its own
        assert train.load_checkpoint(checkpoints, ckpt)["epoch"] == 1
        assert "resuming from" not in log_path.read_text()

        first.send_signal(signal.SIGKILL)  # its MySQL connection ends: the lock is released
        first.wait(timeout=30)
        assert second.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    output = log_path.read_text()
    assert "resuming from" in output and "after epoch 1" in output
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{mlflow_names['model_name']}'")
    assert len(versions) == 1 and versions[0].run_id == saved["run_id"]
    history = client.get_metric_history(saved["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # each epoch once
