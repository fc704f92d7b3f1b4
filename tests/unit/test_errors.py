"""The one fault taxonomy: which errors are transient (retried, never a rejection) and how an
outage is named."""

from __future__ import annotations

import errno

import pymysql
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
)
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import (
    LocationValueError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ResponseError,
)
from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout

from pipeline.errors import ServiceUnavailable, is_transient, s3_error_code, s3_unavailable


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")


def minio_error(code: str) -> S3Error:
    return S3Error(None, code, "m", "/bucket/key", "request", "host", "bucket", "key")


def retries_exhausted(reason: Exception) -> MaxRetryError:
    return MaxRetryError(None, "/bucket/key", reason)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        pytest.param(EndpointConnectionError(endpoint_url="http://s3"), True, id="refused"),
        pytest.param(ConnectTimeoutError(endpoint_url="http://s3"), True, id="connect-timeout"),
        pytest.param(ReadTimeoutError(endpoint_url="http://s3"), True, id="read-timeout"),
        pytest.param(IncompleteReadError(actual_bytes=1, expected_bytes=2), True, id="short-body"),
        pytest.param(client_error("503"), True, id="503"),
        pytest.param(client_error("SlowDown"), True, id="throttled"),
        pytest.param(client_error("InternalError"), True, id="500"),
        pytest.param(client_error("NoSuchKey"), False, id="missing"),
        pytest.param(client_error("PreconditionFailed"), False, id="changed"),
        pytest.param(client_error("AccessDenied"), False, id="denied"),
        pytest.param(
            retries_exhausted(NewConnectionError(None, "refused")), True, id="minio-refused"
        ),
        pytest.param(
            retries_exhausted(ResponseError("too many 503 error responses")), True, id="minio-5xx"
        ),
        pytest.param(ProtocolError("Connection broken: IncompleteRead"), True, id="minio-cut"),
        pytest.param(Urllib3ReadTimeout(None, "/k", "read timed out"), True, id="minio-timeout"),
        pytest.param(ServerError("server failed with 503", 503), True, id="minio-503"),
        pytest.param(InvalidResponseError(502, "text/html", "proxy"), True, id="minio-html-502"),
        pytest.param(
            InvalidResponseError(404, "text/plain", "404 page not found"), True, id="ingress-404"
        ),
        pytest.param(InvalidResponseError(403, "text/html", "<html>"), True, id="waf-403"),
        pytest.param(minio_error("SlowDown"), True, id="minio-throttled"),
        pytest.param(minio_error("NoSuchKey"), False, id="minio-missing"),
        pytest.param(minio_error("PreconditionFailed"), False, id="minio-changed"),
        pytest.param(ServerError("server failed with 412", 412), False, id="minio-412-no-body"),
        pytest.param(minio_error("AccessDenied"), False, id="minio-denied"),
        pytest.param(LocationValueError("bad url"), False, id="bad-url"),
        pytest.param(pymysql.err.OperationalError(2013, "Lost connection"), True, id="mysql-lost"),
        pytest.param(
            pymysql.err.OperationalError(4031, "The client was disconnected by the server"),
            True,
            id="mysql8-idle-disconnect",
        ),
        pytest.param(pymysql.err.OperationalError(1213, "Deadlock"), True, id="deadlock"),
        pytest.param(pymysql.err.OperationalError(1045, "Access denied"), False, id="mysql-auth"),
        pytest.param(pymysql.err.IntegrityError(1062, "Duplicate"), False, id="duplicate"),
        pytest.param(ConnectionRefusedError(), True, id="socket-refused"),
        pytest.param(OSError(errno.ENOSPC, "No space left"), True, id="disk-full"),
        pytest.param(OSError(errno.EACCES, "Permission denied"), False, id="permission"),
        pytest.param(ValueError("bad input"), False, id="bad-input"),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_an_outage_names_the_service_and_the_endpoint():
    error = s3_unavailable(client_error("503"), "http://127.0.0.1:9000")
    assert isinstance(error, ServiceUnavailable)
    assert str(error).startswith("S3 at http://127.0.0.1:9000: 503")
    assert (error.service, error.endpoint) == ("S3", "http://127.0.0.1:9000")
    assert s3_error_code(ValueError()) is None


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        pytest.param(client_error("NoSuchKey"), "NoSuchKey", id="boto3"),
        pytest.param(minio_error("NoSuchKey"), "NoSuchKey", id="minio"),
        pytest.param(minio_error("PreconditionFailed"), "PreconditionFailed", id="minio-412"),
        pytest.param(ServerError("server failed", 412), "412", id="minio-status"),
        pytest.param(InvalidResponseError(404, "text/plain", "no"), None, id="minio-non-xml"),
        pytest.param(ProtocolError("cut"), None, id="no-code"),
    ],
)
def test_both_clients_errors_carry_the_same_s3_codes(exc, code):
    assert s3_error_code(exc) == code


def test_a_minio_outage_names_s3_and_the_endpoint():
    error = s3_unavailable(
        retries_exhausted(NewConnectionError(None, "Connection refused")), "http://127.0.0.1:9000"
    )
    assert str(error).startswith("S3 at http://127.0.0.1:9000: ")
    assert "Connection refused" in str(error)
