"""Object store access (S3 API: MinIO, SeaweedFS, AWS): the MinIO SDK on the hot paths (GET, PUT,
HEAD, LIST), boto3 for deletes and bucket management.

Choices:

- The MinIO SDK costs less than half of boto3's client CPU per GET (0.52 vs 1.20 ms measured
  here, bench/results/scan.md and score.md): scan validation, the training cache fill and
  scoring fetches are CPU-bound on a small worker, so those calls go through it; so do LISTs,
  sent by the SDK and parsed here (key, size and ETag only: a sixth of the SDK's parsing CPU).
  DELETE and bucket calls are few and stay on boto3.
- One client of each kind per process and endpoint (with its credentials), shared by every
  store on it and by the threads of the process (both clients are thread-safe); a forked child
  builds its own, as neither client's connection pool may cross a fork.
- Both clients retry transient failures themselves, bounded (boto3's `standard` mode; urllib3's
  `Retry` with backoff for the MinIO SDK); what is left is raised as `ServiceUnavailable`
  naming S3 and its endpoint. A missing object (404) and a failed `If-Match` (412) are raised
  as they are, classified by `pipeline.errors.s3_error_code` whichever client raised them.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote_plus, urlparse
from xml.etree import ElementTree

from pipeline.config import S3Settings
from pipeline.errors import S3_MISSING_CODES, is_transient, s3_error_code, s3_unavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
# Attempts of one request before its error is raised (both clients).
MAX_ATTEMPTS = 5
_MIN_PART_SIZE = 5 * 1024 * 1024  # the MinIO SDK's smallest multipart part


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: what LIST tells us without a GET."""

    key: str
    size: int
    etag: str


