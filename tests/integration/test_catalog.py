"""Catalog scans against the real S3 endpoint and MySQL: versions, history, validation, locking."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from pipeline import catalog
from pipeline.data import MissingObjectError, fetch_object
from pipeline.db import LockLost, LockTimeout, mysql_lock_name, named_lock

P = "ds"


def png(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A small PNG whose bytes differ for every seed."""
    buf = io.BytesIO()
    img = Image.new("RGB", size, (seed % 256, (seed // 256) % 256, 77))
    img.putpixel((0, 0), (seed % 7, seed % 11, seed % 13))
    img.save(buf, format="PNG")
    return buf.getvalue()


def count_gets(store) -> list[str]:
    """Record the key of every GET the store sends (the real GET still runs)."""
    seen: list[str] = []
    get_bytes = store.get_bytes

    def recorded(key: str, **options) -> bytes:
        seen.append(key)
        return get_bytes(key, **options)

    store.get_bytes = recorded
    return seen


def put_tree(store, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        store.put_bytes(f"{P}/{key}", data)


def base_tree() -> dict[str, bytes]:
    files = {}
    for i in range(4):
        files[f"train/Gold Fish/g{i}.png"] = png(10 + i)
        files[f"train/Ünï 猫/u{i}.png"] = png(20 + i)
    files["test/Gold Fish/t0.png"] = png(30)
    files["test/Ünï 猫/t1.png"] = png(31)
    files["inbox/new0.png"] = png(40)
    return files


def image_rows(db, **where) -> list[dict]:
    sql = "SELECT * FROM images"
    if where:
        sql += " WHERE " + " AND ".join(f"{k} = %s" for k in where)
    return db.query(sql + " ORDER BY object_key", tuple(where.values()))


def test_first_scan_catalogs_images_and_reports_ignored_keys(db, store):
    put_tree(store, base_tree())
    put_tree(
        store,
        {
            "train/Gold Fish/": b"",
            "train/Gold Fish/.DS_Store": b"x",
            "train/.ipynb_checkpoints/a.png": png(1),
            "train/Gold Fish/deeper/a.png": png(2),
            "training/x/a.png": png(3),
            "train/loose.png": png(4),
        },
    )
    gets = count_gets(store)
    summary = catalog.scan(db, store, P, val_percent=0)

    assert summary["new"] == 11 and summary["ok"] == 11 and summary["rejected"] == 0
    assert summary["listed"] == 17 and summary["ignored"] == 6
    assert summary["ignored_reasons"] == {
        catalog.IGNORED_FOLDER_MARKER: 1,
        catalog.IGNORED_HIDDEN: 2,
        catalog.IGNORED_TOO_DEEP: 1,
        catalog.IGNORED_UNKNOWN_SPLIT: 1,
        catalog.IGNORED_NO_LABEL: 1,
    }
    assert summary["counts"] == {
        "train": {"Gold Fish": 4, "Ünï 猫": 4},
        "test": {"Gold Fish": 1, "Ünï 猫": 1},
    }
    assert summary["label_map"] == {"Gold Fish": 0, "Ünï 猫": 1}
    assert summary["changed"] is True and summary["gets"] == len(gets) == 11
    rows = image_rows(db)
    assert len(rows) == 11
    assert {r["label"] for r in rows} == {"Gold Fish", "Ünï 猫", None}
    inbox = [r for r in rows if r["subset"] == "inbox"]
    assert len(inbox) == 1 and inbox[0]["label"] is None
    g0 = next(r for r in rows if r["object_key"] == f"{P}/train/Gold Fish/g0.png")
    assert (g0["width"], g0["height"], g0["format"], g0["mode"]) == (16, 16, "PNG", "RGB")
    assert len(g0["content_sha256"]) == 64 and g0["status"] == "ok"

    info = catalog.latest_dataset(db, store.bucket, P)
    assert info["dataset_version"] == summary["dataset_version"]
    assert info == catalog.get_dataset(db, summary["dataset_version"]) | {
        "created_at": info["created_at"]
    }
    members = catalog.dataset_images(db, summary["dataset_version"], ["train", "val", "test"])
    assert len(members) == 10
    assert all(isinstance(m, catalog.ImageRecord) for m in members)


def test_rescan_of_unchanged_bucket_gets_no_objects(db, store):
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P)
    membership = db.query("SELECT COUNT(*) AS n FROM dataset_version_images")[0]["n"]
    gets = count_gets(store)
    second = catalog.scan(db, store, P)

    assert gets == [] and second["gets"] == 0
    assert second["dataset_version"] == first["dataset_version"]
    assert second["changed"] is False and second["new_version"] is False
    assert (second["new"], second["changed_objects"], second["unchanged"]) == (0, 0, 11)
    assert db.query("SELECT COUNT(*) AS n FROM dataset_version_images")[0]["n"] == membership
    assert db.query("SELECT COUNT(*) AS n FROM dataset_versions")[0]["n"] == 1
    assert db.query("SELECT COUNT(*) AS n FROM scans")[0]["n"] == 2
    assert len(image_rows(db)) == 11


def test_new_inbox_image_does_not_change_the_dataset_version(db, store):
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P)
    put_tree(store, {"inbox/new1.png": png(41), "inbox/bad.png": b"nope"})
    second = catalog.scan(db, store, P)
    assert second["new"] == 2 and second["inbox"] == 2
    inbox = catalog.inbox_images(db, store.bucket, P)
    assert [(i.object_key, i.label) for i in inbox] == [
        (f"{P}/inbox/new0.png", None),
        (f"{P}/inbox/new1.png", None),
    ]
    assert second["dataset_version"] == first["dataset_version"] and not second["changed"]


def test_changed_object_is_revalidated_and_makes_a_new_version(db, store):
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P)
    key = f"{P}/train/Gold Fish/g1.png"
    store.put_bytes(key, b"now plain text")
    gets = count_gets(store)
    second = catalog.scan(db, store, P)

    assert gets == [key] and second["changed_objects"] == 1
    assert second["dataset_version"] != first["dataset_version"] and second["changed"]
    row = image_rows(db, object_key=key)[0]
    assert (row["status"], row["reject_reason"]) == ("rejected", catalog.REJECT_NOT_AN_IMAGE)
    store.put_bytes(key, png(99))
    third = catalog.scan(db, store, P)
    row = image_rows(db, object_key=key)[0]
    assert row["status"] == "ok" and row["reject_reason"] is None
    assert third["dataset_version"] not in (first["dataset_version"], second["dataset_version"])


def test_deleted_object_keeps_history_and_revives(db, store):
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P)
    key = f"{P}/test/Gold Fish/t0.png"
    data = store.get_bytes(key)
    store.delete(key)
    second = catalog.scan(db, store, P)

    assert second["deleted"] == 1 and second["changed"]
    assert second["counts"]["test"] == {"Ünï 猫": 1}
    row = image_rows(db, object_key=key)[0]
    assert row["deleted_at"] is not None
    old_members = catalog.dataset_images(db, first["dataset_version"], ["test"])
    assert [m.object_key for m in old_members] == [f"{P}/test/Ünï 猫/t1.png"]

    store.put_bytes(key, data)
    gets = count_gets(store)
    third = catalog.scan(db, store, P)
    assert gets == [] and third["revived"] == 1
    assert image_rows(db, object_key=key)[0]["deleted_at"] is None
    assert third["dataset_version"] == first["dataset_version"] and third["changed"]
    assert len(image_rows(db)) == 11


def ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="ICO")
    return buf.getvalue()


def test_each_rejection_reason_is_recorded(db, store):
    put_tree(store, base_tree())
    bad = {
        "train/Gold Fish/empty.png": (b"", catalog.REJECT_ZERO_BYTES),
        "train/Gold Fish/text.png": (b"just some text", catalog.REJECT_NOT_AN_IMAGE),
        "train/Gold Fish/broken.png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, catalog.REJECT_CORRUPT),
        "train/Gold Fish/icon.ico": (ico(), catalog.REJECT_UNSUPPORTED),
        "train/Gold Fish/tiny.png": (png(5, (4, 4)), catalog.REJECT_TOO_SMALL),
        "train/Gold Fish/big.png": (png(6, (40, 40)), catalog.REJECT_TOO_MANY_PIXELS),
    }
    put_tree(store, {k: v for k, (v, _) in bad.items()})
    summary = catalog.scan(db, store, P, max_pixels=1000, min_side=8, val_percent=0)

    assert summary["reasons"] == {reason: 1 for _, reason in bad.values()}
    assert summary["rejected"] == 6 and summary["ok"] == 11
    for key, (_, reason) in bad.items():
        row = image_rows(db, object_key=f"{P}/{key}")[0]
        assert (row["status"], row["reject_reason"]) == ("rejected", reason), key
    assert summary["counts"]["train"]["Gold Fish"] == 4
    scans = db.query("SELECT rejected, gets FROM scans")
    assert scans == [{"rejected": 6, "gets": 16}]  # the zero-byte object needs no GET


