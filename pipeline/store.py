"""Object store access (S3 API: MinIO, SeaweedFS, AWS) through one configured boto3 client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import S3Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: what LIST tells us without a GET."""

    key: str
    size: int
    etag: str


class ObjectStore:
    """A bucket on an S3-compatible endpoint. Clients are created lazily, never at import."""

    def __init__(
        self,
        settings: S3Settings,
        bucket: str | None = None,
        *,
        max_pool_connections: int = 32,
        client: Any | None = None,
    ) -> None:
        self.settings = settings
        self.bucket = bucket or settings.bucket
        self._max_pool = max_pool_connections
        self._client = client

    @classmethod
    def from_client(cls, client: Any, bucket: str) -> ObjectStore:
        """Wrap an already-configured boto3 client (e.g. from Airflow's S3Hook)."""
        return cls(S3Settings("", "", "", "", bucket, ""), bucket, client=client)

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self.settings
            self._client = boto3.client(
                "s3",
                endpoint_url=s.endpoint_url,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                region_name=s.region,
                config=Config(
                    s3={"addressing_style": "path"},
                    signature_version="s3v4",
                    max_pool_connections=self._max_pool,
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )
        return self._client

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint URL the client talks to (for messages)."""
        return self.client.meta.endpoint_url

    def with_bucket(self, bucket: str) -> ObjectStore:
        """The same endpoint and client, another bucket."""
        return ObjectStore(self.settings, bucket, client=self.client)

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
        """Every object under `prefix`, paginated (LIST only, no GET)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], int(item["Size"]), item["ETag"].strip('"'))

    def get_bytes(self, key: str, *, byte_range: tuple[int, int] | None = None) -> bytes:
        """The object's bytes, or only `byte_range` (inclusive start, inclusive end)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if byte_range is not None:
            kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        return self.client.get_object(**kwargs)["Body"].read()

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Write an object; returns its ETag."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        return self.client.put_object(**kwargs)["ETag"].strip('"')

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of one object, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(key, int(resp["ContentLength"]), resp["ETag"].strip('"'))

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
