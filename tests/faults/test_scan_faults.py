"""Scan faults with real processes: S3 killed mid-scan, the scan SIGKILLed during its GETs and
inside its final transaction, overlapping scans, an empty listing, objects S3 refuses to read.
Each ends with the catalog an uninterrupted scan produces, nothing wrongly rejected and no
duplicate row."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import replace

import pytest
from PIL import Image

from pipeline import catalog
from pipeline.db import LockLost, create_database, drop_database, migrate, mysql_lock_name
from pipeline.errors import Refusal, ServiceUnavailable
from pipeline.store import ObjectStore
from tests.faults.private_s3 import PrivateS3, wait_until
from tests.integration.test_catalog import count_gets, png

P = "ds"


def put_images(store: ObjectStore, n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        split = "test" if i % 5 == 0 else "train"
        store.put_bytes(f"{P}/{split}/{'abc'[i % 3]}/{i:05d}.png", png(i))


def catalog_state(db) -> list[tuple]:
    """What a scan decides about each object (ids and timestamps aside)."""
    return [
        (
            r["object_key"],
            r["etag"],
            r["subset"],
            r["label"],
            r["status"],
            r["reject_reason"],
            r["content_sha256"],
            r["deleted_at"] is None,
        )
        for r in db.query("SELECT * FROM images ORDER BY object_key")
    ]


def count(db, sql: str, args: tuple = ()) -> int:
    return int(next(iter(db.query(sql, args)[0].values())))


def in_final_transaction(db) -> int:
    """Scans waiting to write their config: inside their final transaction, after the rest."""
    return count(
        db,
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
        " WHERE DB = %s AND INFO LIKE 'INSERT INTO scan_configs%%'",
        (db.name,),
    )


@pytest.fixture
def reference_db(settings):
    """A second fresh database: where an uninterrupted scan of the same bucket runs."""
    name = f"{settings.mysql.database}_test_{uuid.uuid4().hex[:10]}"
    database = create_database(settings.mysql, name)
    migrate(database)
    try:
        yield database
    finally:
        drop_database(settings.mysql, name)


def scan_cli(db, store: ObjectStore, *extra: str) -> subprocess.Popen:
    """`python -m pipeline scan` in its own process, against the test database and bucket."""
    env = {
        **os.environ,
        "MYSQL_DATABASE": db.name,
        "S3_ENDPOINT_URL": store.settings.endpoint_url,
    }
    argv = [sys.executable, "-m", "pipeline", "scan", "--bucket", store.bucket, "--prefix", P]
    return subprocess.Popen(
        [*argv, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_s3_killed_mid_scan_rejects_nothing_and_the_rerun_gets_only_the_rest(
    settings, db, reference_db, tmp_path
):
    s3 = PrivateS3(tmp_path / "s3", settings.s3)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.start(bucket)
    try:
        store = ObjectStore(s3.settings, bucket)
        put_images(store, 300)
        errors = s3.kill_during(
            lambda: catalog.scan(db, store, P, chunk_size=20, workers=1),
            lambda: count(db, "SELECT COUNT(*) FROM images") >= 60,
            timeout=120,
        )
        assert len(errors) == 1 and isinstance(errors[0], ServiceUnavailable), errors
        assert f"S3 at {s3.endpoint}" in str(errors[0])
        committed = count(db, "SELECT COUNT(*) FROM images")
        assert 60 <= committed < 300
        assert count(db, "SELECT COUNT(*) FROM images WHERE status <> 'ok'") == 0
        assert count(db, "SELECT COUNT(*) FROM scans") == 0
        assert count(db, "SELECT COUNT(*) FROM dataset_versions") == 0

        s3.start(bucket)
        store = ObjectStore(s3.settings, bucket)
        gets = count_gets(store)
        resumed = catalog.scan(db, store, P)
        assert len(gets) == resumed["gets"] == 300 - committed
        assert (resumed["ok"], resumed["rejected"]) == (300, 0)

        uninterrupted = catalog.scan(reference_db, store, P)
        assert resumed["dataset_version"] == uninterrupted["dataset_version"]
        assert catalog_state(db) == catalog_state(reference_db)
    finally:
        s3.kill()


def test_sigkill_during_the_gets_then_the_next_scan_gets_only_the_rest(db, store, reference_db):
    put_images(store, 240)
    proc = scan_cli(db, store, "--chunk-size", "20", "--workers", "1")
    try:
        wait_until(lambda: count(db, "SELECT COUNT(*) FROM images") >= 40, what="40 rows")
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    committed = count(db, "SELECT COUNT(*) FROM images")
    assert committed < 240, "the scan finished before it was killed"
    assert committed % 20 == 0  # whole chunks only
    assert count(db, "SELECT COUNT(*) FROM scans") == 0

    gets = count_gets(store)
    resumed = catalog.scan(db, store, P)
    assert len(gets) == resumed["gets"] == 240 - committed
    uninterrupted = catalog.scan(reference_db, store, P)
    assert resumed["dataset_version"] == uninterrupted["dataset_version"]
    assert catalog_state(db) == catalog_state(reference_db)


def test_sigkill_inside_the_final_transaction_leaves_no_version_and_no_scan(
    db, store, reference_db
):
    put_images(store, 60)
    # Hold the row the scan's final transaction writes last but one, so the scan is caught
    # inside that transaction (images, dataset version and membership written, not committed).
    blocker = db.connect()
    try:
        with blocker.cursor() as cur:
            cur.execute(
                "INSERT INTO scan_configs (bucket, prefix, prefix_hash, config, updated_at)"
                " VALUES (%s, %s, %s, '{}', NOW(6))",
                (store.bucket, P, catalog._key_hash(P)),
            )
        proc = scan_cli(db, store, "--chunk-size", "20")
        try:
            wait_until(
                lambda: in_final_transaction(db) == 1,
                what="the scan waiting inside its final transaction",
            )
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        blocker.rollback()
    finally:
        blocker.close()
    assert proc.returncode == -signal.SIGKILL
    # The server rolls the dead client's transaction back once the lock it waited for is free.
    wait_until(
        lambda: in_final_transaction(db) == 0,
        what="the killed scan's transaction to end",
    )
    assert count(db, "SELECT COUNT(*) FROM images") == 60  # the chunks were committed before
    assert count(db, "SELECT COUNT(*) FROM dataset_versions") == 0
    assert count(db, "SELECT COUNT(*) FROM dataset_version_images") == 0
    assert count(db, "SELECT COUNT(*) FROM scans") == 0
    assert count(db, "SELECT COUNT(*) FROM scan_configs") == 0

    gets = count_gets(store)
    resumed = catalog.scan(db, store, P)
    assert gets == [] and resumed["new_version"] is True
    uninterrupted = catalog.scan(reference_db, store, P)
    assert resumed["dataset_version"] == uninterrupted["dataset_version"]
    assert catalog_state(db) == catalog_state(reference_db)
    assert count(db, "SELECT COUNT(*) FROM dataset_version_images") == 60


def test_the_scan_lock_lost_inside_the_final_transaction_writes_nothing(db, store):
    """The connection holding the scan's lock ends (KILL, as a failover does) while the scan is
    inside its final transaction: another scan may hold the lock now, so that transaction must
    not commit. It runs on the lock's own connection, which takes it down too."""
    put_images(store, 20)
    lock = mysql_lock_name(db, catalog.scan_lock(store.bucket, P))
    outcome: list[BaseException | dict] = []
    blocker = db.connect()
    try:
        with blocker.cursor() as cur:  # the scan's write of its config waits for this row
            cur.execute(
                "INSERT INTO scan_configs (bucket, prefix, prefix_hash, config, updated_at)"
                " VALUES (%s, %s, %s, '{}', NOW(6))",
                (store.bucket, P, catalog._key_hash(P)),
            )

        def scan() -> None:
            try:
                outcome.append(catalog.scan(db, store, P))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                outcome.append(exc)

        worker = threading.Thread(target=scan)
        worker.start()
        wait_until(
            lambda: in_final_transaction(db) == 1,
            what="the scan waiting inside its final transaction",
        )
        holder = db.query("SELECT IS_USED_LOCK(%s) AS id", (lock,))[0]["id"]
        db.execute(f"KILL CONNECTION {int(holder)}")
        blocker.rollback()
        worker.join(timeout=60)
    finally:
        blocker.close()
    assert len(outcome) == 1 and isinstance(outcome[0], LockLost), outcome
    assert count(db, "SELECT COUNT(*) FROM images") == 20  # the chunks were committed before
    for table in ("dataset_versions", "dataset_version_images", "scans", "scan_configs"):
        assert count(db, f"SELECT COUNT(*) FROM {table}") == 0, table
    assert catalog.scan(db, store, P)["gets"] == 0