@pytest.mark.parametrize(
    "policy", [pytest.param("reject", id="reject"), pytest.param("keep", id="keep")]
)
def test_leakage_and_label_conflicts_follow_the_policy(db, store, policy):
    put_tree(store, base_tree())
    leaked, clash = png(500), png(600)
    put_tree(
        store,
        {
            "train/Gold Fish/leak.png": leaked,
            "test/Gold Fish/leak_copy.png": leaked,
            "train/Gold Fish/clash.png": clash,
            "train/Ünï 猫/clash.png": clash,
        },
    )
    summary = catalog.scan(
        db, store, P, leakage_policy=policy, label_conflict_policy=policy, val_percent=0
    )
    assert summary["leakage"] == 1 and summary["label_conflicts"] == 1
    assert summary["leakage_examples"] == [
        [f"{P}/test/Gold Fish/leak_copy.png", f"{P}/train/Gold Fish/leak.png"]
    ]
    status = {r["object_key"]: (r["status"], r["reject_reason"]) for r in image_rows(db)}
    if policy == "reject":
        assert status[f"{P}/test/Gold Fish/leak_copy.png"] == ("rejected", "leakage")
        assert status[f"{P}/train/Gold Fish/leak.png"] == ("ok", None)
        assert status[f"{P}/train/Gold Fish/clash.png"] == ("rejected", "label_conflict")
        assert status[f"{P}/train/Ünï 猫/clash.png"] == ("rejected", "label_conflict")
        assert summary["reasons"] == {"label_conflict": 2, "leakage": 1}
        assert summary["counts"]["test"]["Gold Fish"] == 1
    else:
        assert all(s == ("ok", None) for s in status.values())
        assert summary["reasons"] == {}
        assert summary["counts"]["test"]["Gold Fish"] == 2

    # Removing the train copy ends the leak: the test copy comes back without any GET.
    store.delete(f"{P}/train/Gold Fish/leak.png")
    gets = count_gets(store)
    again = catalog.scan(db, store, P, leakage_policy=policy, label_conflict_policy=policy)
    assert gets == [] and again["leakage"] == 0
    assert image_rows(db, object_key=f"{P}/test/Gold Fish/leak_copy.png")[0]["status"] == "ok"


def test_val_split_is_carved_unless_a_val_folder_exists(db, store):
    files = {f"train/a/{i}.png": png(i) for i in range(60)}
    files |= {f"train/b/{i}.png": png(100 + i) for i in range(60)}
    put_tree(store, files)
    # A stray file and a broken image under val/ are no val split: val is still carved.
    put_tree(
        store, files | {"val/a/notes.txt": b"not an image", "val/b/x.png": b"\x89PNG\r\n\x1a\njunk"}
    )
    carved = catalog.scan(db, store, P, val_percent=25)
    n_val = sum(carved["counts"]["val"].values())
    expected = sum(1 for k in files if catalog.val_bucket(k) < 25)
    assert n_val == expected and 15 < n_val < 45
    assert carved["has_val_split"] is False
    assert carved["reasons"] == {"corrupt_header": 1, "not_an_image": 1}

    put_tree(store, {"val/a/v.png": png(900), "val/b/v.png": png(901)})
    explicit = catalog.scan(db, store, P, val_percent=25)
    assert explicit["counts"]["val"] == {"a": 1, "b": 1}
    assert sum(explicit["counts"]["train"].values()) == 120
    assert explicit["gets"] == 2  # re-carving rewrites subsets from the catalog, no GET


