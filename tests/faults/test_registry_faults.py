"""Registry faults with real processes: MLflow killed during a training retry's lookup, a
registration whose reply was lost, a promote SIGKILLed between the MLflow alias move and its
history row, a move whose lock connection ended, racing promotes and rollbacks, and two datasets
that must keep their own champions."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient

from pipeline import catalog, registry, train
from pipeline.db import mysql_lock_name
from pipeline.demo_data import render_digits
from pipeline.errors import ServiceUnavailable
from pipeline.train_plan import TrainParams
from pipeline.upload import upload_tree
from tests.faults.reply_dropping_proxy import reply_dropping_proxy

TINY = TrainParams(epochs=1, batch_size=16, image_size=32, num_workers=0, augment=False)
SIZE = 32


def _dataset(db, store, tmp_path, prefix: str, rename: dict[str, str] | None = None) -> str:
    """Digits (6 per label) under `prefix`, scanned; `rename` keeps only the labels it names,
    under new names (a two-class "photo" dataset). Returns the dataset version."""
    root = tmp_path / prefix
    render_digits(root, size=SIZE, per_label=6, inbox=0)
    if rename is not None:
        for split in ("train", "test"):
            for label_dir in sorted((root / split).iterdir()):
                if label_dir.name in rename:
                    label_dir.rename(label_dir.with_name(rename[label_dir.name]))
                else:
                    shutil.rmtree(label_dir)
    upload_tree(store, root, prefix)
    return catalog.scan(db, store, prefix, val_percent=30)["dataset_version"]


def _register(db, model_name: str, dataset_version: str, run_key: str) -> str:
    """A randomly initialised model on the dataset's labels, registered like training does."""
    import mlflow
    import torch

    from pipeline.model import build_model

    label_map = catalog.get_dataset(db, dataset_version)["label_map"]
    torch.manual_seed(0)
    mlflow.set_experiment(model_name)
    with mlflow.start_run():
        mlflow.set_tag("run_key", run_key)  # what train_model's run carries (provenance)
        version = train.log_and_register(
            build_model(len(label_map)),
            model_name=model_name,
            label_map=label_map,
            image_size=SIZE,
            dataset_version=dataset_version,
            run_key=run_key,
        )
    registry.record_version(db, model_name, version)
    return version


def _gate(db, store, model_name, version, cache_dir, **kwargs) -> dict:
    return registry.promote(
        db,
        store,
        model_name,
        version,
        min_accuracy=kwargs.pop("min_accuracy", 0.0),
        promotion_margin=kwargs.pop("promotion_margin", 1.0),
        actor="pytest",
        cache_dir=cache_dir,
        **kwargs,
    )


def _sql_aliases(db, model_name) -> dict[str, str]:
    rows = db.query(
        "SELECT alias, model_version FROM v_current_aliases WHERE model_name = %s", (model_name,)
    )
    return {r["alias"]: str(r["model_version"]) for r in rows}


