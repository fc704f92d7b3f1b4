"""Faults classified once: permanent errors change data (a rejection, a refusal), transient ones never.

- Permanent: the bytes were read and are not a decodable image; the object is gone or its ETag
  changed since the scan (`data.MissingObjectError`); the input is invalid (`Refusal`).
- Access: S3 refused to let these credentials read an object (`S3_UNREADABLE_CODES`): the scan
  quarantines it as `unreadable` (tried again by every scan) unless it refused most of them.
- Transient: connection refused/reset, timeouts, 5xx and throttling, a killed database
  connection, a full local disk. Clients retry them with their own settings (botocore's
  `standard` retry mode and urllib3's `Retry` under the MinIO SDK, both bounded); what is left
  is raised as `ServiceUnavailable`, naming the service and its endpoint, so the task fails and
  Airflow's retry takes over.

Both S3 clients are classified here: botocore's `ClientError` and the MinIO SDK's `S3Error`
carry the same S3 error codes; a MinIO `ServerError` (no body) carries its HTTP status. An answer
that is not S3's (the MinIO SDK's `InvalidResponseError`: a body that is no S3 error document,
such as an ingress's "404 page not found" while the server behind it restarts) carries no code
and is transient: it says nothing about the object, so it never rejects one.
"""

from __future__ import annotations

import errno


class Refusal(ValueError):
    """An input no retry can fix (a bad param, an untrainable dataset); the message says what
    to change. DAG adapters turn it into `AirflowFailException` (no retries)."""


class ServiceUnavailable(RuntimeError):
    """A service did not answer (after its client's own retries): fail now, retry the task later."""

    def __init__(self, service: str, endpoint: str, detail: str) -> None:
        super().__init__(f"{service} at {endpoint}: {detail}")
        self.service, self.endpoint, self.detail = service, endpoint, detail


# S3 error codes meaning "this object, as catalogued, is not there any more" (permanent).
S3_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
S3_CHANGED_CODES = frozenset({"PreconditionFailed", "412"})
# S3 error codes meaning "this object is there but these credentials may not read it" (an ACL or
# bucket policy on some keys, an archived storage class): about the object's access, not its bytes.
S3_ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403"})
S3_UNREADABLE_CODES = S3_ACCESS_DENIED_CODES | {"InvalidObjectState"}
# S3 error codes a later retry may cure.
S3_TRANSIENT_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
    }
)
# MySQL client/server error numbers for a lost or killed connection, lock waits and deadlocks;
# 4031: MySQL 8 names the idle timeout it closed the connection for (MariaDB just closes it: 2013).
MYSQL_TRANSIENT_ERRNOS = frozenset({1040, 1053, 1205, 1213, 1927, 2003, 2006, 2013, 2055, 4031})


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore `ClientError` or a MinIO SDK error (the HTTP status of an
    S3 answer without a body), or None for any other exception and for an answer that is not
    S3's (a body that is no S3 error document: whatever sent it, it is not about the object)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    try:
        from minio.error import S3Error, ServerError
    except ImportError:  # pragma: no cover - minio is a dependency
        return None
    if isinstance(exc, S3Error):
        return exc.code
    if isinstance(exc, ServerError):
        return str(exc.status_code)
    return None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call later may succeed (see the module docstring)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import (
            HTTPClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        streaming = (IncompleteReadError, ResponseStreamingError)
        if isinstance(exc, (BotoConnectionError, HTTPClientError, ReadTimeoutError, *streaming)):
            return True
    except ImportError:  # pragma: no cover - botocore is a dependency
        pass
    try:
        import urllib3.exceptions as http_errors

        # Under the MinIO SDK: refused/reset connections, timeouts, a body cut short and
        # 5xx answers left after urllib3's retries (MaxRetryError). A malformed URL is not.
        if isinstance(exc, http_errors.HTTPError) and not isinstance(
            exc, http_errors.LocationValueError
        ):
            return True
    except ImportError:  # pragma: no cover - urllib3 comes with both clients
        pass
    try:
        from minio.error import InvalidResponseError

        if isinstance(exc, InvalidResponseError):
            return True  # not S3's answer: a proxy or load balancer in front of it (see above)
    except ImportError:  # pragma: no cover - minio is a dependency
        pass
    code = s3_error_code(exc)
    if code is not None:
        return code in S3_TRANSIENT_CODES
    try:
        import pymysql

        if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InterfaceError):
            return not exc.args or exc.args[0] in MYSQL_TRANSIENT_ERRNOS or exc.args[0] == 0
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """The process ran out of memory (Python's `MemoryError`, PyTorch's CPU or CUDA allocator):
    a fault of the worker that a retry may not meet, never a verdict on the image at hand."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def s3_unavailable(exc: BaseException, endpoint: str | None) -> ServiceUnavailable:
    """`exc` (transient) as a `ServiceUnavailable` naming S3 and its endpoint."""
    code = s3_error_code(exc)
    detail = f"{code}: {exc}" if code else str(exc) or type(exc).__name__
    return ServiceUnavailable("S3", endpoint or "the default AWS endpoint", detail)
