"""Trust boundaries against real S3: what training loads back from storage is data, never code."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline import catalog, train
from pipeline.demo_data import render_digits
from pipeline.store import ObjectStore
from pipeline.upload import upload_tree


class _Plant:
    """Pickles as a call that writes `marker`: what unpickling it with weights_only=False runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def planted_checkpoint(marker: Path) -> bytes:
    """A torch.save file shaped like a checkpoint, with a code-running object inside."""
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "identity": {}, "payload": _Plant(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def work_store(settings) -> ObjectStore:
    """A fresh bucket standing in for PIPELINE_WORK_BUCKET, removed afterwards."""
    s = ObjectStore(settings.s3, f"test-work-{uuid.uuid4().hex[:10]}")
    s.ensure_bucket()
    try:
        yield s
    finally:
        s.delete_bucket()


def test_the_planted_pickle_runs_code_when_loaded_the_old_way(tmp_path):
    """The control: without weights_only the plant below would run (so its absence means something)."""
    marker = tmp_path / "control-marker"
    torch.load(io.BytesIO(planted_checkpoint(marker)), weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_planted_checkpoint_in_any_bucket_is_refused_and_never_runs(
    db, store, work_store, mlflow_names, tmp_path
):
    """`python -m pipeline train` with planted pickles under its checkpoint key in the image and
    work buckets: the one it reads (work bucket) is refused with a warning naming it, training
    starts over and registers a version, and the plant's code never runs."""
    render_digits(tmp_path / "digits", size=32, per_label=4, inbox=0)
    upload_tree(store, tmp_path / "digits", "ds")
    version = catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]

    run_key = "manual__planted"
    name = train.checkpoint_name(mlflow_names["model_name"], run_key)
    marker = tmp_path / "marker"
    plant = planted_checkpoint(marker)
    planted_keys = [f"{train.CHECKPOINT_PREFIX}/{name}", f"checkpoints/{name}"]
    for bucket in (store, work_store):
        for key in planted_keys:
            bucket.put_bytes(key, plant)

    env = {
        **os.environ,
        "MYSQL_DATABASE": db.name,
        "S3_BUCKET": store.bucket,
        "PIPELINE_WORK_BUCKET": work_store.bucket,
        "MODEL_NAME": mlflow_names["model_name"],
        "PIPELINE_CACHE_DIR": str(tmp_path / "cache"),
    }
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--prefix",
        "ds",
        "--dataset-version",
        version,
        "--run-key",
        run_key,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--num-workers",
        "0",
        "--min-images-per-label",
        "1",
    ]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    client = MlflowClient()
    try:
        assert result.returncode == 0, output[-3000:]
        assert not marker.exists(), "unpickling the planted checkpoint ran its code"
        read_key = f"s3://{work_store.bucket}/{train.CHECKPOINT_PREFIX}/{name}"
        assert f"checkpoint {read_key} refused" in output, output[-3000:]
        assert "resuming from" not in output
        versions = client.search_model_versions(f"name='{mlflow_names['model_name']}'")
        assert len(versions) == 1
        # The one it read was replaced by its own checkpoint, then removed after registration.
        assert work_store.head(f"{train.CHECKPOINT_PREFIX}/{name}") is None
        # Nothing was written next to the images.
        assert sorted(o.key for o in store.iter_objects("") if not o.key.startswith("ds/")) == (
            sorted(planted_keys)
        )
    finally:
        experiment = client.get_experiment_by_name(mlflow_names["model_name"])
        if experiment is not None:  # the CLI logs to an experiment named after the model
            client.delete_experiment(experiment.experiment_id)
    assert not marker.exists()


def test_checkpoints_are_refused_in_the_image_bucket(store):
    with pytest.raises(ValueError, match="PIPELINE_WORK_BUCKET"):
        train.S3CheckpointStore(store, image_bucket=store.bucket)


def test_a_real_checkpoint_still_round_trips_through_the_work_bucket(work_store, caplog):
    checkpoints = train.S3CheckpointStore(work_store, image_bucket="images")
    state = {
        "epoch": 2,
        "model": {"w": torch.ones(2)},
        "rng": torch.get_rng_state(),
        "history": [{"val_accuracy": 0.5}],
        "identity": {"dataset_version": "dv", "params": {"epochs": 3, "num_workers": None}},
    }
    train.save_checkpoint(checkpoints, "m/r/last.pt", state)
    loaded = train.load_checkpoint(checkpoints, "m/r/last.pt")
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert loaded["identity"] == state["identity"]
    assert "refused" not in caplog.text


def test_a_checkpoint_someone_else_saved_in_the_work_bucket_is_never_resumed(
    db, work_store, caplog
):
    """MLflow's users can write its artifact bucket (the default work bucket) through the
    artifact proxy. A valid checkpoint of their own at the training's key (their weights, the
    last epoch) was resumed, then registered as the pipeline's: only bytes whose digest the
    pipeline recorded in MySQL when it saved are resumed now."""
    s3 = train.S3CheckpointStore(work_store, image_bucket="images")
    checkpoints = train.RecordedCheckpoints(s3, db)
    name = "m/manual__run/last.pt"
    state = {"epoch": 1, "model": {"w": torch.ones(2)}, "identity": {"dataset_version": "dv"}}
    train.save_checkpoint(checkpoints, name, state)
    assert train.load_checkpoint(checkpoints, name)["epoch"] == 1

    planted = {**state, "epoch": 3, "model": {"w": torch.full((2,), 7.0)}}
    train.save_checkpoint(s3, name, planted)  # straight to the bucket, as another writer would
    assert train.load_checkpoint(s3, name)["epoch"] == 3  # a plain reader would take it
    assert train.load_checkpoint(checkpoints, name) is None
    assert f"checkpoint {s3.describe(name)} refused: not one this pipeline saved" in caplog.text

    # The pipeline's own saves resume; an older one of its own put back is refused too.
    train.save_checkpoint(checkpoints, name, {**state, "epoch": 2})
    assert train.load_checkpoint(checkpoints, name)["epoch"] == 2
    train.save_checkpoint(checkpoints, name, {**state, "epoch": 3})
    assert train.load_checkpoint(checkpoints, name)["epoch"] == 3
    train.save_checkpoint(s3, name, {**state, "epoch": 2})
    assert train.load_checkpoint(checkpoints, name) is None
    checkpoints.delete(name)
    assert db.query("SELECT COUNT(*) AS n FROM checkpoints")[0]["n"] == 0
    assert train.load_checkpoint(checkpoints, name) is None
