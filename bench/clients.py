"""The object store as it was before the MinIO SDK (GET/PUT/HEAD/LIST through boto3), so
benchmarks can compare the old and the new client side by side in one run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.errors import S3_MISSING_CODES, is_transient, s3_error_code, s3_unavailable
from pipeline.store import ObjectInfo, ObjectStore


class Boto3Store(ObjectStore):
    """`ObjectStore` with its hot paths on boto3, the same errors raised (for comparison)."""

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], int(item["Size"]), item["ETag"].strip('"'))

    def get_bytes(
        self,
        key: str,
        *,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
    ) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if byte_range is not None:
            kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        if if_match:
            kwargs["IfMatch"] = if_match
        try:
            return self.client.get_object(**kwargs)["Body"].read()
        except Exception as exc:
            if is_transient(exc):
                raise s3_unavailable(exc, self.endpoint) from exc
            raise

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        return self.client.put_object(**kwargs)["ETag"].strip('"')

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if s3_error_code(exc) in S3_MISSING_CODES:
                return None
            raise
        return ObjectInfo(key, int(resp["ContentLength"]), resp["ETag"].strip('"'))


CLIENTS = {"boto3": Boto3Store, "minio": ObjectStore}