def test_unseen_labels_are_reported(db, store):
    put_tree(store, base_tree() | {"test/Shark/s.png": png(700)})
    summary = catalog.scan(db, store, P)
    assert summary["unseen_labels"] == ["Shark"]
    problems = catalog.check_dataset(catalog.get_dataset(db, summary["dataset_version"]))
    assert any("Shark" in p for p in problems)


def test_concurrent_scans_leave_consistent_rows(db, store):
    files = {f"train/{'ab'[i % 2]}/{i}.png": png(i) for i in range(40)}
    put_tree(store, files)
    gets = count_gets(store)
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(catalog.scan(db, store, P))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert results[0]["dataset_version"] == results[1]["dataset_version"]
    assert sorted(r["new"] for r in results) == [0, 40]
    assert len(gets) == 40  # the second scan waited for the lock and found everything known
    rows = db.query("SELECT object_key, COUNT(*) AS n FROM images GROUP BY object_key")
    assert len(rows) == 40 and all(r["n"] == 1 for r in rows)
    assert db.query("SELECT COUNT(*) AS n FROM dataset_version_images")[0]["n"] == 40


def test_scan_lock_timeout_names_the_scope(db, store):
    put_tree(store, {"train/a/0.png": png(1)})
    with named_lock(db, catalog.scan_lock(store.bucket, P), timeout_s=5, what="test"):
        with pytest.raises(LockTimeout, match=f"scan of s3://{store.bucket}/{P}"):
            catalog.scan(db, store, P, lock_timeout_s=1)
    assert catalog.scan(db, store, P)["new"] == 1


def test_a_scan_whose_lock_connection_ended_writes_nothing_and_the_next_scan_does(db, store):
    """MySQL ends the connection holding the scan's lock (a restart, a KILL) after the LIST:
    another scan may hold the lock now, so this one fails before it writes its result."""
    put_tree(store, base_tree())
    lock = mysql_lock_name(db, catalog.scan_lock(store.bucket, P))

    def end_lock_connection() -> None:
        holder = db.query("SELECT IS_USED_LOCK(%s) AS id", (lock,))[0]["id"]
        db.execute(f"KILL CONNECTION {int(holder)}")

    after_listing(store, end_lock_connection)
    with pytest.raises(LockLost, match="was lost"):
        catalog.scan(db, store, P)
    assert db.query("SELECT COUNT(*) AS n FROM scans")[0]["n"] == 0
    assert db.query("SELECT COUNT(*) AS n FROM dataset_versions")[0]["n"] == 0
    assert db.query("SELECT COUNT(*) AS n FROM images")[0]["n"] == 0  # not even its chunk
    del store.iter_objects  # the store's own method again
    again = catalog.scan(db, store, P)
    assert again["listed"] == len(base_tree()) and again["gets"] == len(base_tree())
    assert db.query("SELECT dataset_version FROM scans") == [
        {"dataset_version": again["dataset_version"]}
    ]