def _mlflow_aliases(model_name) -> dict[str, str]:
    aliases = MlflowClient().get_registered_model(model_name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def _history(db, model_name) -> list[tuple]:
    rows = db.query(
        "SELECT alias, from_version, to_version, actor FROM alias_history WHERE model_name = %s"
        " ORDER BY id",
        (model_name,),
    )
    return [(r["alias"], r["from_version"], r["to_version"], r["actor"]) for r in rows]


@pytest.fixture
def model_name(settings) -> str:
    """A registered-model name on the shared MLflow server, deleted afterwards."""
    name = f"faults-model-{uuid.uuid4().hex[:10]}"
    yield name
    client = MlflowClient(settings.mlflow_tracking_uri)
    for what in ("registered model", "experiment"):
        try:
            if what == "registered model":
                client.delete_registered_model(name)
            elif (experiment := client.get_experiment_by_name(name)) is not None:
                client.delete_experiment(experiment.experiment_id)
        except Exception:  # noqa: BLE001 - the test may not have created it
            pass


# ----------------------------------------------------------------------------- 5


def test_mlflow_killed_before_a_training_retry_fails_naming_mlflow_and_registers_once(
    db, store, private_mlflow, tmp_path
):
    dataset = _dataset(db, store, tmp_path, "ds")
    name, run_key = "faults-retry", "scheduled__mlflow-down"

    def attempt() -> dict:
        return train.train_model(
            db,
            store,
            dataset,
            TINY,
            model_name=name,
            run_key=run_key,
            cache_dir=tmp_path / "cache",
            checkpoint_store=train.LocalCheckpointStore(tmp_path / "checkpoints"),
            force_retrain=True,  # the champion check would meet the outage first
            experiment=name,
        )

    first = attempt()
    private_mlflow.kill()
    refused = rf"^MLflow at {re.escape(private_mlflow.uri)}: connection refused"
    with pytest.raises(ServiceUnavailable, match=refused):
        registry.find_version_by_run_key(name, run_key)
    # The retry fails instead of taking the outage for "not registered yet" and training again.
    with pytest.raises(ServiceUnavailable, match=refused):
        attempt()

    private_mlflow.start()  # Airflow's next try, once MLflow is back
    again = attempt()
    assert again["reused"] and again["model_version"] == first["model_version"]
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    assert [(v.version, v.tags["run_key"]) for v in versions] == [(first["model_version"], run_key)]
    rows = db.query("SELECT model_version FROM model_versions WHERE model_name = %s", (name,))
    assert [str(r["model_version"]) for r in rows] == [first["model_version"]]


def test_a_registration_whose_reply_was_lost_leaves_one_version(
    settings, db, store, model_name, tmp_path, monkeypatch
):
    """The server creates the version but its reply never arrives (the connection closes):
    MLflow's client retries the POST, which creates a second version of the same training run.
    Registration must end with one version for the run key, the one it returns."""
    import mlflow

    dataset = _dataset(db, store, tmp_path, "ds")
    upstream = settings.mlflow_tracking_uri.removeprefix("http://").rstrip("/")
    create = b"POST /api/2.0/mlflow/model-versions/create "
    with reply_dropping_proxy(upstream, create) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        mlflow.set_tracking_uri(proxy.uri)
        try:
            version = _register(db, model_name, dataset, "run-lost-reply")
        finally:
            mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        assert proxy.dropped == 1  # the fault happened: one create answered to nobody

    versions = MlflowClient(settings.mlflow_tracking_uri).search_model_versions(
        f"name='{model_name}'"
    )
    assert [(v.version, v.tags["run_key"]) for v in versions] == [(version, "run-lost-reply")]
    assert registry.find_version_by_run_key(model_name, "run-lost-reply") == version


# ----------------------------------------------------------------------------- 6


def test_promote_sigkilled_between_alias_move_and_history_row_is_repaired_by_the_next_gate(
    settings, db, store, model_name, tmp_path
):
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2, v3 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2, 3))
    assert _gate(db, store, model_name, v1, tmp_path / "cache")["decision"] == "promoted"

    env = {
        **os.environ,
        "MYSQL_DATABASE": db.name,
        "S3_BUCKET": store.bucket,
        registry.PAUSE_AFTER_ALIAS_MOVE_ENV: "120",
    }
    argv = [sys.executable, "-m", "pipeline", "--model-name", model_name, "promote"]
    proc = subprocess.Popen(
        [*argv, "--model-version", v2, "--rollback"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while registry.alias_version(model_name, "champion") != v2:
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the rollback never moved the MLflow alias"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # after the MLflow move, before the history row
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _mlflow_aliases(model_name) == {"champion": v2}
    assert _sql_aliases(db, model_name) == {"champion": v1}  # the lost row: SQL disagrees

    decision = _gate(db, store, model_name, v3, tmp_path / "cache")
    assert decision["decision"] == "promoted" and decision["champion_version"] == v2
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name) == {"champion": v3}
    # The lost row is recorded as the move it was (its intent was written before MLflow's move):
    # the rollback's own actor and reason, not an anonymous reconciliation.
    rollback_actor = f"cli:{os.environ.get('USER', 'unknown')}"
    assert _history(db, model_name) == [
        ("champion", None, int(v1), "pytest"),
        ("champion", int(v1), int(v2), rollback_actor),
        ("champion", int(v2), int(v3), "pytest"),
    ]
    assert db.query("SELECT reason FROM alias_history WHERE to_version = %s", (int(v2),))[0][
        "reason"
    ].startswith(registry.ROLLBACK_REASON)
    assert db.query("SELECT * FROM alias_intents WHERE model_name = %s", (model_name,)) == []
    # ... so v1 stays rolled back: its gate run again (a cleared run) keeps it out.
    again = _gate(db, store, model_name, v1, tmp_path / "cache")
    assert again["decision"] == "challenger" and "rolled back" in again["reason"]
    assert _mlflow_aliases(model_name) == {"champion": v3}

    # A CLI rollback after it takes the model's lock at once: the killed holder left none.
    done = subprocess.run(
        [*argv, "--model-version", v1, "--rollback"],
        env={**env, registry.PAUSE_AFTER_ALIAS_MOVE_ENV: ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name) == {"champion": v1}


def test_a_move_whose_alias_lock_connection_ended_moves_nothing(db, store, model_name, tmp_path):
    """A rollback holds the model's alias lock; MySQL ends that connection (as a restart or a
    failover does) and another process takes the lock and moves the champion. The first must
    fail before it moves anything, not move the alias over the other's move."""
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2, v3 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2, 3))
    assert _gate(db, store, model_name, v1, tmp_path / "cache")["decision"] == "promoted"
    lock = mysql_lock_name(db, registry.alias_lock_name(model_name))

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--model-name", model_name, "promote"]
        + ["--model-version", v2, "--rollback"],
        env={
            **os.environ,
            "MYSQL_DATABASE": db.name,
            "S3_BUCKET": store.bucket,
            registry.PAUSE_BEFORE_ALIAS_MOVE_ENV: "15",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while (holder := db.query("SELECT IS_USED_LOCK(%s) AS id", (lock,))[0]["id"]) is None:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the rollback never took the alias lock"
        time.sleep(0.05)
    db.execute(f"KILL CONNECTION {int(holder)}")
    moved = registry.rollback(db, model_name, v3, actor="pytest", reason="meanwhile")
    assert moved["moved"]

    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output[-3000:]
    assert "error: the MySQL connection holding the lock" in output, output[-3000:]
    assert _mlflow_aliases(model_name) == _sql_aliases(db, model_name) == {"champion": v3}
    assert [h[2] for h in _history(db, model_name)] == [int(v1), int(v3)]


def test_a_move_killed_before_mlflow_moved_leaves_no_history_row(db, store, model_name, tmp_path):
    """SIGKILL after the move's intent is written, before MLflow's alias moves: the next gate
    records no move that never happened and drops the intent."""
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2, v3 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2, 3))
    assert _gate(db, store, model_name, v1, tmp_path / "cache")["decision"] == "promoted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--model-name", model_name, "promote"]
        + ["--model-version", v2, "--rollback"],
        env={
            **os.environ,
            "MYSQL_DATABASE": db.name,
            "S3_BUCKET": store.bucket,
            registry.PAUSE_BEFORE_ALIAS_MOVE_ENV: "120",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    intents = "SELECT to_version FROM alias_intents WHERE model_name = %s"
    while not db.query(intents, (model_name,)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the rollback never wrote its intent"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _mlflow_aliases(model_name) == {"champion": v1}

    decision = _gate(db, store, model_name, v3, tmp_path / "cache")
    assert decision["decision"] == "promoted" and decision["champion_version"] == v1
    assert _history(db, model_name) == [
        ("champion", None, int(v1), "pytest"),
        ("champion", int(v1), int(v3), "pytest"),
    ]
    assert db.query(intents, (model_name,)) == []


def test_ten_concurrent_promote_and_rollback_pairs_leave_sql_aliases_equal_to_mlflow(
    db, store, model_name, tmp_path
):
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2))
    cache = tmp_path / "cache"
    assert _gate(db, store, model_name, v1, cache)["decision"] == "promoted"
    assert _gate(db, store, model_name, v2, cache)["decision"] == "promoted"

    def promote_v2(_: int) -> str:
        # A person promoting v2 by name (a gate's replay would keep a rolled-back v2 out).
        return _gate(db, store, model_name, v2, cache, explicit=True)["decision"]

    def rollback_v1(_: int) -> str:
        return registry.rollback(db, model_name, v1, actor="pytest", reason="race")["decision"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(f, i) for i in range(10) for f in (promote_v2, rollback_v1)]
        results = [f.result(timeout=300) for f in futures]
    assert sorted(set(results)) == ["promoted", "rolled_back"]

    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)
    # Serialised moves form one chain: each starts where the one before it ended.
    history = [h for h in _history(db, model_name) if h[0] == "champion"]
    assert all(a[2] == b[1] for a, b in zip(history, history[1:], strict=False)), history
    assert not any(h[3].startswith("reconcile:") for h in history), history


