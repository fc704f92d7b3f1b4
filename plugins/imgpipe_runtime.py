"""Glue between Airflow and `pipeline`: connections to handles, params, callbacks. Cheap to import."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from airflow.sdk import Asset

log = logging.getLogger("airflow.task")

S3_CONN_ID = os.environ.get("PIPELINE_S3_CONN_ID", "imgpipe_s3")
MYSQL_CONN_ID = os.environ.get("PIPELINE_MYSQL_CONN_ID", "imgpipe_mysql")
TASK_RETRIES = int(os.environ.get("PIPELINE_TASK_RETRIES", "2"))
# First retry delay (doubling up to 10 minutes): long enough for a restarted service.
TASK_RETRY_DELAY_S = float(os.environ.get("PIPELINE_TASK_RETRY_DELAY_S", "30"))

T = TypeVar("T")

CATALOG_ASSET = Asset(name="imgpipe_catalog", uri="imgpipe://catalog/images")
CHAMPION_ASSET = Asset(name="imgpipe_champion", uri="imgpipe://registry/champion")
# Emitted by `publish_drift` when a scoring run's images no longer look like the champion's
# val images; `PIPELINE_SCHEDULE_ON=drift|both` schedules image_classification on it.
DRIFT_ASSET = Asset(name="imgpipe_drift", uri="imgpipe://monitoring/drift")


def run_params(context: dict[str, Any], own: Iterable[str] = ()) -> dict[str, Any]:
    """The run's params with defaults filled and checked (dags test / REST pass conf unvalidated).

    `own`: names of the task's own params (an approval's comment field), left out.
    """
    from pipeline.params import validate_params

    mine = set(own)
    return validate_params({k: v for k, v in dict(context["params"]).items() if k not in mine})


MAIN_DAG_ID = "image_classification"


def run_key(context: dict[str, Any]) -> str:
    """The run's `run_key` (SQL rows, MLflow tags, checkpoint names): the Airflow run id, led by
    the DAG id for every DAG but `image_classification`. Scheduled run ids are their logical
    dates, which the inbox DAG's hourly cron and the main DAG's can share: one key would make
    one run's drift verdicts and scored-image lists the other's."""
    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    return run_id if dag_id == MAIN_DAG_ID else f"{dag_id}/{run_id}"[:255]


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


def publish_drift(context: dict[str, Any], report: dict[str, Any] | None) -> dict[str, Any]:
    """The `imgpipe_drift` asset event of a `check_drift` report: its extra names the model
    version, the run and the drifted subsets with their reasons. Skips the task (no event)
    when nothing drifted."""
    from airflow.sdk.exceptions import AirflowSkipException

    report = report or {}
    if not report.get("drifted"):
        raise AirflowSkipException("no drift found: no asset event")
    found = {s: v["reasons"] for s, v in report["subsets"].items() if v["drifted"]}
    context["outlet_events"][DRIFT_ASSET].extra = {
        k: report[k] for k in ("model_name", "model_version", "run_key")
    } | {"subsets": found}
    return found


def cache_dir():
    from pathlib import Path

    from pipeline.config import REPO_ROOT

    return Path(os.environ.get("PIPELINE_CACHE_DIR", str(REPO_ROOT / ".local" / "cache")))


def database(mysql_conn_id: str = MYSQL_CONN_ID):
    """The project's MySQL database, from the Airflow `mysql` connection `mysql_conn_id`.

    Read through the provider's `MySqlHook`, as its own connections are: extras `ssl` (a dict of
    ca/cert/key, e.g. a managed MySQL's CA bundle), `ssl_mode`, `unix_socket`, `charset`, and
    `iam` (an RDS IAM token instead of the password); see docs/connections.md.
    """
    from airflow.providers.mysql.hooks.mysql import MySqlHook

    from pipeline.db import Database

    hook = MySqlHook(mysql_conn_id=mysql_conn_id)
    conn = hook.get_connection(mysql_conn_id)
    if not conn.schema:
        raise ValueError(f"Airflow connection {mysql_conn_id!r} has no schema (database name)")
    # The provider's own reading of the connection (IAM token, ssl, socket), as MySqlHook
    # builds its clients: the pipeline connects with PyMySQL, which takes the same ssl dict.
    config = hook._get_conn_config_mysql_client(conn)  # noqa: SLF001
    return Database(mysql_settings(config))


def mysql_settings(config: dict[str, Any]):
    """`MySQLSettings` from MySqlHook's client config (`ssl_mode` as PyMySQL's ssl options)."""
    from pipeline.config import MySQLSettings

    ssl = dict(config.get("ssl") or {})
    mode = str(config.get("ssl_mode") or "").upper()
    if mode not in _SSL_MODES:
        raise ValueError(
            f"unknown ssl_mode {config['ssl_mode']!r}; expected one of: {', '.join(m for m in _SSL_MODES if m)}"
        )
    verify = _SSL_MODES[mode]
    if verify is not None:
        ssl.update(check_hostname=verify[1], verify_mode=verify[0])
    return MySQLSettings(
        host=config.get("host") or "127.0.0.1",
        port=int(config.get("port") or 3306),
        user=config.get("user") or "",
        password=config.get("passwd") or "",
        database=config["db"],
        ssl=None if mode == "DISABLED" or not ssl else ssl,
        unix_socket=config.get("unix_socket"),
    )


# MySQL's ssl-mode as PyMySQL's (verify certificate, check host name); None: as `ssl` says.
_SSL_MODES: dict[str, tuple[bool, bool] | None] = {
    "": None,
    "PREFERRED": None,
    "DISABLED": None,
    "REQUIRED": (False, False),
    "VERIFY_CA": (True, False),
    "VERIFY_IDENTITY": (True, True),
}


def object_store(bucket: str, s3_conn_id: str = S3_CONN_ID):
    """`bucket` on the endpoint of the Airflow `aws` connection `s3_conn_id`.

    Read through the provider's `S3Hook`: extras `endpoint_url` (MinIO, SeaweedFS; none for AWS
    S3), `region_name`, `verify` (false, or a CA bundle path), `service_config.s3.endpoint_url`,
    and whatever credentials the provider resolves (login/password, `aws_session_token`,
    `role_arn`, a profile, the instance's role).
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from pipeline.store import ObjectStore

    return ObjectStore(s3_settings(S3Hook(aws_conn_id=s3_conn_id), bucket), bucket)


def s3_settings(hook, bucket: str):
    """`S3Settings` of an `S3Hook`'s connection, with the credentials the provider resolves:
    its botocore credentials object, which renews an assumed role's or an instance profile's
    keys before they expire (a training runs up to six hours, a role session often one)."""
    from airflow.sdk.log import mask_secret

    from pipeline.config import S3Settings

    config = hook.conn_config
    source = credentials_source(hook)
    credentials = source.get_frozen_credentials()  # the keys of now
    for secret in (credentials.secret_key, credentials.token):
        if secret:
            mask_secret(secret)  # never in task logs, as the provider's get_credentials does
    verify = config.verify
    return S3Settings(
        endpoint_url=(config.get_service_endpoint_url("s3") or "").rstrip("/"),
        access_key_id=credentials.access_key,
        secret_access_key=credentials.secret_key,
        region=config.region_name or "us-east-1",
        bucket=bucket,
        prefix="",
        session_token=credentials.token,
        verify=True if verify is None else verify,
        credentials=source,
    )


# The provider's credentials object of each connection (as it reads now), one per process: stores
# of one connection compare equal, so they share one set of S3 clients (`store.shared_clients`),
# and a role is assumed once, then renewed by botocore.
_CREDENTIALS: dict[tuple, Any] = {}


def credentials_source(hook) -> Any:
    """The botocore credentials object of the hook's connection (a session of the provider's,
    made once per process and connection as it is now: an edited connection gets a new one)."""
    config = hook.conn_config  # read once per hook, as the provider's session reads it
    extra = json.dumps(config.extra_config, sort_keys=True, default=str)
    key = (hook.aws_conn_id, config.login, config.password, extra)
    source = _CREDENTIALS.get(key)
    if source is None:
        source = _CREDENTIALS[key] = hook.get_session().get_credentials()
    return source


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
    "retry_delay": timedelta(seconds=TASK_RETRY_DELAY_S),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": log_failure,
}