def test_a_rejection_made_while_a_scan_runs_is_not_overwritten_by_it(db, store):
    """Training and scoring reject images they cannot decode while a scan of their prefix is
    validating a new upload; the scan changes one image's subset (new val_percent) from the
    state it read before the rejection: the rejection must stand, and the next scan must read
    the catalog again (not take the listing as done) and leave both images out."""
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P, val_percent=0)
    victim = catalog.dataset_images(db, first["dataset_version"], ["train"])[0]
    untouched = catalog.dataset_images(db, first["dataset_version"], ["test"])[0]
    store.put_bytes(f"{P}/train/Gold Fish/new.png", png(99))
    get_bytes = store.get_bytes

    def rejected_meanwhile(key: str, **options) -> bytes:
        if key.endswith("/new.png"):
            rejections = [(r, "decode_failed: truncated JPEG") for r in (victim, untouched)]
            assert catalog.mark_rejected(db, rejections) == 2
        return get_bytes(key, **options)

    store.get_bytes = rejected_meanwhile
    second = catalog.scan(db, store, P, val_percent=100)
    del store.get_bytes
    row = image_rows(db, object_key=victim.object_key)[0]
    assert (row["status"], row["reject_reason"], row["reject_detail"]) == (
        "rejected",
        "decode_failed",
        "truncated JPEG",
    )
    # The other train images did move to val, and the next scan sees the rejection.
    moved = image_rows(db, split="train", status="ok")
    assert moved and {r["subset"] for r in moved} == {"val"}
    third = catalog.scan(db, store, P)
    assert third["reasons"] == {"decode_failed": 2}
    assert third["dataset_version"] != second["dataset_version"]
    members = catalog.dataset_images(db, third["dataset_version"], ["train", "val", "test"])
    assert {victim.object_key, untouched.object_key}.isdisjoint(m.object_key for m in members)


def test_mark_rejected_survives_rescan_until_the_object_changes(db, store):
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P)
    members = catalog.dataset_images(db, first["dataset_version"], ["train", "val"])
    victim = members[0]
    assert catalog.mark_rejected(db, [(victim, "decode_error: truncated JPEG")]) == 1

    after = catalog.dataset_images(db, first["dataset_version"], ["train", "val"])
    assert victim not in after and len(after) == len(members) - 1
    second = catalog.scan(db, store, P)
    row = image_rows(db, object_key=victim.object_key)[0]
    assert (row["status"], row["reject_reason"], row["reject_detail"]) == (
        "rejected",
        "decode_error",
        "truncated JPEG",
    )
    assert second["reasons"] == {"decode_error": 1}
    assert second["dataset_version"] != first["dataset_version"]

    store.put_bytes(victim.object_key, png(4242))
    catalog.scan(db, store, P)
    assert image_rows(db, object_key=victim.object_key)[0]["status"] == "ok"
    # A rejection made for the old bytes does not stick to the new ones.
    assert catalog.mark_rejected(db, [(victim, "decode_error: late")]) == 0
    assert image_rows(db, object_key=victim.object_key)[0]["status"] == "ok"


def test_labels_with_quotes_are_kept_exactly(db, store):
    label = 'it\'s "quoted"; DROP TABLE images; --'
    put_tree(store, {f"train/{label}/a.png": png(1), "train/plain/b.png": png(2)})
    summary = catalog.scan(db, store, P, val_percent=0)
    assert summary["counts"]["train"] == {label: 1, "plain": 1}
    assert image_rows(db, label=label)[0]["object_key"] == f"{P}/train/{label}/a.png"


def test_unknown_dataset_version_raises_lookup_error(db):
    with pytest.raises(LookupError, match="nope123"):
        catalog.get_dataset(db, "nope123")
    with pytest.raises(LookupError, match="nope123"):
        catalog.dataset_images(db, "nope123", ["train"])


def after_listing(store, action) -> None:
    """Run `action()` on the real bucket right after the scan's LIST, before its GETs."""
    iter_objects = store.iter_objects

    def listed_then_acted(*args, **kwargs):
        objects = list(iter_objects(*args, **kwargs))
        action()
        return iter(objects)

    store.iter_objects = listed_then_acted


def test_an_object_replaced_after_the_list_is_not_read_and_the_next_scan_takes_it(db, store):
    put_tree(store, base_tree())
    catalog.scan(db, store, P)
    key = f"{P}/inbox/grows.png"
    store.put_bytes(key, png(50))
    big = png(51, size=(1200, 1200)) + bytes(2 * 1024 * 1024)  # valid PNG, trailing bytes
    read: list[int] = []
    get_bytes = store.get_bytes

    def measured(k: str, **options) -> bytes:
        data = get_bytes(k, **options)
        read.append(len(data))
        return data

    store.get_bytes = measured
    after_listing(store, lambda: store.put_bytes(key, big))
    second = catalog.scan(db, store, P, max_object_bytes=64 * 1024)

    # Listed small, replaced by 2 MiB before its GET: the GET is of the listed version only.
    assert sum(read) < 64 * 1024, read
    assert image_rows(db, object_key=key) == []
    assert second["listing_digest"] is None
    store.iter_objects = type(store).iter_objects.__get__(store)
    third = catalog.scan(db, store, P)
    row = image_rows(db, object_key=key)[0]
    assert (row["status"], row["reject_reason"]) == ("rejected", catalog.REJECT_TOO_LARGE)
    assert row["size_bytes"] == len(big) and third["new"] == 1