def test_a_rolled_back_version_is_not_promoted_again_by_a_replayed_gate_or_approval(
    db, store, model_name, tmp_path
):
    """A person rolls the champion back from v2 to v1. The run that promoted v2 is cleared and
    its gate runs again (or an approval of v3 is replayed after v3 was rolled back): the
    rollback stands. A person naming v2 (`promote --model-version 2`) still promotes it."""
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2, v3 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2, 3))
    cache = tmp_path / "cache"
    assert _gate(db, store, model_name, v1, cache)["decision"] == "promoted"
    assert _gate(db, store, model_name, v2, cache)["decision"] == "promoted"
    registry.rollback(db, model_name, v1, actor="cli:alice", reason="v2 mislabels cats")

    again = _gate(db, store, model_name, v2, cache)
    assert again["decision"] == "challenger"
    assert "rolled back from champion by cli:alice" in again["reason"]
    assert "v2 mislabels cats" in again["reason"]
    assert _mlflow_aliases(model_name) == {"champion": v1}  # kept out: takes no alias either
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)

    named = _gate(db, store, model_name, v2, cache, explicit=True)
    assert named["decision"] == "promoted" and registry.alias_version(model_name, "champion") == v2

    # An approved v3, rolled back, then its approval replayed (a cleared approve task).
    held = _gate(db, store, model_name, v3, cache, require_approval=True)
    assert held["decision"] == registry.AWAITING_APPROVAL
    registry.review(db, model_name, v3, registry.APPROVED, reviewer="bob", actor="pytest")
    assert registry.alias_version(model_name, "champion") == v3
    registry.rollback(db, model_name, v2, actor="cli:alice", reason="v3 too slow")
    replayed = registry.review(db, model_name, v3, registry.APPROVED, reviewer="bob", actor="t")
    assert replayed["decision"] == "challenger" and "rolled back by cli:alice" in replayed["reason"]
    assert registry.alias_version(model_name, "champion") == v2
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)
    # Gated again by name, v3 is asked again, and a new approval moves the champion.
    asked = _gate(db, store, model_name, v3, cache, require_approval=True, explicit=True)
    assert asked["decision"] == registry.AWAITING_APPROVAL
    registry.review(db, model_name, v3, registry.APPROVED, reviewer="carol", actor="pytest")
    assert registry.alias_version(model_name, "champion") == v3
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)


