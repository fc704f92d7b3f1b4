"""The pure steps `catalog.scan` is composed of: listing, diff, deletion guard, rows to write,
dataset version, scan configuration, reject reasons, and the decode check at scan time."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from PIL import Image

from pipeline import catalog
from pipeline.errors import Refusal
from pipeline.store import ObjectInfo

NOW = datetime(2026, 12, 1, tzinfo=UTC)
P = "ds"


def obj(rel: str, etag: str = "e", size: int = 10) -> ObjectInfo:
    return ObjectInfo(f"{P}/{rel}", size, etag)


def row(rel: str, *, etag: str = "e", size: int = 10, deleted: bool = False, **values) -> dict:
    """A catalog row as `_load_rows` returns it, for the object `obj(rel, etag, size)`."""
    parsed = catalog.parse_key(f"{P}/{rel}", P)
    base = {
        "id": 1,
        "bucket": "b",
        "prefix": P,
        "object_key": f"{P}/{rel}",
        "key_hash": catalog._key_hash(f"{P}/{rel}"),
        "split": parsed.split,
        "subset": parsed.split,
        "label": parsed.label,
        "size_bytes": size,
        "etag": etag,
        "content_sha256": "a" * 64,
        "width": 16,
        "height": 16,
        "format": "PNG",
        "mode": "RGB",
        "status": "ok",
        "reject_reason": None,
        "reject_detail": None,
        "first_seen_at": NOW,
        "last_seen_at": NOW,
        "deleted_at": NOW if deleted else None,
    }
    return base | values


def rows_of(*rows: dict) -> dict[str, dict]:
    return {r["object_key"]: r for r in rows}


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_read_listing_places_objects_and_counts_ignored_keys():
    listing = catalog.read_listing(
        [obj("train/a/1.png"), obj("val/a/2.png"), obj("inbox/3.png"), obj("train/x.png")], P
    )
    assert listing.n_listed == 4
    assert sorted(listing.objects) == [f"{P}/inbox/3.png", f"{P}/train/a/1.png", f"{P}/val/a/2.png"]
    assert listing.ignored == {catalog.IGNORED_NO_LABEL: 1}
    assert listing.ignored_examples[catalog.IGNORED_NO_LABEL] == [f"{P}/train/x.png"]
    assert listing.has_val_split
    assert not catalog.read_listing([obj("train/a/1.png")], P).has_val_split


K = f"{P}/train/a/1.png"


@pytest.mark.parametrize(
    ("listed", "rows", "expected"),
    [
        pytest.param([obj("train/a/1.png")], [], {"new": [K]}, id="new"),
        pytest.param(
            [obj("train/a/1.png")], [row("train/a/1.png")], {"unchanged": 1}, id="unchanged"
        ),
        pytest.param(
            [obj("train/a/1.png", etag="f")],
            [row("train/a/1.png")],
            {"changed": [K]},
            id="etag-changed",
        ),
        pytest.param(
            [obj("train/a/1.png", size=11)],
            [row("train/a/1.png")],
            {"changed": [K]},
            id="size-changed",
        ),
        pytest.param(
            [obj("train/a/1.png")],
            [row("train/a/1.png", deleted=True)],
            {"revived": [K], "unchanged": 1},
            id="revived",
        ),
        pytest.param([], [row("train/a/1.png")], {"deleted": [K]}, id="deleted"),
        pytest.param([], [row("train/a/1.png", deleted=True)], {}, id="stays-deleted"),
    ],
)
def test_diff_listing(listed, rows, expected):
    diff = catalog.diff_listing(catalog.read_listing(listed, P), rows_of(*rows))
    empty = {"new": [], "changed": [], "revived": [], "deleted": [], "unchanged": 0}
    assert {name: getattr(diff, name) for name in empty} == empty | expected


@pytest.mark.parametrize(
    ("n_live", "n_deleted", "fraction", "refused"),
    [
        pytest.param(10, 5, 0.5, False, id="half-is-allowed"),
        pytest.param(10, 6, 0.5, True, id="more-than-half"),
        pytest.param(10, 10, 0.5, True, id="empty-listing"),
        pytest.param(10, 10, 1.0, False, id="fraction-1-allows-all"),
        pytest.param(10, 0, 0.0, False, id="nothing-deleted"),
        pytest.param(1, 1, 0.5, True, id="last-image"),
    ],
)
def test_check_deletions(n_live, n_deleted, fraction, refused):
    rows = rows_of(*(row(f"train/a/{i}.png") for i in range(n_live)))
    listed = [obj(f"train/a/{i}.png") for i in range(n_deleted, n_live)]
    diff = catalog.diff_listing(catalog.read_listing(listed, P), rows)
    if refused:
        with pytest.raises(Refusal, match=rf"s3://b/ds would mark {n_deleted} of {n_live} "):
            catalog.check_deletions(diff, rows, max_delete_fraction=fraction, where="s3://b/ds")
    else:
        catalog.check_deletions(diff, rows, max_delete_fraction=fraction, where="s3://b/ds")


def test_rows_to_write_skips_unchanged_rows_and_stamps_the_others():
    rows = rows_of(row("train/a/1.png"), row("train/a/2.png"), row("train/a/3.png"))
    stored = {k: catalog._row_state(r) for k, r in rows.items()}
    later = datetime(2026, 12, 2, tzinfo=UTC)
    assert len(catalog.rows_to_write(rows, stored, list(rows), set(), later)) == 0
    rows[f"{P}/train/a/2.png"]["status"] = "rejected"
    rows[f"{P}/train/a/3.png"]["subset"] = "val"
    rows[f"{P}/train/a/1.png"]["width"] = 99  # not state: only a validation writes it
    writes = catalog.rows_to_write(rows, stored, list(rows), {f"{P}/train/a/3.png"}, later)
    assert [r["object_key"] for r, _ in writes.updates] == [f"{P}/train/a/2.png"]
    assert [r["object_key"] for r in writes.upserts] == [f"{P}/train/a/3.png"]
    assert writes.updates[0][0]["last_seen_at"] == later
    assert rows[f"{P}/train/a/1.png"]["last_seen_at"] == NOW


def test_apply_object_keeps_first_seen_and_fills_inspection():
    rows = rows_of(row("train/a/1.png", status="rejected", reject_reason="x"))
    parsed = catalog.parse_key(f"{P}/train/a/1.png", P)
    catalog.apply_object(
        rows,
        parsed,
        obj("train/a/1.png", etag="f"),
        catalog.Inspection("ok", None, "b" * 64, 8, 9, "PNG", "L"),
        bucket="b",
        prefix=P,
        subset="val",
        now=datetime(2027, 1, 1, tzinfo=UTC),
    )
    r = rows[f"{P}/train/a/1.png"]
    assert (r["etag"], r["subset"], r["status"], r["reject_reason"]) == ("f", "val", "ok", None)
    assert (r["width"], r["height"], r["mode"], r["first_seen_at"]) == (8, 9, "L", NOW)


def _members(*specs: tuple[str, str]) -> list[dict]:
    return [row(f"{subset}/{label}/{i}.png") for i, (subset, label) in enumerate(specs)]


@pytest.mark.parametrize(
    ("policy", "counts", "excluded"),
    [
        pytest.param(
            "refuse",
            {"train": {"a": 3, "b": 1}, "test": {"b": 1}},
            {},
            id="refuse-keeps-the-label",
        ),
        pytest.param(
            "exclude",
            {"train": {"a": 3}},
            {"b": 1},
            id="exclude-drops-every-subset",
        ),
    ],
)
def test_build_dataset_version_small_label_policy(policy, counts, excluded):
    rows = _members(("train", "a"), ("train", "a"), ("train", "a"), ("train", "b"), ("test", "b"))
    config = catalog.ScanConfig(small_label_policy=policy, min_images_per_label=2)
    version = catalog.build_dataset_version("b", rows, config)
    assert version.counts == counts and version.excluded_labels == excluded
    assert version.label_map == {label: i for i, label in enumerate(sorted(counts["train"]))}


def test_build_dataset_version_ignores_rejected_deleted_and_inbox_rows():
    rows = [
        row("train/a/1.png"),
        row("train/a/2.png", status="rejected", reject_reason="x"),
        row("train/a/3.png", deleted=True),
        row("inbox/4.png", subset="inbox"),
    ]
    version = catalog.build_dataset_version("b", rows, catalog.ScanConfig())
    assert [r["object_key"] for r in version.members] == [f"{P}/train/a/1.png"]
    same = catalog.build_dataset_version("b", rows[:1], catalog.ScanConfig())
    assert version.dataset_version == same.dataset_version


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        pytest.param({"val_percent": 101}, "val_percent must be 0-100", id="val"),
        pytest.param({"leakage_policy": "drop"}, "expected one of: reject, keep", id="policy"),
        pytest.param({"small_label_policy": "x"}, "expected one of: refuse, exclude", id="small"),
        pytest.param({"min_side": 0}, "min_side must be at least 1", id="min-side"),
    ],
)
def test_scan_config_refuses_bad_values(overrides, error):
    with pytest.raises(Refusal, match=error):
        catalog.ScanConfig().overridden(overrides)


def test_scan_config_overrides_and_round_trips():
    stored = catalog.ScanConfig(val_percent=20)
    config = stored.overridden({"val_percent": None, "leakage_policy": "keep"})
    assert (config.val_percent, config.leakage_policy) == (20, "keep")
    assert catalog.ScanConfig.from_dict({**config.__dict__, "retired_option": 1}) == config
    with pytest.raises(TypeError, match="unknown scan option"):
        stored.overridden({"workers": 3})


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        pytest.param(
            "decode_failed: image file is truncated",
            ("decode_failed", "image file is truncated"),
            id="detail",
        ),
        pytest.param("missing_object", ("missing_object", None), id="code-only"),
        pytest.param("changed_object: a: b", ("changed_object", "a: b"), id="colon-in-detail"),
    ],
)
def test_split_reason(reason, expected):
    assert catalog.split_reason(reason) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(jpeg()[:-400], catalog.REJECT_UNDECODABLE, id="truncated-jpeg"),
        pytest.param(png()[:-30], catalog.REJECT_CORRUPT, id="truncated-png-fails-verify"),
        pytest.param(jpeg(), None, id="good-jpeg"),
        pytest.param(png(), None, id="good-png"),
    ],
)
def test_inspect_image_decodes_complete_objects(data, reason):
    result = catalog.inspect_image(data, size=len(data), complete=True)
    assert result.reject_reason == reason
    # Both say what is wrong: the decoder's message, or the PNG chunk that is cut short.
    assert (result.reject_detail is not None) == (reason is not None)
    # A header prefix alone is never decoded: its verdict waits for the whole object.
    assert catalog.inspect_image(data[:200], size=len(data), complete=False).reject_reason in (
        None,
        catalog.REJECT_CORRUPT,
    )


def _previous(listing: catalog.Listing, config: catalog.ScanConfig, mark: str) -> dict:
    return {"listing_digest": listing.digest, "catalog_mark": mark, **config.__dict__}


@pytest.mark.parametrize(
    ("now_listed", "config", "mark", "unchanged"),
    [
        pytest.param([obj("train/a/1.png")], catalog.ScanConfig(), "1:t", True, id="same"),
        pytest.param(
            [obj("train/a/1.png"), obj("train/x.png")],
            catalog.ScanConfig(),
            "1:t",
            True,
            id="a-new-ignored-key",
        ),
        pytest.param([obj("train/a/1.png", "f")], catalog.ScanConfig(), "1:t", False, id="etag"),
        pytest.param([obj("train/a/1.png", size=9)], catalog.ScanConfig(), "1:t", False, id="size"),
        pytest.param([obj("train/a/2.png")], catalog.ScanConfig(), "1:t", False, id="renamed"),
        pytest.param([], catalog.ScanConfig(), "1:t", False, id="deleted"),
        pytest.param(
            [obj("train/a/1.png")], catalog.ScanConfig(val_percent=20), "1:t", False, id="config"
        ),
        pytest.param([obj("train/a/1.png")], catalog.ScanConfig(), "1:u", False, id="row-changed"),
    ],
)
def test_is_unchanged(now_listed, config, mark, unchanged):
    before = catalog.read_listing([obj("train/a/1.png")], P)
    previous = _previous(before, catalog.ScanConfig(), "1:t")
    now = catalog.read_listing(now_listed, P)
    assert catalog.is_unchanged(previous, now, config, mark) is unchanged


def test_unchanged_summary_keeps_the_version_and_recounts_the_listing():
    listing = catalog.read_listing([obj("train/a/1.png"), obj("train/x.png")], P)
    previous = {"dataset_version": "v1", "counts": {"train": {"a": 1}}, "new": 1, "gets": 1}
    summary = catalog.unchanged_summary(previous, listing)
    assert (summary["dataset_version"], summary["counts"]) == ("v1", {"train": {"a": 1}})
    assert (summary["new"], summary["gets"], summary["unchanged"], summary["listed"]) == (
        0,
        0,
        1,
        2,
    )
    assert summary["ignored_reasons"] == {catalog.IGNORED_NO_LABEL: 1}
    assert (summary["changed"], summary["new_version"]) == (False, False)


def test_check_unreadable_refuses_mass_access_denials_but_not_archived_objects():
    def unreadable(rel: str, code: str) -> dict:
        return row(
            rel,
            status="rejected",
            reject_reason=catalog.REJECT_UNREADABLE,
            reject_detail=f"{code}: S3 refused to let the pipeline's credentials read it",
        )

    ok = row("train/a/0.png")
    archived = [unreadable(f"train/a/{i}.png", "InvalidObjectState") for i in range(1, 4)]
    rows = rows_of(ok, *archived)
    catalog.check_unreadable(rows, set(rows), max_fraction=0.5, where="s3://b/ds")

    denied = [unreadable(f"train/b/{i}.png", "AccessDenied") for i in range(3)]
    rows = rows_of(ok, *denied)
    with pytest.raises(Refusal, match=r"S3 refused to read 3 of the 4 objects .*AccessDenied"):
        catalog.check_unreadable(rows, set(rows), max_fraction=0.5, where="s3://b/ds")
    # Under the fraction they are quarantined: no refusal.
    rows = rows_of(ok, row("train/a/1.png"), row("train/a/2.png"), denied[0])
    catalog.check_unreadable(rows, set(rows), max_fraction=0.5, where="s3://b/ds")


def test_exclude_drops_a_label_with_no_train_image_and_keeps_a_test_only_label():
    """A small label whose only images were carved into val (or are under val/ alone) has no
    train image: `exclude` drops it too. A label only in test stays, an unseen label."""
    rows = _members(("train", "a"), ("train", "a"), ("val", "a"), ("val", "fox"), ("test", "owl"))
    config = catalog.ScanConfig(small_label_policy="exclude", min_images_per_label=2)
    version = catalog.build_dataset_version("b", rows, config)
    assert version.excluded_labels == {"fox": 0}
    assert version.counts == {"train": {"a": 2}, "val": {"a": 1}, "test": {"owl": 1}}


def test_the_training_fingerprint_sees_train_and_val_only():
    base = _members(("train", "a"), ("train", "b"), ("val", "a"), ("test", "b"))
    more_test = [*base, row("test/a/9.png")]
    moved_to_val = [*base[:1], {**base[1], "subset": "val"}, *base[2:]]
    config = catalog.ScanConfig()
    one, two, three = (
        catalog.build_dataset_version("b", r, config) for r in (base, more_test, moved_to_val)
    )
    assert one.dataset_version != two.dataset_version
    assert one.training_fingerprint == two.training_fingerprint
    assert three.training_fingerprint != one.training_fingerprint
