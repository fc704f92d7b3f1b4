"""The Airflow adapter reads connections through the providers' hooks (`S3Hook`, `MySqlHook`):
real Airflow connections from `AIRFLOW_CONN_*` variables, extras included, become the
pipeline's store and database settings, and those talk to the real local services."""

from __future__ import annotations

import json
import uuid

import pytest

from pipeline.store import minio_endpoint


@pytest.fixture
def rt():
    import airflow  # noqa: F401 - initialises settings, puts the plugins folder on sys.path
    import imgpipe_runtime

    return imgpipe_runtime


def connection(monkeypatch, conn: dict) -> str:
    """A connection id whose `AIRFLOW_CONN_*` variable holds `conn` (JSON) for this test."""
    conn_id = f"imgpipe_test_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def test_an_aws_connection_with_endpoint_url_is_the_stores_endpoint(rt, settings, monkeypatch):
    s = settings.s3
    conn_id = connection(
        monkeypatch,
        {
            "conn_type": "aws",
            "login": s.access_key_id,
            "password": s.secret_access_key,
            "extra": {"endpoint_url": s.endpoint_url + "/", "region_name": s.region},
        },
    )
    store = rt.object_store(f"test-{uuid.uuid4().hex[:10]}", s3_conn_id=conn_id)
    got = store.settings
    assert (got.endpoint_url, got.region, got.access_key_id) == (
        s.endpoint_url,
        s.region,
        s.access_key_id,
    )
    assert got.session_token is None and got.verify is True
    store.ensure_bucket()
    try:
        etag = store.put_bytes("k.png", b"through the hook")
        assert store.get_bytes("k.png", if_match=etag) == b"through the hook"
    finally:
        store.delete_bucket()


def test_stores_of_one_connection_share_their_clients_and_renewable_credentials(
    rt, settings, monkeypatch
):
    """Each `object_store` call reads the connection again: the stores still share one set of
    clients per process (the API server serves thumbnails for days; before: a new set per
    call, and a new provider session, one AssumeRole, each), signing with one provider
    credentials object of the connection."""
    conn_id = connection(
        monkeypatch,
        {
            "conn_type": "aws",
            "login": settings.s3.access_key_id,
            "password": settings.s3.secret_access_key,
            "extra": {"endpoint_url": settings.s3.endpoint_url},
        },
    )
    first, second = (
        rt.object_store("a", s3_conn_id=conn_id),
        rt.object_store("b", s3_conn_id=conn_id),
    )
    assert first.settings.credentials is second.settings.credentials
    assert first.minio is second.minio and first.client is second.client
    assert first.settings.credentials.get_frozen_credentials().access_key == (
        settings.s3.access_key_id
    )


def test_an_aws_s3_connection_has_no_endpoint_and_keeps_token_region_and_ca(rt, monkeypatch):
    conn_id = connection(
        monkeypatch,
        {
            "conn_type": "aws",
            "login": "AKIAEXAMPLE",
            "password": "secret",
            "extra": {
                "region_name": "eu-west-1",
                "aws_session_token": "token",
                "verify": "/etc/ssl/certs/ca-certificates.crt",
            },
        },
    )
    store = rt.object_store("images", s3_conn_id=conn_id)
    got = store.settings
    assert got.endpoint_url == "" and store.endpoint is None
    assert (got.region, got.session_token, got.verify) == (
        "eu-west-1",
        "token",
        "/etc/ssl/certs/ca-certificates.crt",
    )
    assert minio_endpoint(got.endpoint_url) == ("s3.amazonaws.com", True)
    assert store.minio._base_url.region == "eu-west-1"  # noqa: SLF001 - no bucket-location lookups


def test_the_s3_service_endpoint_and_verify_false_come_from_the_extras(rt, monkeypatch):
    conn_id = connection(
        monkeypatch,
        {
            "conn_type": "aws",
            "login": "a",
            "password": "b",
            "extra": {
                "service_config": {"s3": {"endpoint_url": "https://minio.internal:9000"}},
                "verify": False,
            },
        },
    )
    got = rt.object_store("images", s3_conn_id=conn_id).settings
    assert (got.endpoint_url, got.region, got.verify) == (
        "https://minio.internal:9000",
        "us-east-1",
        False,
    )


def test_a_mysql_connection_is_the_pipelines_database(rt, settings, monkeypatch):
    m = settings.mysql
    conn_id = connection(
        monkeypatch,
        {
            "conn_type": "mysql",
            "host": m.host,
            "port": m.port,
            "login": m.user,
            "password": m.password,
            "schema": m.database,
            "extra": {"charset": "utf8mb4"},
        },
    )
    db = rt.database(mysql_conn_id=conn_id)
    assert (db.settings.host, db.settings.port, db.settings.user) == (m.host, m.port, m.user)
    assert db.settings.ssl is None
    assert db.query("SELECT DATABASE() AS name")[0]["name"] == m.database


@pytest.mark.parametrize(
    ("extra", "ssl"),
    [
        pytest.param({}, None, id="plain"),
        pytest.param({"ssl": {"ca": "/ca.pem"}}, {"ca": "/ca.pem"}, id="managed-ca"),
        pytest.param(
            {"ssl": json.dumps({"ca": "/ca.pem"}), "ssl_mode": "VERIFY_IDENTITY"},
            {"ca": "/ca.pem", "check_hostname": True, "verify_mode": True},
            id="verify-identity",
        ),
        pytest.param(
            {"ssl_mode": "REQUIRED"},
            {"check_hostname": False, "verify_mode": False},
            id="required",
        ),
        pytest.param({"ssl": {"ca": "/ca.pem"}, "ssl_mode": "DISABLED"}, None, id="disabled"),
    ],
)
def test_mysql_ssl_extras_become_pymysql_ssl_options(rt, monkeypatch, extra, ssl):
    conn_id = connection(
        monkeypatch,
        {"conn_type": "mysql", "host": "db.example", "login": "u", "schema": "imgpipe"}
        | {"extra": extra | {"unix_socket": "/run/mysqld.sock"}},
    )
    got = rt.database(mysql_conn_id=conn_id).settings
    assert (got.host, got.port, got.database, got.ssl) == ("db.example", 3306, "imgpipe", ssl)
    assert got.unix_socket == "/run/mysqld.sock"


def test_a_mysql_connection_without_schema_or_with_an_unknown_ssl_mode_is_refused(rt, monkeypatch):
    no_schema = connection(monkeypatch, {"conn_type": "mysql", "host": "h", "login": "u"})
    with pytest.raises(ValueError, match=f"{no_schema!r} has no schema"):
        rt.database(mysql_conn_id=no_schema)
    bad_mode = connection(
        monkeypatch,
        {"conn_type": "mysql", "host": "h", "schema": "s", "extra": {"ssl_mode": "ALWAYS"}},
    )
    with pytest.raises(ValueError, match="unknown ssl_mode 'ALWAYS'; expected one of: "):
        rt.database(mysql_conn_id=bad_mode)
