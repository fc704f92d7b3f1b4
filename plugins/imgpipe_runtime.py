"""Glue between Airflow and `pipeline`: connections to handles, params, callbacks. Cheap to import."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from airflow.sdk import Asset

log = logging.getLogger("airflow.task")

S3_CONN_ID = os.environ.get("PIPELINE_S3_CONN_ID", "imgpipe_s3")
MYSQL_CONN_ID = os.environ.get("PIPELINE_MYSQL_CONN_ID", "imgpipe_mysql")
TASK_RETRIES = int(os.environ.get("PIPELINE_TASK_RETRIES", "2"))

T = TypeVar("T")

CATALOG_ASSET = Asset(name="imgpipe_catalog", uri="imgpipe://catalog/images")
CHAMPION_ASSET = Asset(name="imgpipe_champion", uri="imgpipe://registry/champion")


def run_params(context: dict[str, Any]) -> dict[str, Any]:
    """The run's params with defaults filled and checked (dags test / REST pass conf unvalidated)."""
    from pipeline.params import validate_params

    return validate_params({k: v for k, v in dict(context["params"]).items()})


def model_name(params: dict[str, Any] | None = None) -> str:
    """The run's registered model (param `model_name`), else MODEL_NAME of the environment."""
    return (params or {}).get("model_name") or os.environ.get("MODEL_NAME", "image-classifier")


def fail_fast(task_callable: Callable[..., T]) -> Callable[..., T]:
    """Wrap a task callable: a refusal no retry can fix fails the task at once.

    `pipeline` signals those with `Refusal`, `ValueError` or `LookupError` (a bad param, an
    untrainable dataset, an unknown dataset version, a label-set mismatch, no champion yet);
    they become `AirflowFailException`, keeping the message that says what to change. Everything
    else (a service down, a killed connection) is raised as it is and retried by Airflow.
    """
    import functools

    @functools.wraps(task_callable)
    def run(*args: Any, **kwargs: Any) -> T:
        from pipeline.errors import is_transient

        try:
            return task_callable(*args, **kwargs)
        except (ValueError, LookupError) as exc:
            if is_transient(exc):
                raise
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"refused, not retried: {exc}") from exc

    return run


def cache_dir():
    from pathlib import Path

    from pipeline.config import REPO_ROOT

    return Path(os.environ.get("PIPELINE_CACHE_DIR", str(REPO_ROOT / ".local" / "cache")))


def database():
    """The project's MySQL database, from the Airflow connection `MYSQL_CONN_ID`."""
    from airflow.sdk import BaseHook

    from pipeline.config import MySQLSettings
    from pipeline.db import Database

    conn = BaseHook.get_connection(MYSQL_CONN_ID)
    if not conn.schema:
        raise ValueError(f"Airflow connection {MYSQL_CONN_ID!r} has no schema (database name)")
    return Database(
        MySQLSettings(
            host=conn.host or "127.0.0.1",
            port=int(conn.port or 3306),
            user=conn.login or "",
            password=conn.password or "",
            database=conn.schema,
        )
    )


def object_store(bucket: str):
    """`bucket` on the endpoint of the Airflow `aws` connection `S3_CONN_ID` (endpoint_url in extra)."""
    from airflow.sdk import BaseHook

    from pipeline.config import S3Settings
    from pipeline.store import ObjectStore

    conn = BaseHook.get_connection(S3_CONN_ID)
    extra = conn.extra_dejson
    endpoint = extra.get("endpoint_url") or os.environ.get("S3_ENDPOINT_URL")
    if not endpoint:
        raise ValueError(f"Airflow connection {S3_CONN_ID!r} has no extra.endpoint_url")
    settings = S3Settings(
        endpoint_url=endpoint,
        access_key_id=conn.login or "",
        secret_access_key=conn.password or "",
        region=extra.get("region_name", "us-east-1"),
        bucket=bucket,
        prefix="",
    )
    return ObjectStore(settings, bucket)


def work_store():
    """The pipeline's own bucket (PIPELINE_WORK_BUCKET, default MLFLOW_ARTIFACT_BUCKET) on the
    endpoint of `S3_CONN_ID`: checkpoints live there, never in a bucket images are uploaded to.
    """
    from pipeline.config import work_bucket

    return object_store(work_bucket())


def where_to_fix(kind: str) -> str:
    conn_id = {"mysql": MYSQL_CONN_ID, "s3": S3_CONN_ID}[kind]
    return f"Airflow connection {conn_id!r} (env AIRFLOW_CONN_{conn_id.upper()}, or Admin > Connections)"


def log_failure(context: dict[str, Any]) -> None:
    """on_failure_callback: one line naming the task and its cause."""
    ti = context.get("task_instance") or context.get("ti")
    exc = context.get("exception")
    cause = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown cause"
    first_line = cause.splitlines()[0] if cause else cause
    log.error(
        "imgpipe task failed: %s.%s run=%s try=%s cause=%s",
        getattr(ti, "dag_id", "?"),
        getattr(ti, "task_id", "?"),
        getattr(ti, "run_id", "?"),
        getattr(ti, "try_number", "?"),
        first_line[:500],
    )


DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": TASK_RETRIES,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": log_failure,
}