def scan_losing_its_lock(db, store, monkeypatch, first_chunk: str, **options):
    """A scan (in a thread) whose lock connection is KILLed once `first_chunk` (a COUNT query)
    says its first chunk of 10 is committed; returns what the scan raised or returned."""
    lock = mysql_lock_name(db, catalog.scan_lock(store.bucket, P))
    monkeypatch.setenv(catalog.PAUSE_AFTER_CHUNK_ENV, "3")
    outcome: list[BaseException | dict] = []

    def scan() -> None:
        try:
            outcome.append(catalog.scan(db, store, P, chunk_size=10, **options))
        except BaseException as exc:  # noqa: BLE001 - returned
            outcome.append(exc)

    worker = threading.Thread(target=scan)
    worker.start()
    try:
        wait_until(lambda: count(db, first_chunk) == 10, what="the first chunk")
        holder = db.query("SELECT IS_USED_LOCK(%s) AS id", (lock,))[0]["id"]
        db.execute(f"KILL CONNECTION {int(holder)}")
    finally:
        worker.join(timeout=60)
        monkeypatch.delenv(catalog.PAUSE_AFTER_CHUNK_ENV)
    assert len(outcome) == 1
    return outcome[0]


def test_a_scan_that_lost_its_lock_writes_no_more_chunks(db, store, monkeypatch):
    """The scan lock's connection ends (KILL, as a failover does) while the scan validates:
    another scan may take the lock and write the catalog now, so the first must not go on
    committing its chunks over it (before: it did, for up to half an hour, until its final
    transaction found the lock gone)."""
    put_images(store, 30)
    images = "SELECT COUNT(*) FROM images"
    assert isinstance(scan_losing_its_lock(db, store, monkeypatch, images), LockLost)
    assert count(db, images) == 10  # no chunk after the loss
    assert count(db, "SELECT COUNT(*) FROM scans") == 0

    resumed = catalog.scan(db, store, P)
    assert resumed["gets"] == 20 and count(db, images) == 30


