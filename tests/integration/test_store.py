"""The object store on the real local S3: the MinIO SDK's GET/PUT/HEAD answer 404 and 412 with
the S3 codes the pipeline classifies, and clients are made once per process."""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.data import MissingObjectError, fetch_object
from pipeline.errors import s3_error_code
from pipeline.records import ImageRecord
from pipeline.store import ObjectInfo, ObjectStore, minio_endpoint


def record(store: ObjectStore, key: str, etag: str) -> ImageRecord:
    return ImageRecord(
        image_id=1, bucket=store.bucket, object_key=key, etag=etag, label=None, subset="inbox"
    )


def test_put_get_and_head_round_trip_with_the_etag_s3_computes(store):
    key = "a/b/ü name.txt"
    etag = store.put_bytes(key, b"hello", content_type="text/plain")
    assert etag == hashlib.md5(b"hello").hexdigest()
    assert store.get_bytes(key) == b"hello"
    assert store.get_bytes(key, byte_range=(1, 3)) == b"ell"
    assert store.get_bytes(key, if_match=etag) == b"hello"
    info = store.head(key)
    assert (info.key, info.size, info.etag) == (key, 5, etag)
    assert [o.key for o in store.iter_objects("a/")] == [key]


def test_listing_pages_and_odd_keys_match_what_the_sdk_lists(store):
    keys = [f"l/{i:04d}.png" for i in range(1003)]
    keys += ["l/a b+c%20d.png", "l/ü/é x.png", "l/q?&=#.png", "l/tab\tkey.png"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, k.encode()), keys))
    listed = list(store.iter_objects("l/"))
    sdk = store.minio.list_objects(store.bucket, prefix="l/", recursive=True)
    expected = [ObjectInfo(o.object_name, int(o.size), o.etag.strip('"')) for o in sdk]
    assert listed == expected
    assert sorted(o.key for o in listed) == sorted(keys)
    assert all(o.size == len(o.key.encode()) and len(o.etag) == 32 for o in listed)
    assert list(store.iter_objects("nothing/")) == []


def test_a_large_object_is_one_put_whose_etag_is_its_md5(store):
    data = os.urandom(6 * 1024 * 1024 + 7)  # above the SDK's multipart part size
    assert store.put_bytes("big.bin", data) == hashlib.md5(data).hexdigest()
    assert store.get_bytes("big.bin") == data


def test_a_missing_object_is_404_none_on_head_and_missing_for_the_fetch(store):
    with pytest.raises(Exception) as info:
        store.get_bytes("gone.png")
    assert s3_error_code(info.value) == "NoSuchKey"
    assert store.head("gone.png") is None
    with pytest.raises(MissingObjectError, match="^missing_object"):
        fetch_object(store, record(store, "gone.png", "0" * 32))


def test_a_changed_object_fails_if_match_with_412_and_is_changed_for_the_fetch(store):
    old = store.put_bytes("x.png", b"first version")
    store.put_bytes("x.png", b"second version")
    with pytest.raises(Exception) as info:
        store.get_bytes("x.png", if_match=old)
    assert s3_error_code(info.value) == "PreconditionFailed"
    with pytest.raises(MissingObjectError, match="^changed_object"):
        fetch_object(store, record(store, "x.png", old))
    new = store.head("x.png").etag
    assert fetch_object(store, record(store, "x.png", new)) == b"second version"


def test_fetch_reads_the_records_bucket(store):
    etag = store.put_bytes("k.png", b"data")
    elsewhere = ObjectStore(store.settings, "some-other-bucket")
    assert fetch_object(elsewhere, record(store, "k.png", etag)) == b"data"


def test_bytes_come_as_stored_even_with_a_content_encoding(store):
    packed = gzip.compress(b"not to be unpacked")
    store.client.put_object(Bucket=store.bucket, Key="z", Body=packed, ContentEncoding="gzip")
    assert store.get_bytes("z") == packed


def test_stores_on_one_endpoint_share_their_clients(store):
    other = ObjectStore(store.settings, "another-bucket")
    assert other.minio is store.minio and other.client is store.client
    assert store.with_bucket("x").minio is store.minio


def test_threads_share_one_client_and_a_forked_child_makes_its_own(store):
    store.put_bytes("k", b"v")
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(store.minio)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1 and seen[0] is store.with_bucket("x").minio
    parent = id(store.minio)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own client, and it works
        ok = id(store.minio) != parent and store.get_bytes("k") == b"v"
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert store.get_bytes("k") == b"v"  # the parent's pool still works


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://127.0.0.1:9000", ("127.0.0.1:9000", False), id="local"),
        pytest.param("https://minio.example:443", ("minio.example:443", True), id="tls"),
        pytest.param("", ("s3.amazonaws.com", True), id="aws"),
    ],
)
def test_minio_endpoint(url, expected):
    assert minio_endpoint(url) == expected


def test_an_endpoint_with_a_path_is_refused_naming_it():
    with pytest.raises(ValueError, match="has a path"):
        minio_endpoint("http://host:9000/s3")


def test_refreshable_credentials_are_read_at_every_request_by_both_clients(store):
    """An assumed role's keys expire (an hour) before a training ends (six hours): with the
    provider's botocore credentials object, both clients sign each request with its current
    keys. Here every read of them renews (they are always about to expire): keys that stop
    working fail the next request, working ones make it succeed again."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from botocore.credentials import RefreshableCredentials

    good = {
        "access_key": store.settings.access_key_id,
        "secret_key": store.settings.secret_access_key,
    }
    current = dict(good)
    renewals: list[str] = []

    def renew() -> dict:
        renewals.append(current["access_key"])
        soon = datetime.now(UTC) + timedelta(seconds=1)  # within botocore's refresh window
        return {**current, "token": None, "expiry_time": soon.isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(renew(), renew, "test")
    rotating = ObjectStore(replace(store.settings, credentials=credentials), store.bucket)
    rotating.put_bytes("rotating/k", b"v")
    assert rotating.get_bytes("rotating/k") == b"v"
    assert [o.key for o in rotating.iter_objects("rotating/")] == ["rotating/k"]  # boto3 side

    current.update(access_key="revoked", secret_key="revoked-secret")
    with pytest.raises(Exception) as refused:
        rotating.get_bytes("rotating/k")
    assert s3_error_code(refused.value) in ("InvalidAccessKeyId", "AccessDenied", "403")
    with pytest.raises(Exception) as refused:
        rotating.delete("rotating/k")  # boto3
    assert s3_error_code(refused.value) in ("InvalidAccessKeyId", "AccessDenied", "403")

    current.update(good)  # the next session's keys
    assert rotating.get_bytes("rotating/k") == b"v"
    rotating.delete("rotating/k")
    assert "revoked" in renewals and renewals[-1] == good["access_key"]