def parse_list_page(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    """The objects of one ListObjectsV2 answer and the token of the next page (None: last).

    Reads what the MinIO SDK's `parse_list_objects` reads for key, size and ETag, and finds
    the next page's token as it does (NextContinuationToken, else NextMarker, else the last
    key of a truncated page).
    """
    root = ElementTree.fromstring(body.decode())
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    key_tag, size_tag, etag_tag = f"{ns}Key", f"{ns}Size", f"{ns}ETag"
    url_encoded = root.findtext(f"{ns}EncodingType") == "url"
    objects = []
    for item in root.iterfind(f"{ns}Contents"):
        key = item.findtext(key_tag)
        if key is None:
            raise ValueError("XML element <Key> not found")
        objects.append(
            ObjectInfo(
                unquote_plus(key) if url_encoded else key,
                int(item.findtext(size_tag)),
                (item.findtext(etag_tag) or "").replace('"', ""),
            )
        )
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    token = root.findtext(f"{ns}NextContinuationToken")
    if token is None:
        token = root.findtext(f"{ns}NextMarker")
        if token and url_encoded:
            token = unquote_plus(token)
    if token is None and truncated and objects:
        token = objects[-1].key
    return objects, token if truncated else None


class _Clients:
    """The boto3 and MinIO clients of one endpoint, built lazily, once per process."""

    def __init__(self, settings: S3Settings, max_pool_connections: int) -> None:
        self.settings = settings
        self.max_pool = max_pool_connections
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._boto3: Any | None = None
        self._minio: Any | None = None

    def _fresh(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's pools are not ours
            self._pid, self._boto3, self._minio = os.getpid(), None, None

    def boto3(self) -> Any:
        client = self._boto3
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            self._fresh()
            if self._boto3 is None:
                self._boto3 = boto3_client(self.settings, self.max_pool)
            return self._boto3

    def minio(self) -> Any:
        client = self._minio
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            self._fresh()
            if self._minio is None:
                self._minio = minio_client(self.settings, self.max_pool)
            return self._minio


_SHARED: dict[tuple[S3Settings, int], _Clients] = {}
_SHARED_LOCK = threading.Lock()


def shared_clients(settings: S3Settings, max_pool_connections: int) -> _Clients:
    """The clients of an endpoint and its credentials (whatever the bucket), one set per
    process and pool size: every store on that endpoint uses them."""
    key = (replace(settings, bucket="", prefix=""), max_pool_connections)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = _Clients(key[0], max_pool_connections)
        return _SHARED[key]


def boto3_client(settings: S3Settings, max_pool_connections: int = 32) -> Any:
    """A boto3 S3 client for `settings` (path-style addressing on a custom endpoint)."""
    import boto3
    from botocore.config import Config

    s = settings
    keys = {
        "aws_access_key_id": s.access_key_id or None,
        "aws_secret_access_key": s.secret_access_key or None,
        "aws_session_token": s.session_token,
    }
    session = boto3
    if s.credentials is not None:  # renewed by botocore before they expire
        import botocore.session

        core = botocore.session.Session()
        core._credentials = s.credentials  # noqa: SLF001 - botocore has no public setter
        session, keys = boto3.session.Session(botocore_session=core), {}
    return session.client(
        "s3",
        endpoint_url=s.endpoint_url or None,
        **keys,
        region_name=s.region,
        verify=s.verify,
        config=Config(
            s3={"addressing_style": "path" if s.endpoint_url else "auto"},
            signature_version="s3v4",
            max_pool_connections=max_pool_connections,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
        ),
    )


def minio_client(settings: S3Settings, max_pool_connections: int = 32) -> Any:
    """A MinIO SDK client for `settings`; no endpoint means AWS S3 in `settings.region`."""
    import certifi
    import urllib3
    from minio import Minio

    s = settings
    host, secure = minio_endpoint(s.endpoint_url)
    verify = s.verify
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        maxsize=max_pool_connections,
        cert_reqs="CERT_NONE" if verify is False else "CERT_REQUIRED",
        ca_certs=verify if isinstance(verify, str) else certifi.where(),
        # The SDK's own defaults, bounded: connection errors and 5xx answers are retried
        # with exponential backoff, then raised (MaxRetryError: transient).
        retries=urllib3.Retry(
            total=MAX_ATTEMPTS, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )
    keys: dict[str, Any] = {
        "access_key": s.access_key_id or None,
        "secret_key": s.secret_access_key or None,
        "session_token": s.session_token,
    }
    if s.credentials is not None:
        keys = {"credentials": botocore_provider(s.credentials)}
    return Minio(
        host,
        **keys,
        secure=secure,
        region=s.region or None,
        http_client=http,
    )


def botocore_provider(credentials: Any) -> Any:
    """A MinIO SDK credentials provider over a botocore credentials object: each request is
    signed with its current keys (`RefreshableCredentials` renews them before they expire)."""
    from minio.credentials import Credentials, Provider

    class BotocoreProvider(Provider):
        def retrieve(self) -> Credentials:
            frozen = credentials.get_frozen_credentials()
            return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    return BotocoreProvider()


def minio_endpoint(endpoint_url: str | None) -> tuple[str, bool]:
    """(host[:port], https?) of an endpoint URL, as the MinIO SDK takes it; AWS when empty."""
    if not endpoint_url:
        return "s3.amazonaws.com", True
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"S3 endpoint must be an http(s) URL like http://127.0.0.1:9000, got {endpoint_url!r}"
        )
    if parsed.path.strip("/"):
        raise ValueError(
            f"S3 endpoint {endpoint_url!r} has a path; the S3 API needs host[:port] only"
        )
    return parsed.netloc, parsed.scheme == "https"


class ObjectStore:
    """A bucket on an S3-compatible endpoint. Clients are created lazily, never at import."""

    def __init__(
        self,
        settings: S3Settings,
        bucket: str | None = None,
        *,
        max_pool_connections: int = 32,
        clients: _Clients | None = None,
    ) -> None:
        self.settings = settings
        self.bucket = bucket or settings.bucket
        self._clients = clients or shared_clients(settings, max_pool_connections)

    @property
    def client(self) -> Any:
        """The process's boto3 client: DELETE and bucket calls."""
        return self._clients.boto3()

    @property
    def minio(self) -> Any:
        """The process's MinIO SDK client: GET, PUT, HEAD and LIST of objects."""
        return self._clients.minio()

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint URL the clients talk to (for messages); None: AWS's default."""
        return self.settings.endpoint_url or None

    def with_bucket(self, bucket: str) -> ObjectStore:
        """The same endpoint and clients, another bucket."""
        return type(self)(self.settings, bucket, clients=self._clients)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
            log.info("creating bucket %s", self.bucket)
            self.client.create_bucket(Bucket=self.bucket)

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix`, paginated (LIST only, no GET).

        The requests are the SDK's `list_objects(recursive=True)` (ListObjectsV2, 1000 keys a
        page, URL-encoded keys); only the parsing is ours: the SDK builds each listed object
        from a dozen XML lookups and a date parse (35 us of CPU per object, measured here)
        where key, size and ETag take 6 (`parse_list_page`).
        """
        from minio.helpers import check_bucket_name

        try:
            client = self.minio
            check_bucket_name(self.bucket, s3_check=client._base_url.is_aws_host)
            token: str | None = None
            while True:
                query = {"list-type": "2"}
                if token:
                    query["continuation-token"] = token
                query.update({"delimiter": "", "encoding-type": "url", "max-keys": "1000"})
                query["prefix"] = prefix
                response = client._execute("GET", self.bucket, query_params=query)
                objects, token = parse_list_page(response.data)
                yield from objects
                if token is None:
                    return
        except Exception as exc:
            if is_transient(exc):
                raise s3_unavailable(exc, self.endpoint) from exc
            raise

    def get_bytes(
        self,
        key: str,
        *,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
    ) -> bytes:
        """The object's bytes, or only `byte_range` (inclusive start, inclusive end).

        With `if_match` (an ETag), an object whose ETag differs fails with code
        `PreconditionFailed` (412); a missing one with `NoSuchKey` (404). Transient failures,
        after the client's retries, raise `ServiceUnavailable`.
        """
        headers = {"If-Match": f'"{if_match}"'} if if_match else None
        offset, length = (0, 0)
        if byte_range is not None:
            offset, length = byte_range[0], byte_range[1] - byte_range[0] + 1
        try:
            response = self.minio.get_object(
                self.bucket, key, offset=offset, length=length, request_headers=headers
            )
            try:
                # Not decoded: the bytes as stored, even with a Content-Encoding.
                return response.read(decode_content=False)
            finally:
                response.close()
                response.release_conn()
        except Exception as exc:
            if is_transient(exc):
                raise s3_unavailable(exc, self.endpoint) from exc
            raise

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Write an object in one PUT (atomic replace); returns its ETag."""
        try:
            result = self.minio.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type or "application/octet-stream",
                # One part, whatever the size: a single PUT, as boto3's put_object.
                part_size=max(len(data), _MIN_PART_SIZE),
            )
        except Exception as exc:
            if is_transient(exc):
                raise s3_unavailable(exc, self.endpoint) from exc
            raise
        return result.etag.strip('"')

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of one object, or None when it does not exist."""
        try:
            stat = self.minio.stat_object(self.bucket, key)
        except Exception as exc:
            if s3_error_code(exc) in S3_MISSING_CODES:
                return None
            if is_transient(exc):
                raise s3_unavailable(exc, self.endpoint) from exc
            raise
        return ObjectInfo(key, int(stat.size), (stat.etag or "").strip('"'))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str = "") -> int:
        """Delete every object under `prefix` (batched); returns how many."""
        count = 0
        batch: list[dict[str, str]] = []
        for obj in self.iter_objects(prefix):
            batch.append({"Key": obj.key})
            if len(batch) == 1000:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
                count, batch = count + len(batch), []
        if batch:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            count += len(batch)
        return count

    def delete_bucket(self) -> None:
        """Empty and remove the bucket (tests use this to clean up)."""
        self.delete_prefix("")
        self.client.delete_bucket(Bucket=self.bucket)


def add_location_arguments(parser, *, prefix: bool = True) -> None:
    """The CLI's `--bucket` (and `--prefix`) options; `location_from_args` reads them."""
    parser.add_argument("--bucket", help="bucket (default: S3_BUCKET)")
    if prefix:
        parser.add_argument("--prefix", help="key prefix (default: S3_PREFIX)")


def location_from_args(settings, args, **store_options) -> tuple[ObjectStore, str]:
    """The store of `--bucket` and the `--prefix`, defaulting to S3_BUCKET and S3_PREFIX."""
    store = ObjectStore(settings.s3, getattr(args, "bucket", None), **store_options)
    prefix = getattr(args, "prefix", None)
    return store, settings.s3.prefix if prefix is None else prefix
