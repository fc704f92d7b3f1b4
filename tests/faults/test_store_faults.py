"""The object store with its S3 server SIGKILLed: every call through the MinIO SDK and boto3
fails as `ServiceUnavailable` naming S3 and its endpoint (after the clients' bounded retries),
never as a missing or changed object; after a restart the same store works again."""

from __future__ import annotations

import uuid

import pytest

from pipeline.data import fetch_object
from pipeline.errors import ServiceUnavailable
from pipeline.records import ImageRecord
from pipeline.store import ObjectStore
from tests.faults.private_s3 import PrivateS3


def test_s3_killed_every_store_call_is_unavailable_naming_the_endpoint(settings, tmp_path):
    s3 = PrivateS3(tmp_path / "s3", settings.s3)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.start(bucket)
    try:
        store = ObjectStore(s3.settings, bucket)
        etag = store.put_bytes("k.png", b"bytes")
        record = ImageRecord(1, bucket, "k.png", etag, "inbox", None, 5)
        assert fetch_object(store, record) == b"bytes"  # the pooled connection is up

        s3.kill()
        calls = {
            "get": lambda: store.get_bytes("k.png"),
            "range get": lambda: store.get_bytes("k.png", byte_range=(0, 1)),
            "fetch": lambda: fetch_object(store, record),
            "put": lambda: store.put_bytes("new.png", b"x"),
            "head": lambda: store.head("k.png"),
            "list": lambda: list(store.iter_objects()),
        }
        for what, call in calls.items():
            with pytest.raises(ServiceUnavailable, match=f"^S3 at {s3.endpoint}: ") as info:
                call()
            assert info.value.service == "S3", what

        s3.start(bucket)
        assert fetch_object(store, record) == b"bytes"
        assert store.head("new.png") is None  # the failed PUT wrote nothing
    finally:
        s3.kill()