def test_a_scan_with_new_limits_that_died_half_way_is_finished_by_the_next_scan(
    db, store, monkeypatch
):
    """`scan --min-side 64` commits a chunk of verdicts under its limits and dies (here: its
    lock connection ends). The next scan, with the stored limits (min_side 8), judges those
    rows again; a rerun of the new-limits scan GETs only what it had not judged (before: the
    first chunk stayed `too_small` under min_side 8, and the rerun GOT everything again)."""
    put_images(store, 30)  # 16x16 PNGs
    assert catalog.scan(db, store, P)["reasons"] == {}
    too_small = "SELECT COUNT(*) FROM images WHERE reject_reason = 'too_small'"
    died = scan_losing_its_lock(db, store, monkeypatch, too_small, min_side=64)
    assert isinstance(died, LockLost)

    rerun = catalog.scan(db, store, P, min_side=64)  # the same command again
    assert rerun["gets"] == 20 and rerun["reasons"] == {"too_small": 30}
    stored = catalog.scan(db, store, P, min_side=8)  # back to the limits before
    assert stored["gets"] == 30 and stored["reasons"] == {} and count(db, too_small) == 0

    # A strict scan dies again after its first chunk; the next scan (no options: the stored
    # min_side 8) judges that chunk again.
    assert isinstance(
        scan_losing_its_lock(db, store, monkeypatch, too_small, min_side=64), LockLost
    )
    plain = catalog.scan(db, store, P)
    assert plain["gets"] == 10 and plain["reasons"] == {} and count(db, too_small) == 0