# ----------------------------------------------------------------------------- 11


def _v2_awaiting_approval_over_v1(db, store, model_name, tmp_path):
    """Three registered versions: v1 champion, v2 awaiting approval over it; (v1, v2, v3, cache)."""
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2, v3 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2, 3))
    cache = tmp_path / "cache"
    assert _gate(db, store, model_name, v1, cache)["decision"] == "promoted"
    held = _gate(db, store, model_name, v2, cache, require_approval=True)
    assert held["decision"] == registry.AWAITING_APPROVAL
    return v1, v2, v3, cache


def test_a_replayed_approval_does_not_take_the_champion_back_from_a_newer_version(
    db, store, model_name, tmp_path
):
    """v2 is approved over v1 and becomes champion; later v3 is promoted (another run's gate,
    or a person). v2's run is cleared: its gate and its approval run again. The approval was
    of v2 over v1, not over v3: neither replay moves the champion (before: both took it back
    to v2, over a version it was never compared with)."""
    v1, v2, v3, cache = _v2_awaiting_approval_over_v1(db, store, model_name, tmp_path)
    registry.review(db, model_name, v2, registry.APPROVED, reviewer="bob", actor="pytest")
    assert registry.alias_version(model_name, "champion") == v2
    assert _gate(db, store, model_name, v3, cache)["decision"] == "promoted"
    moves = len(_history(db, model_name))

    gate_again = _gate(db, store, model_name, v2, cache)
    assert gate_again["decision"] == "challenger"
    assert f"made v{v3} champion" in gate_again["reason"]
    approval_again = registry.review(
        db, model_name, v2, registry.APPROVED, reviewer="bob", actor="pytest"
    )
    assert approval_again["decision"] == "challenger"
    assert registry.alias_version(model_name, "champion") == v3
    assert len(_history(db, model_name)) == moves  # nothing moved
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)