def test_an_object_gone_at_its_get_and_back_unchanged_is_catalogued_by_the_next_scan(db, store):
    put_tree(store, base_tree())
    catalog.scan(db, store, P)
    key, data = f"{P}/inbox/flicker.png", png(60)
    store.put_bytes(key, data)
    after_listing(store, lambda: store.delete(key))
    catalog.scan(db, store, P)
    assert image_rows(db, object_key=key) == []

    store.put_bytes(key, data)  # the same bytes again: the same listing as the last scan's
    store.iter_objects = type(store).iter_objects.__get__(store)
    again = catalog.scan(db, store, P)
    assert again["new"] == 1
    assert image_rows(db, object_key=key)[0]["status"] == "ok"


def test_an_object_missing_at_a_later_get_and_back_unchanged_is_accepted_again(db, store):
    put_tree(store, base_tree())
    first = catalog.scan(db, store, P)
    victim = catalog.dataset_images(db, first["dataset_version"], ["test"])[0]
    data = store.get_bytes(victim.object_key)
    store.delete(victim.object_key)  # deleted by mistake, and scoring's GET finds it gone
    with pytest.raises(MissingObjectError) as gone:
        fetch_object(store, victim)
    assert catalog.mark_rejected(db, [(victim, str(gone.value))]) == 1
    row = image_rows(db, object_key=victim.object_key)[0]
    assert (row["status"], row["reject_reason"]) == ("rejected", catalog.REJECT_MISSING_OBJECT)

    store.put_bytes(victim.object_key, data)  # restored: the same bytes, the same ETag
    assert store.head(victim.object_key).etag == victim.etag
    gets = count_gets(store)
    again = catalog.scan(db, store, P)
    assert gets == [victim.object_key]  # validated again, and only it
    row = image_rows(db, object_key=victim.object_key)[0]
    assert (row["status"], row["reject_reason"]) == ("ok", None)
    assert again["dataset_version"] == first["dataset_version"]


def test_new_validation_limits_judge_every_catalogued_object_again(db, store):
    put_tree(store, base_tree())
    small = catalog.scan(db, store, P, max_object_bytes=64)  # every PNG here is bigger
    assert small["ok"] == 0 and small["reasons"] == {catalog.REJECT_TOO_LARGE: 11}

    gets = count_gets(store)
    raised = catalog.scan(db, store, P, max_object_bytes=10**6)
    assert raised["ok"] == 11 and len(gets) == 11
    assert raised["dataset_version"] != small["dataset_version"]

    gets.clear()
    stricter = catalog.scan(db, store, P, min_side=17)  # the 16x16 PNGs are now too small
    assert stricter["reasons"] == {catalog.REJECT_TOO_SMALL: 11} and len(gets) == 11
    gets.clear()
    catalog.scan(db, store, P, val_percent=20)  # not a validation limit: no GET
    assert gets == []


def test_a_label_folder_ending_in_a_space_is_ignored_with_its_reason(db, store):
    # MySQL compares `cat ` and `cat` equal (PAD SPACE): two classes would collide in its keys.
    equal = db.query("SELECT CAST('cat' AS CHAR) COLLATE utf8mb4_bin = 'cat ' AS same")
    assert equal[0]["same"] == 1
    put_tree(store, base_tree() | {"train/Gold Fish /x.png": png(70)})
    summary = catalog.scan(db, store, P)
    assert summary["ignored_reasons"] == {catalog.IGNORED_LABEL_TRAILING_SPACE: 1}
    assert sorted(summary["label_map"]) == ["Gold Fish", "Ünï 猫"]