def test_overlapping_scans_with_uploads_between_their_lists_end_as_serial_scans(
    db, store, reference_db
):
    put_images(store, 150)
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(catalog.scan(db, store, P, chunk_size=10, workers=1))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    first = threading.Thread(target=run)
    first.start()
    wait_until(lambda: count(db, "SELECT COUNT(*) FROM images") > 0, what="the first scan's GETs")
    put_images(store, 15, start=1000)  # after the first scan's LIST
    second = threading.Thread(target=run)
    second.start()
    first.join(timeout=120)
    second.join(timeout=120)

    assert errors == []
    assert sorted(r["new"] for r in results) == [15, 150]
    latest = catalog.latest_dataset(db, store.bucket, P)
    serial = catalog.scan(reference_db, store, P)
    assert latest["dataset_version"] == serial["dataset_version"] == results[-1]["dataset_version"]
    assert catalog_state(db) == catalog_state(reference_db)
    rows = db.query("SELECT object_key, COUNT(*) AS n FROM images GROUP BY object_key")
    assert len(rows) == 165 and all(r["n"] == 1 for r in rows)


def test_empty_listing_is_refused_and_marks_nothing_deleted(db, store):
    put_images(store, 10)
    first = catalog.scan(db, store, P)
    store.delete_prefix(f"{P}/")

    with pytest.raises(Refusal, match=rf"s3://{store.bucket}/{P} would mark 10 of 10"):
        catalog.scan(db, store, P)
    assert count(db, "SELECT COUNT(*) FROM images WHERE deleted_at IS NOT NULL") == 0
    assert count(db, "SELECT COUNT(*) FROM scans") == 1
    assert (
        catalog.latest_dataset(db, store.bucket, P)["dataset_version"] == first["dataset_version"]
    )

    wrong = catalog.scan(db, store, "ds-typo")  # another prefix has its own (empty) catalog
    assert (wrong["deleted"], wrong["ok"]) == (0, 0)
    assert count(db, "SELECT COUNT(*) FROM images WHERE deleted_at IS NOT NULL") == 0

    forced = catalog.scan(db, store, P, force_delete=True)
    assert forced["deleted"] == 10
    assert count(db, "SELECT COUNT(*) FROM images WHERE deleted_at IS NOT NULL") == 10


def test_a_scan_without_options_keeps_the_prefix_configuration(db, store):
    """The inbox DAG scans without options after the main DAG scanned with val_percent 20."""
    put_images(store, 40)
    main = catalog.scan(db, store, P, val_percent=20, leakage_policy="keep")
    inbox = catalog.scan(db, store, P)
    assert inbox["dataset_version"] == main["dataset_version"] and inbox["changed"] is False
    assert (inbox["val_percent"], inbox["leakage_policy"]) == (20, "keep")
    stored = db.query("SELECT scan_config FROM dataset_versions")[0]["scan_config"]
    assert catalog.ScanConfig.from_dict(__import__("json").loads(stored)).val_percent == 20
    other = catalog.scan(db, store, P, val_percent=10)
    assert other["dataset_version"] != main["dataset_version"]
    assert catalog.load_scan_config(db, store.bucket, P).val_percent == 10


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 30 + seed).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_reject_reasons_are_codes_with_a_detail_and_the_summary_groups_by_code(db, store):
    put_images(store, 6)
    store.put_bytes(f"{P}/train/a/truncated.jpg", jpeg(1)[:-300])
    store.put_bytes(f"{P}/train/a/truncated2.jpg", jpeg(2)[:-200])
    big = jpeg(7, size=(400, 300))
    assert len(big) > 20_000 > len(jpeg(1))
    store.put_bytes(f"{P}/train/b/big.jpg", big)
    store.put_bytes(f"{P}/train/b/notes.png", b"these are not pixels")
    gets = count_gets(store)
    summary = catalog.scan(db, store, P, max_object_bytes=20_000)

    assert summary["reasons"] == {
        catalog.REJECT_UNDECODABLE: 2,
        catalog.REJECT_TOO_LARGE: 1,
        catalog.REJECT_NOT_AN_IMAGE: 1,
    }
    assert f"{P}/train/b/big.jpg" not in gets  # refused by its listed size, never read
    rows = {
        r["object_key"].rsplit("/", 1)[1]: r
        for r in db.query("SELECT object_key, reject_reason, reject_detail FROM images")
    }
    assert "truncated" in rows["truncated.jpg"]["reject_detail"].lower()
    assert "max_object_bytes" in rows["big.jpg"]["reject_detail"]
    assert rows["notes.png"]["reject_detail"] is None
    assert all(len(r["reject_reason"] or "") <= 32 for r in rows.values())


