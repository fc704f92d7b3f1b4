"""Preflight: prove MySQL, the object store and MLflow work before an hour of training starts."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.db import Database, migrate
from pipeline.store import ObjectStore, add_location_arguments, location_from_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """The outcome of one service check."""

    service: str
    ok: bool
    detail: str


def check_mysql(db: Database, where: str) -> Check:
    """Connect, apply pending migrations and read the schema version."""
    try:
        applied = migrate(db)
        version = db.query("SELECT MAX(version) AS v FROM schema_migrations")[0]["v"]
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return Check("mysql", False, f"{exc} (fix: {where})")
    extra = f", applied migrations {applied}" if applied else ""
    return Check("mysql", True, f"database {db.name} at schema version {version}{extra}")


def check_object_store(
    store: ObjectStore, prefix: str, where: str, *, work_store: ObjectStore | None = None
) -> Check:
    """List the images (read access is all the pipeline needs there), then write, read back
    and delete a probe object in the pipeline's own bucket (`work_store`: checkpoints)."""
    images = f"s3://{store.bucket}/{prefix.strip('/')}"
    try:
        next(iter(store.iter_objects(f"{prefix.strip('/')}/" if prefix.strip("/") else "")), None)
    except Exception as exc:  # noqa: BLE001
        return Check("s3", False, f"cannot list {images}: {exc} (fix: {where})")
    detail = f"list ok in {images}"
    if work_store is None:
        return Check("s3", True, detail)
    key = f"_preflight/{uuid.uuid4().hex}"
    try:
        work_store.put_bytes(key, b"preflight")
        if work_store.get_bytes(key) != b"preflight":
            return Check("s3", False, f"s3://{work_store.bucket}/{key} read back different bytes")
        work_store.delete(key)
    except Exception as exc:  # noqa: BLE001
        return Check(
            "s3",
            False,
            f"cannot write/read s3://{work_store.bucket} (the pipeline's bucket for checkpoints:"
            f" PIPELINE_WORK_BUCKET): {exc} (fix: {where})",
        )
    return Check("s3", True, f"{detail}; read/write ok in s3://{work_store.bucket}")


def without_credentials(uri: str) -> str:
    """`uri` with any `user:password@` removed: what messages, logs and XCom may carry."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def mlflow_auth_headers(uri: str) -> dict[str, str]:
    """Basic auth for a tracking server started with `--app-name basic-auth`.

    From MLFLOW_TRACKING_USERNAME/PASSWORD (what the MLflow client itself reads), else from
    credentials in the URI; no header when there are none.
    """
    parts = urllib.parse.urlsplit(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or urllib.parse.unquote(parts.username or "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or urllib.parse.unquote(
        parts.password or ""
    )
    if not user:
        return {}
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def check_mlflow(tracking_uri: str | None = None) -> Check:
    """Tracking server health, its database, and its artifact store (through the server).

    Messages name the server without credentials: the summary becomes the task's XCom.
    """
    raw = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")).rstrip("/")
    if not raw:
        return Check(
            "mlflow",
            False,
            "MLFLOW_TRACKING_URI is not set (fix: .env or the worker's environment)",
        )
    shown = without_credentials(raw)
    uri, headers = shown, mlflow_auth_headers(raw)
    fix = f"is the tracking server at {shown} running? (`make up`, or MLFLOW_TRACKING_URI)"
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as resp:
            resp.read()
        body = json.dumps({"max_results": 1}).encode()
        req = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/experiments/search",
            data=body,
            headers={"Content-Type": "application/json", **headers},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return Check(
                "mlflow",
                False,
                f"tracking server at {shown} refused the credentials ({exc.code}); "
                "fix: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
            )
        return Check("mlflow", False, f"tracking server: {exc}; {fix}")
    except (urllib.error.URLError, OSError) as exc:
        return Check("mlflow", False, f"tracking server: {exc}; {fix}")
    try:
        req = urllib.request.Request(
            f"{uri}/api/2.0/mlflow-artifacts/artifacts?path=", headers=headers
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        return Check(
            "mlflow",
            False,
            f"artifact store behind {shown} failed: {exc.code} {detail} "
            "(fix: the server's --artifacts-destination bucket and its S3 credentials)",
        )
    except (urllib.error.URLError, OSError) as exc:
        return Check("mlflow", False, f"artifact store: {exc}; {fix}")
    return Check("mlflow", True, f"tracking, registry and artifact store ok at {shown}")


def run_checks(
    db: Database,
    store: ObjectStore,
    prefix: str,
    *,
    work_store: ObjectStore | None = None,
    mysql_where: str = "MYSQL_* in .env",
    s3_where: str = "S3_* / AWS_* in .env",
) -> dict:
    """All checks; raises RuntimeError listing every failure, else returns a summary."""
    checks = [
        check_mysql(db, mysql_where),
        check_object_store(store, prefix, s3_where, work_store=work_store),
        check_mlflow(),
    ]
    for c in checks:
        log.info("preflight %s: %s - %s", c.service, "ok" if c.ok else "FAILED", c.detail)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise RuntimeError(
            "preflight failed: " + " | ".join(f"{c.service}: {c.detail}" for c in failed)
        )
    return {c.service: c.detail for c in checks}


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_arguments(parser)


def cli_check(args: argparse.Namespace, settings: Settings) -> int:
    db = Database(settings.mysql)
    store, prefix = location_from_args(settings, args)
    summary = run_checks(db, store, prefix, work_store=store.with_bucket(settings.work_bucket))
    for service, detail in summary.items():
        print(f"{service:7s} ok  {detail}")
    return 0