def test_an_approval_given_after_the_champion_moved_during_the_wait_moves_nothing(
    db, store, model_name, tmp_path
):
    """v2 awaits approval, compared with v1; while the question waits a person promotes v3.
    The reviewer approved v2 over v1: the answer is kept and v2 stays challenger (before: v2
    became champion over v3, which it was never compared with); a retry replays that."""
    v1, v2, v3, cache = _v2_awaiting_approval_over_v1(db, store, model_name, tmp_path)
    assert _gate(db, store, model_name, v3, cache, explicit=True)["decision"] == "promoted"
    moves = len(_history(db, model_name))

    for _ in range(2):  # the answer, then a retry of the approval task
        answered = registry.review(
            db, model_name, v2, registry.APPROVED, reviewer="bob", actor="pytest"
        )
        assert answered["decision"] == "challenger"
        assert f"champion was v{v1} at the gate, v{v3} at approval" in answered["reason"]
        assert registry.alias_version(model_name, "champion") == v3
        assert len(_history(db, model_name)) == moves
    row = db.query(
        "SELECT decision, review, reviewer FROM model_versions WHERE model_name = %s"
        " AND model_version = %s",
        (model_name, int(v2)),
    )
    assert row == [{"decision": "challenger", "review": "approved", "reviewer": "bob"}]
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)


def test_a_person_naming_a_version_has_it_decided_now_with_the_thresholds_given(
    db, store, model_name, tmp_path
):
    """v2 was kept out by its gate (min_accuracy too high for it); a person runs `promote
    --model-version 2 --min-accuracy 0`: decided again with those thresholds, not the old
    decision replayed (before: `challenger` again, the flags ignored)."""
    dataset = _dataset(db, store, tmp_path, "ds")
    v1, v2 = (_register(db, model_name, dataset, f"run-{i}") for i in (1, 2))
    cache = tmp_path / "cache"
    assert _gate(db, store, model_name, v1, cache)["decision"] == "promoted"
    kept = _gate(db, store, model_name, v2, cache, min_accuracy=1.01)
    assert kept["decision"] == "challenger"
    named = _gate(db, store, model_name, v2, cache, min_accuracy=0.0, explicit=True)
    assert named["decision"] == "promoted" and registry.alias_version(model_name, "champion") == v2
    assert _sql_aliases(db, model_name) == _mlflow_aliases(model_name)