def test_objects_s3_refuses_to_read_are_quarantined_and_a_refused_prefix_fails_the_scan(
    settings, db, reference_db, tmp_path
):
    """A private SeaweedFS with a second identity (the pipeline's) that may list the bucket but
    read only some folders: S3 answers AccessDenied for the rest, as a bucket policy or ACL on
    some keys does."""
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    readable = [f"{P}/train/a", f"{P}/train/b", f"{P}/test"]
    reader = {"accessKey": "pipeline-reader", "secretKey": "pipeline-reader-secret"}
    identity = {"name": "reader", "credentials": [reader]}
    s3 = PrivateS3(
        tmp_path / "s3",
        settings.s3,
        [
            identity | {"actions": [f"List:{bucket}", *(f"Read:{bucket}/{p}/*" for p in readable)]},
            {
                "name": "lister",
                "credentials": [{"accessKey": "lister", "secretKey": "lister-secret"}],
                "actions": [f"List:{bucket}"],
            },
        ],
    )
    s3.start(bucket)
    try:
        admin = ObjectStore(s3.settings, bucket)
        put_images(admin, 30)  # labels a, b, c; c is not readable by the pipeline's identity
        as_reader = replace(
            s3.settings, access_key_id=reader["accessKey"], secret_access_key=reader["secretKey"]
        )
        store = ObjectStore(as_reader, bucket)

        first = catalog.scan(db, store, P)
        denied = db.query(
            "SELECT object_key, status, reject_reason, reject_detail FROM images"
            " WHERE object_key LIKE %s",
            (f"{P}/train/c/%",),
        )
        assert len(denied) == 8 and first["reasons"] == {catalog.REJECT_UNREADABLE: 8}
        assert {(r["status"], r["reject_reason"]) for r in denied} == {
            ("rejected", catalog.REJECT_UNREADABLE)
        }
        assert all(r["reject_detail"].startswith("AccessDenied: ") for r in denied)
        assert sorted(catalog.get_dataset(db, first["dataset_version"])["label_map"]) == ["a", "b"]

        # Every later scan tries them again (same listing): here with the admin's credentials,
        # as after the policy was fixed. They are accepted; nothing else is read again.
        gets = count_gets(admin)
        fixed = catalog.scan(db, admin, P)
        assert sorted(gets) == sorted(r["object_key"] for r in denied)
        assert fixed["reasons"] == {} and fixed["ok"] == 30

        # Credentials that may read nothing: a refusal, not 30 quarantined images.
        lister = replace(s3.settings, access_key_id="lister", secret_access_key="lister-secret")
        refused = r"S3 refused to read 30 of the 30 objects .*AccessDenied"
        with pytest.raises(Refusal, match=refused):
            catalog.scan(reference_db, ObjectStore(lister, bucket), P)
        assert count(reference_db, "SELECT COUNT(*) FROM images WHERE status = 'rejected'") == 0
        assert count(reference_db, "SELECT COUNT(*) FROM scans") == 0
    finally:
        s3.kill()
