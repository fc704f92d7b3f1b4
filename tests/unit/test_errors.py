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

from pipeline.errors import ServiceUnavailable, is_transient, s3_error_code, s3_unavailable


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")


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
        pytest.param(pymysql.err.OperationalError(2013, "Lost connection"), True, id="mysql-lost"),
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
