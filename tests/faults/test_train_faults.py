"""Training faults with real processes: S3 down while training fetches its data. The task fails
naming S3 and its endpoint, nothing is rejected, and the retry trains and registers once."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from pipeline import catalog, train
from pipeline.demo_data import render_digits
from pipeline.errors import ServiceUnavailable
from pipeline.store import ObjectStore
from pipeline.train_plan import TrainParams
from pipeline.upload import upload_tree
from tests.faults.private_s3 import PrivateS3
from tests.faults.test_scan_faults import count

TINY = TrainParams(epochs=1, batch_size=16, image_size=32, num_workers=0, augment=False)


def test_s3_down_during_the_data_fetch_fails_naming_s3_and_the_retry_trains_once(
    settings, db, mlflow_names, tmp_path
):
    s3 = PrivateS3(tmp_path / "s3", settings.s3)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.start(bucket)
    try:
        store = ObjectStore(s3.settings, bucket)
        render_digits(tmp_path / "digits", size=32, per_label=5, inbox=0)
        upload_tree(store, tmp_path / "digits", "ds")
        dataset = catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]

        def attempt(store: ObjectStore) -> dict:
            return train.train_model(
                db,
                store,
                dataset,
                TINY,
                model_name=mlflow_names["model_name"],
                run_key="scheduled__faults",
                cache_dir=tmp_path / "cache",
                checkpoint_store=train.LocalCheckpointStore(tmp_path / "checkpoints"),
                experiment=mlflow_names["experiment"],
            )

        s3.kill()
        with pytest.raises(ServiceUnavailable, match=f"^S3 at {s3.endpoint}: "):
            attempt(store)
        assert count(db, "SELECT COUNT(*) FROM images WHERE status <> 'ok'") == 0
        assert catalog.get_dataset(db, dataset)["dataset_version"] == dataset

        s3.start(bucket)  # Airflow's retry, once S3 is back
        result = attempt(ObjectStore(s3.settings, bucket))
        assert result["dataset_version"] == dataset and result["model_version"]
        versions = MlflowClient().search_model_versions(f"name='{mlflow_names['model_name']}'")
        assert len(versions) == 1
        assert count(db, "SELECT COUNT(*) FROM images WHERE status <> 'ok'") == 0
    finally:
        s3.kill()