def test_two_datasets_keep_their_own_champions_and_a_label_change_is_refused(
    settings, db, store, tmp_path, monkeypatch, capsys
):
    digits = _dataset(db, store, tmp_path, "digits")
    photos = _dataset(db, store, tmp_path, "photos", rename={"zero": "cat", "one": "dog"})
    suffix = uuid.uuid4().hex[:8]
    names = {"digits": f"faults-digits-{suffix}", "photos": f"faults-photos-{suffix}"}
    cache = tmp_path / "cache"

    def trained(dataset: str, model_name: str, run_key: str) -> str:
        return train.train_model(
            db,
            store,
            dataset,
            TINY,
            model_name=model_name,
            run_key=run_key,
            cache_dir=cache,
            checkpoint_store=train.LocalCheckpointStore(tmp_path / "checkpoints"),
            experiment=model_name,
        )["model_version"]

    try:
        digits_v1 = trained(digits, names["digits"], "run-digits")
        assert _gate(db, store, names["digits"], digits_v1, cache)["decision"] == "promoted"
        photos_v1 = trained(photos, names["photos"], "run-photos")
        assert _gate(db, store, names["photos"], photos_v1, cache)["decision"] == "promoted"
        # Each dataset scope has its own champion; neither run touched the other's.
        assert registry.alias_version(names["digits"], "champion") == digits_v1
        assert registry.alias_version(names["photos"], "champion") == photos_v1
        assert registry.champion_dataset_version(names["digits"]) == digits
        assert registry.champion_dataset_version(names["photos"]) == photos

        # The photo bucket pointed at the digits' model: refused before any training ...
        photo_labels = catalog.get_dataset(db, photos)["label_map"]
        with pytest.raises(registry.LabelSetMismatch) as before:
            registry.check_label_scope(names["digits"], photo_labels, allow_label_change=False)
        assert "[cat, dog] (2 labels)" in str(before.value)
        assert "[eight, five, four, nine, one, seven, six, three, two, zero] (10 labels)" in str(
            before.value
        )
        assert "model_name" in str(before.value) and "allow_label_change" in str(before.value)
        # `python -m pipeline train` refuses it the same way, before training.
        from pipeline.__main__ import main

        monkeypatch.setenv("MYSQL_DATABASE", db.name)
        monkeypatch.setenv("S3_BUCKET", store.bucket)
        monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
        argv = ["--model-name", names["digits"], "train", "--prefix", "photos", "--epochs", "1"]
        assert main([*argv, "--num-workers", "0", "--min-images-per-label", "1"]) == 1
        assert "[cat, dog] (2 labels)" in capsys.readouterr().err
        assert registry.newest_ungated_version(db, names["digits"], retry_refused=True) is None

        # ... and by the gate, when a version on photos exists under that name anyway.
        stray = trained(photos, names["digits"], "run-stray")
        with pytest.raises(registry.LabelSetMismatch) as gate:
            _gate(db, store, names["digits"], stray, cache)
        assert "[cat, dog]" in str(gate.value) and "(10 labels)" in str(gate.value)
        assert registry.alias_version(names["digits"], "champion") == digits_v1
        assert registry.alias_version(names["digits"], "challenger") is None
        row = db.query(
            "SELECT decision, decision_reason, champion_accuracy FROM model_versions"
            " WHERE model_name = %s AND model_version = %s",
            (names["digits"], int(stray)),
        )[0]
        assert row["decision"] == "refused" and row["champion_accuracy"] is None  # not compared
        assert "[cat, dog]" in row["decision_reason"]
        assert registry.version_tags(names["digits"], stray)["gate_decision"] == "refused"
        assert len(_history(db, names["digits"])) == 1
        # A later run that trains nothing does not gate (and refuse, and fail) it again...
        assert registry.newest_ungated_version(db, names["digits"]) is None
        # ... unless it allows the label change.
        assert registry.newest_ungated_version(db, names["digits"], retry_refused=True) == stray

        # Asked for explicitly, the label change replaces the champion without comparing.
        allowed = _gate(db, store, names["digits"], stray, cache, allow_label_change=True)
        assert allowed["decision"] == "promoted" and allowed["champion_accuracy"] is None
        assert "allow_label_change" in allowed["reason"]
        assert registry.alias_version(names["digits"], "champion") == stray
        assert registry.alias_version(names["photos"], "champion") == photos_v1
    finally:
        client = MlflowClient(settings.mlflow_tracking_uri)
        for name in names.values():
            try:
                client.delete_registered_model(name)
                client.delete_experiment(client.get_experiment_by_name(name).experiment_id)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
