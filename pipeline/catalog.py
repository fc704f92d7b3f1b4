"""Catalog stage: scan `<prefix>/<split>/<label>/<file>` in S3 into MySQL, validate, version datasets.

Choices (see also docs/design.md):

- Only new or changed objects (ETag or size differs from the catalog) are fetched. A rescan of an
  unchanged bucket is LIST-only: zero GETs.
- Content fingerprint: `content_sha256` is the sha256 of the full bytes, fetched once per new or
  changed object when it is at most `full_fetch_max_bytes` (default 8 MiB; typical images are far
  smaller, and one full GET then serves both the header check and the hash). Larger objects get a
  range GET of the first `header_bytes` only and no fingerprint, so they are not checked for
  duplicates. ETags are not used as content hashes: multipart uploads make them non-MD5.
- Accepted formats: what torchvision's `ImageFolder` reads (JPEG, PNG, PPM/PGM/PBM, BMP, TIFF,
  WEBP) plus GIF (its first frame) (`ALLOWED_FORMATS`). Magic bytes decide, not the extension.
- Label conflict (same bytes under two labels): policy `reject` rejects every copy (no copy is
  known to be right). Leakage (same bytes in train/val and test): policy `reject` rejects the test
  copy, keeping training data intact and the test set unseen. `keep` reports only. Default: reject.
- Validation split: without a `val/` split, a train image is carved into `val` when
  sha256(key relative to the prefix) mod 100 < val_percent: stable across machines and runs.
- Dataset version: sha256 over the sorted (key, ETag, subset, label) of accepted train/val/test
  images (inbox excluded, so new inbox images never trigger a retrain), first 20 hex chars.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.db import Database, utc_now
from pipeline.records import ImageRecord
from pipeline.store import ObjectInfo, ObjectStore, add_location_arguments, location_from_args

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INBOX = "inbox"
SUBSETS = ("train", "val", "test", "inbox")
LABELLED_SUBSETS = ("train", "val", "test")
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
POLICIES = ("reject", "keep")
HIDDEN_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir", "$RECYCLE.BIN"})
DATASET_VERSION_CHARS = 20
MAX_LABEL_CHARS = 255

# Reasons a key is ignored (it does not fit the layout): counted and reported, never stored.
IGNORED_FOLDER_MARKER = "folder_marker"
IGNORED_BAD_SEGMENT = "bad_path_segment"
IGNORED_HIDDEN = "hidden"
IGNORED_NO_LABEL = "file_directly_under_split"
IGNORED_TOO_DEEP = "nested_too_deep"
IGNORED_UNKNOWN_SPLIT = "unknown_split"
IGNORED_OUTSIDE_LAYOUT = "file_directly_under_prefix"
IGNORED_LABEL_TOO_LONG = "label_too_long"

# Reasons an image is rejected (stored in images.reject_reason).
REJECT_ZERO_BYTES = "zero_bytes"
REJECT_NOT_AN_IMAGE = "not_an_image"
REJECT_CORRUPT = "corrupt_header"
REJECT_UNSUPPORTED = "unsupported_format"
REJECT_TOO_MANY_PIXELS = "too_many_pixels"
REJECT_TOO_SMALL = "too_small"
REJECT_LABEL_CONFLICT = "label_conflict"
REJECT_LEAKAGE = "leakage"
CROSS_REASONS = (REJECT_LABEL_CONFLICT, REJECT_LEAKAGE)

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
    # Netpbm (Pillow names them all PPM): P1-P3 plain, P4-P6 binary; a whitespace follows.
    *((f"P{n}".encode() + ws, 0, "PPM") for n in range(1, 7) for ws in (b"\n", b" ", b"\r", b"\t")),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypavif", 4, "AVIF"),
)

_BATCH = 500
_COLUMNS = (
    "bucket",
    "prefix",
    "object_key",
    "key_hash",
    "split",
    "subset",
    "label",
    "size_bytes",
    "etag",
    "content_sha256",
    "width",
    "height",
    "format",
    "mode",
    "status",
    "reject_reason",
    "first_seen_at",
    "last_seen_at",
    "deleted_at",
)
_UPSERT = (
    f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))})"
    " ON DUPLICATE KEY UPDATE "
    + ", ".join(
        f"{c} = VALUES({c})" for c in _COLUMNS if c not in ("bucket", "key_hash", "first_seen_at")
    )
)


class ScanLockTimeout(RuntimeError):
    """Another scan of the same bucket and prefix held the lock for too long."""


@dataclass(frozen=True)
class ParsedKey:
    """Where a listed key sits in the layout."""

    key: str
    relative_key: str
    split: str
    label: str | None


@dataclass(frozen=True)
class IgnoredKey:
    """A listed key that does not fit the layout, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class Inspection:
    """What validating one object's bytes found."""

    status: str
    reject_reason: str | None = None
    content_sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None


