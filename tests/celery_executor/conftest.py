"""A private dataset and a CeleryExecutor Airflow with two workers, shared by the package's tests
(the Celery runs, then the human approvals)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.airflow_env import mysql_connection_env
from tests.celery_executor.cluster import CeleryAirflow, Worker

TRAIN_QUEUE = "train"
SCORE_QUEUE = "score"


@pytest.fixture(scope="package")
def world(settings, tmp_path_factory) -> Iterator[dict]:
    """A private MySQL database, bucket (400 demo digits, 32 px) and registered model name."""
    from mlflow import MlflowClient

    from pipeline import demo_data, upload
    from pipeline.db import create_database, drop_database
    from pipeline.store import ObjectStore

    suffix = uuid.uuid4().hex[:8]
    db_name = f"{settings.mysql.database}_test_celery_{suffix}"
    db = create_database(settings.mysql, db_name)
    bucket = f"test-celery-{suffix}"
    store = ObjectStore(settings.s3, bucket)
    store.ensure_bucket()
    prefix = "datasets/digits"
    local = tmp_path_factory.mktemp("digits")
    demo_data.render_digits(local, size=32, fmt="png", inbox=12, per_label=40)
    upload.upload_tree(store, local, prefix)
    model_name = f"test-celery-model-{suffix}"
    try:
        yield {
            "suffix": suffix,
            "db": db,
            "model_name": model_name,
            "env": {
                **mysql_connection_env(settings, db_name),
                "MODEL_NAME": model_name,
                "PIPELINE_TASK_RETRIES": "2",
                "PIPELINE_TASK_RETRY_DELAY_S": "3",  # the killed shard's retry, without waiting
                "PIPELINE_TRAIN_QUEUE": TRAIN_QUEUE,
                "PIPELINE_SCORE_QUEUE": SCORE_QUEUE,
            },
            "conf": {
                "bucket": bucket,
                "prefix": prefix,
                "epochs": 1,
                "image_size": 32,
                "batch_size": 64,
                "learning_rate": 0.003,
                "min_accuracy": 0.0,  # one short epoch: any model becomes the champion
                "shards": 4,
                "num_workers": 2,
                "augment": False,
            },
            "run_ids": [],
        }
    finally:
        drop_database(settings.mysql, db_name)
        store.delete_bucket()
        try:
            MlflowClient(settings.mlflow_tracking_uri).delete_registered_model(model_name)
        except Exception:  # noqa: BLE001 - nothing registered when an early step failed
            pass


@pytest.fixture(scope="package")
def cluster(world, tmp_path_factory) -> Iterator[CeleryAirflow]:
    """Scheduler, DAG processor, API server and two workers: `worker-a` takes the default and
    training queues and scoring, `worker-b` scoring only. Everything is stopped afterwards."""
    root = tmp_path_factory.mktemp("celery")
    a, b = f"worker-a-{world['suffix']}", f"worker-b-{world['suffix']}"
    workers = [
        Worker(a, ["default", TRAIN_QUEUE, SCORE_QUEUE], root / "cache-a"),
        Worker(b, [SCORE_QUEUE], root / "cache-b"),
    ]
    airflow = CeleryAirflow(root, {**os.environ, **world["env"]}, workers)
    try:
        airflow.start()
        airflow.api.unpause()
        yield airflow
    finally:
        airflow.stop()