def normalize_prefix(prefix: str) -> str:
    """The prefix without leading/trailing slashes ('' for the bucket root)."""
    return prefix.strip("/")


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part in HIDDEN_NAMES


def parse_key(key: str, prefix: str) -> ParsedKey | IgnoredKey:
    """Place `key` in the layout `<prefix>/<split>/<label>/<file>` or `<prefix>/inbox/<file>`.

    Labels are folder names exactly as written (spaces, unicode, case).
    """
    norm = normalize_prefix(prefix)
    start = f"{norm}/" if norm else ""
    if not key.startswith(start):
        return IgnoredKey(key, IGNORED_OUTSIDE_LAYOUT)
    rel = key[len(start) :]
    if rel.endswith("/") or rel == "":
        return IgnoredKey(key, IGNORED_FOLDER_MARKER)
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return IgnoredKey(key, IGNORED_BAD_SEGMENT)
    if any(_is_hidden(p) for p in parts):
        return IgnoredKey(key, IGNORED_HIDDEN)
    head = parts[0]
    if len(parts) == 1:
        return IgnoredKey(key, IGNORED_OUTSIDE_LAYOUT)
    if head == INBOX:
        if len(parts) != 2:
            return IgnoredKey(key, IGNORED_TOO_DEEP)
        return ParsedKey(key, rel, INBOX, None)
    if head not in SPLITS:
        return IgnoredKey(key, IGNORED_UNKNOWN_SPLIT)
    if len(parts) == 2:
        return IgnoredKey(key, IGNORED_NO_LABEL)
    if len(parts) > 3:
        return IgnoredKey(key, IGNORED_TOO_DEEP)
    if len(parts[1]) > MAX_LABEL_CHARS:
        return IgnoredKey(key, IGNORED_LABEL_TOO_LONG)
    return ParsedKey(key, rel, head, parts[1])


def val_bucket(relative_key: str) -> int:
    """A stable number 0..99 for a key (sha256, so the same on every machine)."""
    digest = hashlib.sha256(relative_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def carve_subset(relative_key: str, split: str, *, val_percent: int, has_val_split: bool) -> str:
    """The effective subset: train images are carved into val when there is no `val/` split."""
    if not 0 <= val_percent <= 100:
        raise ValueError(f"val_percent must be 0-100, got {val_percent}")
    if split == "train" and not has_val_split and val_bucket(relative_key) < val_percent:
        return "val"
    return split


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes, or None when they name none we know."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if name == "WEBP" and data[:4] != b"RIFF":
                continue
            return name
    return None


def inspect_image(
    data: bytes,
    *,
    size: int,
    complete: bool,
    max_pixels: int = 50_000_000,
    min_side: int = 8,
) -> Inspection:
    """Validate an object from its bytes (all of them when `complete`, else a header prefix).

    Only the header is parsed (PIL's lazy `Image.open`), never the pixels, so a
    decompression bomb costs nothing. Complete PNGs are also checked with `verify()`.
    """
    from PIL import Image, UnidentifiedImageError

    sha = hashlib.sha256(data).hexdigest() if complete else None
    if size == 0:
        return Inspection("rejected", REJECT_ZERO_BYTES, sha)
    kind = sniff_format(data)
    if kind is None:
        return Inspection("rejected", REJECT_NOT_AN_IMAGE, sha)
    if kind not in ALLOWED_FORMATS:
        return Inspection("rejected", REJECT_UNSUPPORTED, sha, format=kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as im:
                width, height = im.size
                mode, fmt = im.mode, im.format or kind
                if width * height > max_pixels:
                    return Inspection(
                        "rejected", REJECT_TOO_MANY_PIXELS, sha, width, height, fmt, mode
                    )
                if complete and fmt == "PNG":
                    im.verify()
    except Image.DecompressionBombError:
        return Inspection("rejected", REJECT_TOO_MANY_PIXELS, sha, format=kind)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError):
        return Inspection("rejected", REJECT_CORRUPT, sha, format=kind)
    if min(width, height) < min_side:
        return Inspection("rejected", REJECT_TOO_SMALL, sha, width, height, fmt, mode)
    return Inspection("ok", None, sha, width, height, fmt, mode)


def dataset_fingerprint(bucket: str, members: Iterable[tuple[str, str, str, str]]) -> str:
    """Stable version id over sorted (key, etag, subset, label) of accepted labelled images."""
    h = hashlib.sha256(f"bucket\t{bucket}\n".encode())
    for key, etag, subset, label in sorted(members):
        h.update(f"{key}\t{etag}\t{subset}\t{label}\n".encode())
    return h.hexdigest()[:DATASET_VERSION_CHARS]


def build_label_map(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Labels the model learns (those in train, plus a carved val) sorted → indices."""
    labels = set(counts.get("train", {})) | (
        set(counts.get("val", {})) & set(counts.get("train", {}))
    )
    return {label: i for i, label in enumerate(sorted(labels))}


def unseen_labels(counts: dict[str, dict[str, int]]) -> list[str]:
    """Labels in val or test that train does not have (the model could never predict them)."""
    train = set(counts.get("train", {}))
    return sorted((set(counts.get("val", {})) | set(counts.get("test", {}))) - train)


def check_dataset(
    info: dict[str, Any], *, min_images_per_label: int = 5, allow_unseen_labels: bool = False
) -> list[str]:
    """Problems that make a dataset version untrainable (empty list: fine)."""
    counts = info.get("counts") or {}
    train = counts.get("train", {})
    problems = []
    if not train:
        problems.append("no accepted train images")
    elif len(train) < 2:
        problems.append(f"need at least 2 labels in train, found {sorted(train)}")
    few = sorted(f"{label!r} ({n})" for label, n in train.items() if n < min_images_per_label)
    if few:
        problems.append(
            f"labels with fewer than {min_images_per_label} train images: {', '.join(few)}"
        )
    unseen = unseen_labels(counts)
    if unseen and not allow_unseen_labels:
        problems.append(
            f"labels in val/test but not in train: {unseen} (set allow_unseen_labels to accept)"
        )
    return problems


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _lock_name(db: Database, bucket: str, prefix: str) -> str:
    # MySQL lock names are at most 64 characters.
    digest = hashlib.sha256(f"{db.name}\0{bucket}\0{prefix}".encode()).hexdigest()[:40]
    return f"imgpipe_scan_{digest}"


class _NamedLock:
    """A MySQL named lock held on its own connection for the duration of a `with` block."""

    def __init__(self, db: Database, name: str, timeout_s: int, what: str) -> None:
        self.db, self.name, self.timeout_s, self.what = db, name, timeout_s, what
        self.conn: Any = None

    def __enter__(self) -> _NamedLock:
        self.conn = self.db.connect(autocommit=True)
        with self.conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, %s)", (self.name, self.timeout_s))
            got = cur.fetchone()[0]
        if got != 1:
            self.conn.close()
            raise ScanLockTimeout(
                f"another scan of {self.what} held the lock {self.name!r} for more than "
                f"{self.timeout_s}s; wait for it to finish or raise lock_timeout_s"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT RELEASE_LOCK(%s)", (self.name,))
        finally:
            self.conn.close()


def _fetch_and_inspect(
    store: ObjectStore,
    obj: ObjectInfo,
    *,
    max_pixels: int,
    min_side: int,
    header_bytes: int,
    full_fetch_max_bytes: int,
) -> tuple[Inspection | None, int]:
    """Inspect one object; returns (inspection or None if it vanished, GETs issued)."""
    from botocore.exceptions import ClientError

    if obj.size == 0:
        return inspect_image(b"", size=0, complete=True), 0
    gets = 0
    try:
        if obj.size <= full_fetch_max_bytes:
            gets += 1
            data = store.get_bytes(obj.key)
            return inspect_image(
                data, size=obj.size, complete=True, max_pixels=max_pixels, min_side=min_side
            ), gets
        gets += 1
        head = store.get_bytes(obj.key, byte_range=(0, header_bytes - 1))
        result = inspect_image(
            head, size=obj.size, complete=False, max_pixels=max_pixels, min_side=min_side
        )
        if result.reject_reason == REJECT_CORRUPT:
            # The header may lie beyond the first bytes (e.g. a large EXIF block): read it all.
            gets += 1
            data = store.get_bytes(obj.key)
            result = inspect_image(
                data, size=obj.size, complete=True, max_pixels=max_pixels, min_side=min_side
            )
        return result, gets
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            log.warning("object %s vanished during the scan; next scan will catch up", obj.key)
            return None, gets
        raise


def _cross_checks(
    rows: dict[str, dict[str, Any]], *, leakage_policy: str, label_conflict_policy: str
) -> dict[str, Any]:
    """Recompute label-conflict and leakage rejections over live rows, in place; returns a report.

    Only rows whose own validation passed take part; rejections for other reasons
    (including `mark_rejected` after a failed decode) are never undone here.
    """
    candidates = [
        r
        for r in rows.values()
        if r["deleted_at"] is None
        and r["subset"] in LABELLED_SUBSETS
        and r["content_sha256"]
        and (r["status"] == "ok" or r["reject_reason"] in CROSS_REASONS)
    ]
    for r in candidates:
        r["status"], r["reject_reason"] = "ok", None
    by_sha: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in candidates:
        by_sha[r["content_sha256"]].append(r)
    conflicts, leaks = [], []
    for group in by_sha.values():
        if len(group) < 2:
            continue
        if len({r["label"] for r in group}) > 1:
            conflicts.append(sorted(r["object_key"] for r in group))
            if label_conflict_policy == "reject":
                for r in group:
                    r["status"], r["reject_reason"] = "rejected", REJECT_LABEL_CONFLICT
        alive = [r for r in group if r["status"] == "ok"]
        train_side = [r for r in alive if r["subset"] in ("train", "val")]
        test_side = [r for r in alive if r["subset"] == "test"]
        if train_side and test_side:
            leaks.append(sorted(r["object_key"] for r in train_side + test_side))
            if leakage_policy == "reject":
                for r in test_side:
                    r["status"], r["reject_reason"] = "rejected", REJECT_LEAKAGE
    return {
        "label_conflicts": len(conflicts),
        "label_conflict_examples": conflicts[:5],
        "leakage": len(leaks),
        "leakage_examples": leaks[:5],
    }


def _row_values(r: dict[str, Any]) -> tuple:
    return tuple(r[c] for c in _COLUMNS)


def _load_rows(db: Database, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    rows = db.query(
        f"SELECT id, {', '.join(_COLUMNS)} FROM images WHERE bucket = %s AND prefix = %s",
        (bucket, prefix),
    )
    return {r["object_key"]: r for r in rows}


def _validate_policy(name: str, value: str) -> None:
    if value not in POLICIES:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(POLICIES)}")


def scan(
    db: Database,
    store: ObjectStore,
    prefix: str,
    *,
    val_percent: int = 10,
    max_pixels: int = 50_000_000,
    min_side: int = 8,
    leakage_policy: str = "reject",
    label_conflict_policy: str = "reject",
    workers: int = 16,
    header_bytes: int = 64 * 1024,
    full_fetch_max_bytes: int = 8 * 1024 * 1024,
    lock_timeout_s: int = 600,
) -> dict[str, Any]:
    """Catalog `s3://<bucket>/<prefix>/` into MySQL and record the dataset version.

    New objects are inserted, changed ones (ETag or size) re-validated, vanished ones get
    `deleted_at` (history stays), reappearing ones are revived. Unchanged objects cost no GET.
    The read-validate-write phase runs under a MySQL named lock on bucket+prefix.

    Returns a JSON-able summary (see the module docstring for the choices it embodies).
    """
    _validate_policy("leakage_policy", leakage_policy)
    _validate_policy("label_conflict_policy", label_conflict_policy)
    if not 0 <= val_percent <= 100:
        raise ValueError(f"val_percent must be 0-100, got {val_percent}")
    prefix = normalize_prefix(prefix)
    bucket = store.bucket
    where = f"s3://{bucket}/{prefix}"
    started = utc_now()
    t0 = time.monotonic()

    listed: dict[str, tuple[ParsedKey, ObjectInfo]] = {}
    ignored: Counter[str] = Counter()
    ignored_examples: dict[str, list[str]] = defaultdict(list)
    n_listed = 0
    for obj in store.iter_objects(f"{prefix}/" if prefix else ""):
        n_listed += 1
        parsed = parse_key(obj.key, prefix)
        if isinstance(parsed, IgnoredKey):
            ignored[parsed.reason] += 1
            if len(ignored_examples[parsed.reason]) < 3:
                ignored_examples[parsed.reason].append(obj.key)
            continue
        listed[obj.key] = (parsed, obj)
    log.info("listed %d objects under %s in %.1fs", n_listed, where, time.monotonic() - t0)
    has_val_split = any(p.split == "val" for p, _ in listed.values())

    with _NamedLock(db, _lock_name(db, bucket, prefix), lock_timeout_s, where):
        rows = _load_rows(db, bucket, prefix)
        before = {k: dict(r) for k, r in rows.items()}
        new_keys, changed_keys, revived = [], [], 0
        for key, (_, obj) in listed.items():
            old = rows.get(key)
            if old is None:
                new_keys.append(key)
            elif old["etag"] != obj.etag or int(old["size_bytes"]) != obj.size:
                changed_keys.append(key)
            elif old["deleted_at"] is not None:
                revived += 1

        to_fetch = new_keys + changed_keys
        inspections: dict[str, Inspection | None] = {}
        gets = 0
        if to_fetch:
            t1 = time.monotonic()
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                results = pool.map(
                    lambda k: _fetch_and_inspect(
                        store,
                        listed[k][1],
                        max_pixels=max_pixels,
                        min_side=min_side,
                        header_bytes=header_bytes,
                        full_fetch_max_bytes=full_fetch_max_bytes,
                    ),
                    to_fetch,
                )
                for k, (inspection, n_gets) in zip(to_fetch, results, strict=True):
                    inspections[k], gets = inspection, gets + n_gets
            elapsed = time.monotonic() - t1
            log.info(
                "validated %d new/changed objects in %.1fs (%.0f/s, %d GETs)",
                len(to_fetch),
                elapsed,
                len(to_fetch) / max(elapsed, 1e-9),
                gets,
            )

        now = utc_now()
        for key, (parsed, obj) in listed.items():
            inspection = inspections.get(key, "unchanged")
            if inspection is None:
                continue  # vanished between LIST and GET
            subset = carve_subset(
                parsed.relative_key,
                parsed.split,
                val_percent=val_percent,
                has_val_split=has_val_split,
            )
            row = rows.get(key)
            if row is None:
                row = rows[key] = {"id": None, "first_seen_at": now}
            row.update(
                bucket=bucket,
                prefix=prefix,
                object_key=key,
                key_hash=_key_hash(key),
                split=parsed.split,
                subset=subset,
                label=parsed.label,
                size_bytes=obj.size,
                etag=obj.etag,
                last_seen_at=now,
                deleted_at=None,
            )
            if isinstance(inspection, Inspection):
                row.update(
                    status=inspection.status,
                    reject_reason=inspection.reject_reason,
                    content_sha256=inspection.content_sha256,
                    width=inspection.width,
                    height=inspection.height,
                    format=inspection.format,
                    mode=inspection.mode,
                )
        deleted_keys = [
            k for k, r in rows.items() if k not in listed and r["deleted_at"] is None and r["id"]
        ]
        for k in deleted_keys:
            rows[k]["deleted_at"] = now

        cross = _cross_checks(
            rows, leakage_policy=leakage_policy, label_conflict_policy=label_conflict_policy
        )

        tracked = ("subset", "label", "split", "status", "reject_reason", "deleted_at")
        to_write = [
            r
            for k, r in rows.items()
            if k in listed
            and (
                k not in before
                or k in inspections
                or any(before[k][c] != r[c] for c in tracked if c != "deleted_at")
                or before[k]["deleted_at"] is not None
            )
        ]

        live = [r for r in rows.values() if r["deleted_at"] is None]
        members = [r for r in live if r["status"] == "ok" and r["subset"] in LABELLED_SUBSETS]
        dataset_version = dataset_fingerprint(
            bucket, ((r["object_key"], r["etag"], r["subset"], r["label"]) for r in members)
        )
        counts: dict[str, dict[str, int]] = {}
        for r in members:
            counts.setdefault(r["subset"], {}).setdefault(r["label"], 0)
            counts[r["subset"]][r["label"]] += 1
        counts = {s: dict(sorted(counts[s].items())) for s in LABELLED_SUBSETS if s in counts}
        n_inbox = sum(1 for r in live if r["status"] == "ok" and r["subset"] == INBOX)
        reasons = Counter(r["reject_reason"] for r in live if r["status"] != "ok")
        label_map = build_label_map(counts)

        with db.transaction() as cur:
            for i in range(0, len(to_write), _BATCH):
                cur.executemany(_UPSERT, [_row_values(r) for r in to_write[i : i + _BATCH]])
            for i in range(0, len(deleted_keys), _BATCH):
                ids = [rows[k]["id"] for k in deleted_keys[i : i + _BATCH]]
                cur.execute(
                    f"UPDATE images SET deleted_at = %s WHERE id IN ({', '.join(['%s'] * len(ids))})",
                    (now, *ids),
                )
            cur.execute(
                "UPDATE images SET last_seen_at = %s"
                " WHERE bucket = %s AND prefix = %s AND deleted_at IS NULL",
                (now, bucket, prefix),
            )
            cur.execute(
                "SELECT dataset_version FROM scans WHERE bucket = %s AND prefix = %s"
                " ORDER BY id DESC LIMIT 1",
                (bucket, prefix),
            )
            previous = cur.fetchone()
            cur.execute(
                "SELECT 1 FROM dataset_versions WHERE dataset_version = %s", (dataset_version,)
            )
            version_is_new = cur.fetchone() is None
            if version_is_new:
                cur.execute(
                    "INSERT INTO dataset_versions (dataset_version, bucket, prefix, n_images,"
                    " counts, label_map, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        dataset_version,
                        bucket,
                        prefix,
                        len(members),
                        json.dumps(counts, ensure_ascii=False),
                        json.dumps(label_map, ensure_ascii=False),
                        now,
                    ),
                )
                cur.execute(
                    "SELECT id, object_key FROM images WHERE bucket = %s AND prefix = %s"
                    " AND deleted_at IS NULL AND status = 'ok' AND subset IN ('train','val','test')",
                    (bucket, prefix),
                )
                ids = {key: image_id for image_id, key in cur.fetchall()}
                membership = [
                    (dataset_version, ids[r["object_key"]], r["subset"], r["label"], r["etag"])
                    for r in members
                ]
                for i in range(0, len(membership), _BATCH):
                    cur.executemany(
                        "INSERT INTO dataset_version_images"
                        " (dataset_version, image_id, subset, label, etag)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        membership[i : i + _BATCH],
                    )
            summary: dict[str, Any] = {
                "bucket": bucket,
                "prefix": prefix,
                "dataset_version": dataset_version,
                "changed": previous is None or previous[0] != dataset_version,
                "new_version": version_is_new,
                "listed": n_listed,
                "new": len(new_keys),
                "changed_objects": len(changed_keys),
                "unchanged": len(listed) - len(new_keys) - len(changed_keys),
                "revived": revived,
                "deleted": len(deleted_keys),
                "ok": sum(1 for r in live if r["status"] == "ok"),
                "rejected": sum(1 for r in live if r["status"] != "ok"),
                "ignored": sum(ignored.values()),
                "reasons": dict(sorted(reasons.items())),
                "ignored_reasons": dict(sorted(ignored.items())),
                "ignored_examples": dict(ignored_examples),
                "counts": counts,
                "inbox": n_inbox,
                "label_map": label_map,
                "unseen_labels": unseen_labels(counts),
                "gets": gets,
                "leakage_policy": leakage_policy,
                "label_conflict_policy": label_conflict_policy,
                "val_percent": val_percent,
                "has_val_split": has_val_split,
                **cross,
                "seconds": round(time.monotonic() - t0, 3),
            }
            cur.execute(
                "INSERT INTO scans (bucket, prefix, started_at, finished_at, dataset_version,"
                " listed, new_objects, changed_objects, deleted_objects, ok, rejected, ignored,"
                " gets, summary) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    bucket,
                    prefix,
                    started,
                    utc_now(),
                    dataset_version,
                    n_listed,
                    len(new_keys),
                    len(changed_keys),
                    len(deleted_keys),
                    summary["ok"],
                    summary["rejected"],
                    summary["ignored"],
                    gets,
                    json.dumps(summary, ensure_ascii=False, default=str),
                ),
            )
    log.info(
        "scan of %s: dataset %s (changed=%s), %d listed, %d new, %d changed, %d deleted,"
        " %d rejected, %d ignored, %d GETs, %.1fs",
        where,
        dataset_version,
        summary["changed"],
        n_listed,
        len(new_keys),
        len(changed_keys),
        len(deleted_keys),
        summary["rejected"],
        summary["ignored"],
        gets,
        summary["seconds"],
    )
    if summary["unseen_labels"]:
        log.warning("labels in val/test but not in train: %s", summary["unseen_labels"])
    return summary


def _dataset_row(row: dict[str, Any]) -> dict[str, Any]:
    created = row["created_at"]
    return {
        "dataset_version": row["dataset_version"],
        "bucket": row["bucket"],
        "prefix": row["prefix"],
        "n_images": int(row["n_images"]),
        "counts": json.loads(row["counts"]),
        "label_map": json.loads(row["label_map"]),
        "created_at": created.isoformat() if hasattr(created, "isoformat") else str(created),
    }


def latest_dataset(db: Database, bucket: str, prefix: str) -> dict[str, Any] | None:
    """The dataset version the most recent scan of bucket+prefix produced, or None."""
    rows = db.query(
        "SELECT d.* FROM scans s JOIN dataset_versions d ON d.dataset_version = s.dataset_version"
        " WHERE s.bucket = %s AND s.prefix = %s ORDER BY s.id DESC LIMIT 1",
        (bucket, normalize_prefix(prefix)),
    )
    return _dataset_row(rows[0]) if rows else None


def resolve_dataset(
    db: Database, bucket: str, prefix: str, dataset_version: str | None = None
) -> dict[str, Any]:
    """`dataset_version`'s dataset, or else the latest scan's of bucket+prefix.

    LookupError (naming what to run) for an unknown version or a never-scanned prefix.
    """
    if dataset_version:
        return get_dataset(db, dataset_version)
    latest = latest_dataset(db, bucket, prefix)
    if latest is None:
        raise LookupError(
            f"s3://{bucket}/{normalize_prefix(prefix)} was never scanned: "
            "run `python -m pipeline scan` (or the DAG's scan_images) first"
        )
    return latest


def get_dataset(db: Database, dataset_version: str) -> dict[str, Any]:
    """One dataset version's label map, counts, bucket and prefix; LookupError if unknown."""
    rows = db.query("SELECT * FROM dataset_versions WHERE dataset_version = %s", (dataset_version,))
    if not rows:
        raise LookupError(f"unknown dataset_version {dataset_version!r}: no scan produced it")
    return _dataset_row(rows[0])


def dataset_images(db: Database, dataset_version: str, subsets: Sequence[str]) -> list[ImageRecord]:
    """The members of a dataset version in `subsets`, ordered by key.

    Images rejected since (e.g. by `mark_rejected` after a failed decode), deleted, or
    changed (ETag differs from the one versioned) drop out.
    """
    get_dataset(db, dataset_version)
    bad = [s for s in subsets if s not in LABELLED_SUBSETS]
    if bad:
        raise ValueError(f"unknown subsets {bad}; expected some of: {', '.join(LABELLED_SUBSETS)}")
    if not subsets:
        return []
    sql, args = membership_query(dataset_version, subsets)
    rows = db.query(sql + " ORDER BY i.object_key", args)
    return [
        ImageRecord(int(r["id"]), r["bucket"], r["object_key"], r["etag"], r["subset"], r["label"])
        for r in rows
    ]


def membership_query(dataset_version: str, subsets: Sequence[str]) -> tuple[str, tuple]:
    """SQL (columns id, bucket, object_key, etag, subset, label; `i` = images) and its args for
    the usable members of a dataset version in `subsets`: accepted, live, and unchanged since."""
    return (
        "SELECT i.id, i.bucket, i.object_key, m.etag, m.subset, m.label"
        " FROM dataset_version_images m JOIN images i ON i.id = m.image_id"
        " WHERE m.dataset_version = %s AND i.status = 'ok' AND i.deleted_at IS NULL"
        f" AND i.etag = m.etag AND m.subset IN ({', '.join(['%s'] * len(subsets))})",
        (dataset_version, *subsets),
    )


def inbox_images(db: Database, bucket: str, prefix: str) -> list[ImageRecord]:
    """Accepted, live unlabelled images under `<prefix>/inbox/` (label None), ordered by key."""
    rows = db.query(
        "SELECT id, bucket, object_key, etag, subset FROM images WHERE bucket = %s"
        " AND prefix = %s AND subset = 'inbox' AND status = 'ok' AND deleted_at IS NULL"
        " ORDER BY object_key",
        (bucket, normalize_prefix(prefix)),
    )
    return [
        ImageRecord(int(r["id"]), r["bucket"], r["object_key"], r["etag"], r["subset"], None)
        for r in rows
    ]


def mark_rejected(db: Database, rejections: Sequence[tuple[int, str]]) -> int:
    """Reject images found damaged later (e.g. a truncated JPEG at decode); returns rows changed.

    Later scans keep them rejected until their ETag changes (then they are re-validated).
    """
    items = [(reason[:255], int(image_id)) for image_id, reason in rejections]
    if not items:
        return 0
    changed = 0
    with db.transaction() as cur:
        for i in range(0, len(items), _BATCH):
            batch = items[i : i + _BATCH]
            cur.execute(
                "UPDATE images SET status = 'rejected', reject_reason = CASE id "
                + " ".join("WHEN %s THEN %s" for _ in batch)
                + f" END WHERE id IN ({', '.join(['%s'] * len(batch))})",
                (
                    *[v for reason, image_id in batch for v in (image_id, reason)],
                    *[image_id for _, image_id in batch],
                ),
            )
            changed += cur.rowcount
    log.info("marked %d images rejected", changed)
    return changed


# ----------------------------------------------------------------------------- CLI


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    """`migrate` takes no arguments."""


def cli_migrate(args: argparse.Namespace, settings: Any) -> int:
    from pipeline.db import migrate

    applied = migrate(Database(settings.mysql))
    print(f"applied migrations: {applied}" if applied else "schema is up to date")
    return 0


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_arguments(parser)
    parser.add_argument("--val-percent", type=int, default=10, help="percent of train carved")
    parser.add_argument("--leakage-policy", choices=POLICIES, default="reject")
    parser.add_argument("--label-conflict-policy", choices=POLICIES, default="reject")
    parser.add_argument("--max-pixels", type=int, default=50_000_000)
    parser.add_argument("--min-side", type=int, default=8)
    parser.add_argument("--workers", type=int, default=16)


def cli_scan(args: argparse.Namespace, settings: Any) -> int:
    db = Database(settings.mysql)
    store, prefix = location_from_args(settings, args)
    s = scan(
        db,
        store,
        prefix,
        val_percent=args.val_percent,
        max_pixels=args.max_pixels,
        min_side=args.min_side,
        leakage_policy=args.leakage_policy,
        label_conflict_policy=args.label_conflict_policy,
        workers=args.workers,
    )
    print(f"s3://{s['bucket']}/{s['prefix']}")
    print(f"dataset_version  {s['dataset_version']}  (changed: {s['changed']})")
    for name in ("listed", "new", "changed_objects", "unchanged", "deleted", "ok", "rejected"):
        print(f"{name:<16} {s[name]:>8}")
    print(f"{'ignored':<16} {s['ignored']:>8}")
    print(f"{'GETs':<16} {s['gets']:>8}")
    for title, table in (("rejected", s["reasons"]), ("ignored", s["ignored_reasons"])):
        for reason, n in table.items():
            print(f"  {title}: {reason:<28} {n:>6}")
    labels = sorted({label for per in s["counts"].values() for label in per})
    subsets = list(s["counts"])
    print(f"\n{'label':<24}" + "".join(f"{sub:>8}" for sub in subsets))
    for label in labels:
        print(f"{label:<24}" + "".join(f"{s['counts'][sub].get(label, 0):>8}" for sub in subsets))
    print(f"{'inbox':<24}{s['inbox']:>8}")
    if s["unseen_labels"]:
        print(f"\nlabels in val/test but not in train: {s['unseen_labels']}")
    if s["leakage"] or s["label_conflicts"]:
        print(f"\nleakage groups: {s['leakage']}, label conflicts: {s['label_conflicts']}")
    return 0
