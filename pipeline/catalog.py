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
import operator
import time
import unicodedata
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from functools import cached_property
from itertools import islice
from typing import Any

from pipeline.config import pause_point
from pipeline.db import Database, HeldLock, insert_rows, named_lock, utc_now
from pipeline.errors import (
    S3_ACCESS_DENIED_CODES,
    S3_CHANGED_CODES,
    S3_MISSING_CODES,
    S3_UNREADABLE_CODES,
    Refusal,
    is_out_of_memory,
    is_transient,
    s3_error_code,
    s3_unavailable,
)
from pipeline.params import SMALL_LABEL_POLICIES
from pipeline.records import ImageRecord
from pipeline.store import ObjectInfo, ObjectStore, add_location_arguments, location_from_args

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INBOX = "inbox"
SUBSETS = ("train", "val", "test", "inbox")
LABELLED_SUBSETS = ("train", "val", "test")
TRAINING_SUBSETS = ("train", "val")  # what a model is fitted and validated on
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
# MySQL compares labels PAD SPACE (utf8mb4_bin too): `cat ` would be a second class equal to `cat`.
IGNORED_LABEL_TRAILING_SPACE = "label_ends_with_space"
# Newlines, tabs and other control characters, and the bidirectional overrides that make a
# name read otherwise than it is: a label is shown in pages, logs and a reviewer's question.
IGNORED_LABEL_CONTROL_CHARACTER = "label_has_control_character"
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

# Reasons an image is rejected: short codes in images.reject_reason (what went wrong in words,
# e.g. the decoder's message, goes to images.reject_detail).
REJECT_ZERO_BYTES = "zero_bytes"
REJECT_NOT_AN_IMAGE = "not_an_image"
REJECT_CORRUPT = "corrupt_header"
REJECT_UNDECODABLE = "decode_failed"
REJECT_TOO_LARGE = "too_large"
REJECT_UNSUPPORTED = "unsupported_format"
REJECT_TOO_MANY_PIXELS = "too_many_pixels"
REJECT_TOO_SMALL = "too_small"
REJECT_LABEL_CONFLICT = "label_conflict"
REJECT_LEAKAGE = "leakage"
# Found by a GET after the scan (training, scoring): the object was gone, or not the catalogued
# version. They say where the object was, not what it is: a scan that lists it again with the
# catalogued ETag validates it again instead of keeping the rejection.
REJECT_MISSING_OBJECT = "missing_object"
REJECT_CHANGED_OBJECT = "changed_object"
# Found by the scan: S3 refused the GET (AccessDenied on some keys, an archived object). Also
# about where the object is, not what it is: every later scan tries it again.
REJECT_UNREADABLE = "unreadable"
_OBJECT_STATE_REJECTIONS = (REJECT_MISSING_OBJECT, REJECT_CHANGED_OBJECT, REJECT_UNREADABLE)
CROSS_REASONS = (REJECT_LABEL_CONFLICT, REJECT_LEAKAGE)
# A fault test's pause after each committed chunk of validated objects (unset in deployments).
PAUSE_AFTER_CHUNK_ENV = "PIPELINE_TEST_PAUSE_AFTER_SCAN_CHUNK_S"

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
# Objects one GET task fetches and validates in turn (see `_in_order`).
_GET_BATCH = 8
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
    "reject_detail",
    "validated_under",
    "first_seen_at",
    "last_seen_at",
    "deleted_at",
)
# The upsert on the natural key (bucket, key_hash), sent by `insert_rows`.
_UPSERT_HEAD = f"INSERT INTO images ({', '.join(_COLUMNS)})"
_UPSERT_TAIL = " ON DUPLICATE KEY UPDATE " + ", ".join(
    f"{c} = VALUES({c})" for c in _COLUMNS if c not in ("bucket", "key_hash", "first_seen_at")
)
_row_values = operator.itemgetter(*_COLUMNS)


# What a scan reads of every catalogued row: enough to diff a listing and version a dataset.
_LOADED_COLUMNS = (
    "object_key",
    "size_bytes",
    "etag",
    "content_sha256",
    "split",
    "subset",
    "label",
    "status",
    "reject_reason",
    "validated_under",
    "deleted_at",
)
# What a scan may change in a row whose object did not change; a row whose state is unchanged
# is never rewritten.
_STATE_COLUMNS = ("split", "subset", "label", "status", "reject_reason", "deleted_at")
# A state update applies only to a row still as the scan read it: a rejection written meanwhile
# (`mark_rejected` by training or scoring) is not overwritten with a verdict made before it.
_UPDATE_STATE = (
    f"UPDATE images SET {', '.join(f'{c} = %s' for c in _STATE_COLUMNS)}, last_seen_at = %s"
    " WHERE id = %s AND status = %s AND reject_reason <=> %s"
)
_STATUS, _REASON = _STATE_COLUMNS.index("status"), _STATE_COLUMNS.index("reject_reason")


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
    reject_detail: str | None = None


def normalize_prefix(prefix: str) -> str:
    """The prefix without leading/trailing slashes ('' for the bucket root).

    Raises:
        ValueError: white space at either end: MySQL compares `data ` equal to `data`, so
            the two prefixes' catalogs would be one.
    """
    norm = prefix.strip("/")
    if norm != norm.strip():
        raise ValueError(f"prefix {prefix!r} begins or ends with white space; rename it")
    return norm


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part in HIDDEN_NAMES


def parse_key(key: str, prefix: str) -> ParsedKey | IgnoredKey:
    """Place `key` in the layout `<prefix>/<split>/<label>/<file>` or `<prefix>/inbox/<file>`.

    Labels are folder names exactly as written (spaces, unicode, case), but for a trailing
    space (MySQL's comparisons ignore it) and control characters (newlines, bidirectional
    overrides): such a folder is ignored with its reason.
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
    if parts[1].endswith(" "):
        return IgnoredKey(key, IGNORED_LABEL_TRAILING_SPACE)
    if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in parts[1]):
        return IgnoredKey(key, IGNORED_LABEL_CONTROL_CHARACTER)
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

    The header is parsed first (the format's own Pillow plugin, lazily), so a decompression
    bomb is refused before any pixel is decoded. Complete objects are then checked (a PNG's
    chunk checksums) and decoded (JPEGs at 1/8 scale, which is cheap) from the same parse, so a
    truncated or corrupt image is rejected here, not found by training later.
    """
    sha = hashlib.sha256(data).hexdigest() if complete else None
    if size == 0:
        return Inspection("rejected", REJECT_ZERO_BYTES, sha)
    kind = sniff_format(data)
    if kind is None:
        return Inspection("rejected", REJECT_NOT_AN_IMAGE, sha)
    if kind not in ALLOWED_FORMATS:
        return Inspection("rejected", REJECT_UNSUPPORTED, sha, format=kind)
    try:
        im = open_image(data, kind)
    except Exception as exc:  # noqa: BLE001 - a header no plugin can parse is corrupt, whatever
        if is_out_of_memory(exc):  # the error, but for running out of memory
            raise
        detail = f"{kind} header does not parse: {type(exc).__name__}: {exc}"[:1024]
        return Inspection("rejected", REJECT_CORRUPT, sha, format=kind, reject_detail=detail)
    with im:
        (width, height), mode, fmt = im.size, im.mode, im.format or kind
        if width * height > min(max_pixels, _decoder_pixel_limit()):
            return Inspection("rejected", REJECT_TOO_MANY_PIXELS, sha, width, height, fmt, mode)
        damage = png_chunk_error(data) if complete and kind == "PNG" else None
        if damage:
            return Inspection("rejected", REJECT_CORRUPT, sha, width, height, fmt, mode, damage)
        if min(width, height) < min_side:
            return Inspection("rejected", REJECT_TOO_SMALL, sha, width, height, fmt, mode)
        error = _decode_error(im, kind) if complete else None
    if error:
        return Inspection("rejected", REJECT_UNDECODABLE, sha, width, height, fmt, mode, error)
    return Inspection("ok", None, sha, width, height, fmt, mode)


def open_image(data: bytes, kind: str) -> Any:
    """A lazy Pillow image of `data` through the plugin of `kind` (as sniffed) alone.

    Unlike `Image.open`, no other plugin is tried and no decompression-bomb warning is issued
    (a process-wide warning filter is not thread-safe): the caller checks the size itself.
    """
    from PIL import Image

    Image.init()
    factory, _accept = Image.OPEN[kind]
    return factory(io.BytesIO(data))


def _decoder_pixel_limit() -> float:
    """Pixels beyond which Pillow's `Image.open` refuses an image (training decodes with it)."""
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else float("inf")


def png_chunk_error(data: bytes) -> str | None:
    """None when every chunk of a whole PNG up to IEND is complete and matches its CRC, else
    what is wrong: what Pillow's `verify` checks (decoding skips the image data's checksums)."""
    view, pos, end = memoryview(data), 8, len(data)
    while pos + 8 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        name = bytes(view[pos + 4 : pos + 8])
        if name == b"IEND":
            return None
        stop = pos + 8 + length
        if stop + 4 > end:
            return f"PNG chunk {name!r} at byte {pos} runs past the end ({end} bytes)"
        if zlib.crc32(view[pos + 4 : stop]) != int.from_bytes(view[stop : stop + 4], "big"):
            return f"PNG chunk {name!r} at byte {pos} fails its CRC"
        pos = stop + 4
    return f"PNG ends without an IEND chunk ({end} bytes)"


def _decode_error(im: Any, kind: str) -> str | None:
    """None when the opened image `im` decodes (a JPEG, MPO included, at 1/8 scale), else the
    decoder's message."""
    try:
        if kind == "JPEG":
            im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    except Exception as exc:  # noqa: BLE001 - every decoder failure means: not decodable
        if is_out_of_memory(exc):
            raise  # the scan's fault, not the image's: it fails and is retried
        return f"{type(exc).__name__}: {exc}"[:1024]
    return None


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
    info: dict[str, Any],
    *,
    min_images_per_label: int | None = None,
    allow_unseen_labels: bool = False,
) -> list[str]:
    """Problems that make a dataset version untrainable (empty list: fine).

    `min_images_per_label` defaults to the one the scan that made the version used."""
    if min_images_per_label is None:
        min_images_per_label = ScanConfig.from_dict(
            info.get("scan_config") or {}
        ).min_images_per_label
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
            " (add images, remove the folders, or set small_label_policy to exclude)"
        )
    unseen = unseen_labels(counts)
    if unseen and not allow_unseen_labels:
        problems.append(
            f"labels in val/test but not in train: {unseen} (set allow_unseen_labels to accept)"
        )
    look_alike = look_alike_labels({label for subset in counts.values() for label in subset})
    if look_alike:
        pairs = "; ".join(" and ".join(ascii(label) for label in group) for group in look_alike)
        problems.append(
            f"labels that differ only in Unicode normalization: {pairs} (one class in two"
            " folders, e.g. 'café' typed on two systems): rename the folders to one"
        )
    return problems


def look_alike_labels(labels: Iterable[str]) -> list[list[str]]:
    """Groups of two or more labels that are one text in two Unicode forms (NFC): they look
    the same. Case is not folded: `A` and `a` may well be two classes (letters)."""
    groups: dict[str, list[str]] = {}
    for label in sorted(labels):
        groups.setdefault(unicodedata.normalize("NFC", label), []).append(label)
    return [group for group in groups.values() if len(group) > 1]


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def scan_lock(bucket: str, prefix: str) -> str:
    """The name of the MySQL named lock that serialises the scans of bucket+prefix."""
    return f"scan\0{bucket}\0{normalize_prefix(prefix)}"


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


@dataclass(frozen=True)
class ScanConfig:
    """What turns a listing into a dataset version; stored per bucket+prefix and with every
    dataset version, so every scan of the prefix (both DAGs, the CLI) carves and rejects alike."""

    val_percent: int = 10
    leakage_policy: str = "reject"
    label_conflict_policy: str = "reject"
    max_pixels: int = 50_000_000
    min_side: int = 8
    max_object_bytes: int = 256 * 1024 * 1024
    small_label_policy: str = "refuse"
    min_images_per_label: int = 5

    def __post_init__(self) -> None:
        for name in ("leakage_policy", "label_conflict_policy"):
            _check_choice(name, getattr(self, name), POLICIES)
        _check_choice("small_label_policy", self.small_label_policy, SMALL_LABEL_POLICIES)
        if not 0 <= self.val_percent <= 100:
            raise Refusal(f"val_percent must be 0-100, got {self.val_percent}")
        for name in ("max_pixels", "min_side", "max_object_bytes", "min_images_per_label"):
            if getattr(self, name) < 1:
                raise Refusal(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScanConfig:
        """A config from stored JSON (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def limits_key(self) -> str:
        """Names the validation limits: objects validated under configs with equal keys get
        equal verdicts (policies and the val split are applied afresh by every scan). Kept per
        row (`images.validated_under`)."""
        limits = f"{self.max_pixels}:{self.min_side}:{self.max_object_bytes}"
        return hashlib.sha256(limits.encode()).hexdigest()[:16]

    def overridden(self, overrides: dict[str, Any]) -> ScanConfig:
        """This config with `overrides` (None values keep the current value)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown scan option(s) {unknown}; expected some of: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise Refusal(f"unknown {name} {value!r}; expected one of: {', '.join(allowed)}")


@dataclass
class Listing:
    """A LIST of the prefix placed in the layout."""

    objects: dict[str, tuple[ParsedKey, ObjectInfo]]
    n_listed: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    ignored_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @cached_property
    def has_val_split(self) -> bool:
        return any(p.split == "val" for p, _ in self.objects.values())

    @cached_property
    def digest(self) -> str:
        """sha256 over the placed objects' sorted (key, ETag, size): equal listings, equal digests."""
        h = hashlib.sha256()
        for key in sorted(self.objects):
            obj = self.objects[key][1]
            h.update(f"{key}\0{obj.etag}\0{obj.size}\n".encode())
        return h.hexdigest()


def read_listing(objects: Iterable[ObjectInfo], prefix: str) -> Listing:
    """Place every listed object in the layout; ignored keys are counted with examples."""
    listing = Listing({})
    for obj in objects:
        listing.n_listed += 1
        parsed = parse_key(obj.key, prefix)
        if isinstance(parsed, IgnoredKey):
            listing.ignored[parsed.reason] += 1
            if len(listing.ignored_examples[parsed.reason]) < 3:
                listing.ignored_examples[parsed.reason].append(obj.key)
            continue
        listing.objects[obj.key] = (parsed, obj)
    return listing


@dataclass(frozen=True)
class Diff:
    """What a listing changes in the catalog of its prefix (keys)."""

    new: list[str]
    changed: list[str]
    revived: list[str]
    deleted: list[str]
    unchanged: int

    @property
    def to_fetch(self) -> list[str]:
        return self.new + self.changed


def diff_listing(
    listing: Listing,
    rows: dict[str, dict[str, Any]],
    *,
    limits: str | None = None,
    stored_limits: str | None = None,
) -> Diff:
    """New (not catalogued), changed (ETag or size differs, rejected as missing or changed at a
    later GET, or validated under other limits than `limits`: validated again), revived
    (deleted, back unchanged) and deleted (live, not listed) keys. A row without its own
    `validated_under` was validated under `stored_limits` (the prefix's stored config)."""
    new, changed, revived = [], [], []
    for key, (_, obj) in listing.objects.items():
        old = rows.get(key)
        if old is None:
            new.append(key)
        elif (
            limits is not None
            and (old.get("validated_under") or stored_limits) != limits
            or old["etag"] != obj.etag
            or int(old["size_bytes"]) != obj.size
            or old["reject_reason"] in _OBJECT_STATE_REJECTIONS
        ):
            changed.append(key)
        elif old["deleted_at"] is not None:
            revived.append(key)
    deleted = [k for k, r in rows.items() if k not in listing.objects and r["deleted_at"] is None]
    unchanged = len(listing.objects) - len(new) - len(changed)
    return Diff(new, changed, revived, deleted, unchanged)


def check_deletions(
    diff: Diff, rows: dict[str, dict[str, Any]], *, max_delete_fraction: float, where: str
) -> None:
    """Refuse a scan that would mark more than `max_delete_fraction` of the live catalog deleted:
    an empty listing or a wrong prefix looks exactly like a mass deletion."""
    live = sum(1 for r in rows.values() if r["deleted_at"] is None)
    if diff.deleted and len(diff.deleted) > max_delete_fraction * live:
        raise Refusal(
            f"scan of {where} would mark {len(diff.deleted)} of {live} catalogued images deleted"
            f" (more than max_delete_fraction {max_delete_fraction:g}); nothing was changed."
            " Check the bucket and prefix; if the objects really were removed, rerun with"
            " force_delete (CLI: --force-delete)"
        )


def check_unreadable(
    rows: dict[str, dict[str, Any]], inspected: set[str], *, max_fraction: float, where: str
) -> None:
    """Refuse a scan in which S3 denied access to more than `max_fraction` of the live catalog:
    that is credentials or a policy missing read access, not objects to quarantine. Fewer are
    rejected `unreadable`, written with the scan's result (never chunk by chunk), and tried
    again by every later scan. Archived objects (`InvalidObjectState`) never count: a lifecycle
    rule archiving most of a prefix would otherwise block its scans for good."""

    def s3_code(row: dict[str, Any]) -> str:  # `_fetch_and_inspect` writes "<code>: ..."
        return (row["reject_detail"] or "").split(":")[0]

    denied = sorted(
        k
        for k in inspected
        if rows[k]["reject_reason"] == REJECT_UNREADABLE
        and s3_code(rows[k]) in S3_ACCESS_DENIED_CODES
    )
    live = sum(1 for r in rows.values() if r["deleted_at"] is None)
    if denied and len(denied) > max_fraction * live:
        raise Refusal(
            f"S3 refused to read {len(denied)} of the {live} objects under {where}"
            f" ({s3_code(rows[denied[0]])}, e.g. {denied[0]!r});"
            " nothing was quarantined. Check that the pipeline's S3 credentials may read"
            " (s3:GetObject) every object under the prefix"
        )


def apply_object(
    rows: dict[str, dict[str, Any]],
    parsed: ParsedKey,
    obj: ObjectInfo,
    inspection: Inspection | None,
    *,
    bucket: str,
    prefix: str,
    subset: str,
    now: datetime,
    validated_under: str | None = None,
) -> None:
    """Bring the catalog row of a listed object up to date (validation results when inspected,
    made under the limits `validated_under` names: `ScanConfig.limits_key`).

    Without an inspection only the state columns change (the object itself did not).
    """
    row = rows.get(obj.key)
    if row is not None and inspection is None:
        row["split"], row["subset"], row["label"] = parsed.split, subset, parsed.label
        row["deleted_at"] = None
        return
    if row is None:
        row = rows[obj.key] = {"id": None}
    row.setdefault("first_seen_at", now)  # an existing row keeps its own (see _UPSERT_TAIL)
    row.update(
        bucket=bucket,
        prefix=prefix,
        object_key=obj.key,
        key_hash=_key_hash(obj.key),
        split=parsed.split,
        subset=subset,
        label=parsed.label,
        size_bytes=obj.size,
        etag=obj.etag,
        deleted_at=None,
    )
    if inspection is not None:
        row.update(
            status=inspection.status,
            reject_reason=inspection.reject_reason,
            reject_detail=inspection.reject_detail,
            content_sha256=inspection.content_sha256,
            width=inspection.width,
            height=inspection.height,
            format=inspection.format,
            mode=inspection.mode,
            validated_under=validated_under,
        )


_row_state = operator.itemgetter(*_STATE_COLUMNS)


@dataclass
class RowWrites:
    """Catalog rows to write: whole rows of objects validated now, state updates of the others
    (each with the state the scan read, which the update requires)."""

    upserts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[tuple[dict[str, Any], tuple]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.updates)


def rows_to_write(
    rows: dict[str, dict[str, Any]],
    stored: dict[str, tuple],
    keys: Iterable[str],
    inspected: set[str],
    now: datetime,
) -> RowWrites:
    """The rows among `keys` whose state differs from `stored` (what MySQL holds), stamped `now`.

    Rows of `inspected` objects are written whole; the others only change their state columns.
    An unchanged row is never written: a rescan of an unchanged bucket writes no image row.
    """
    out = RowWrites()
    for key in keys:
        row = rows[key]
        if stored.get(key) != _row_state(row):
            row["last_seen_at"] = now
            if key in inspected:
                out.upserts.append(row)
            else:
                out.updates.append((row, stored[key]))
    return out


def write_rows(cur: Any, writes: RowWrites) -> int:
    """Execute `writes` (upserts on the natural key (bucket, key_hash), updates by id); returns
    how many updates were left out because their row changed since the scan read it."""
    for i in range(0, len(writes.upserts), _BATCH):
        rows = map(_row_values, writes.upserts[i : i + _BATCH])
        insert_rows(cur, _UPSERT_HEAD, rows, _UPSERT_TAIL)
    if writes.updates:
        updated = cur.executemany(
            _UPDATE_STATE,
            [
                (*_row_state(r), r["last_seen_at"], r["id"], read[_STATUS], read[_REASON])
                for r, read in writes.updates
            ],
        )
        if updated < len(writes.updates):
            log.warning(
                "%d catalog rows changed since this scan read them (rejected meanwhile):"
                " left as they are; the next scan takes them as they are now",
                len(writes.updates) - updated,
            )
        return len(writes.updates) - updated
    return 0


@dataclass(frozen=True)
class DatasetVersion:
    """The accepted labelled members of a catalog and what they add up to."""

    dataset_version: str
    members: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]
    label_map: dict[str, int]
    excluded_labels: dict[str, int]
    training_fingerprint: str  # of the train and val members: what a model trains on


def build_dataset_version(
    bucket: str, rows: Iterable[dict[str, Any]], config: ScanConfig
) -> DatasetVersion:
    """Members, counts, label map and version id of the live catalog rows.

    With `small_label_policy="exclude"`, a label of train or val with fewer than
    `min_images_per_label` train images (none: all carved into val, or only under val/) is
    left out of the version (all its subsets); with `refuse` it stays, and training refuses
    the version (`check_dataset`). A label only in test stays: an unseen label.
    """
    members = [
        r
        for r in rows
        if r["deleted_at"] is None and r["status"] == "ok" and r["subset"] in LABELLED_SUBSETS
    ]
    excluded: dict[str, int] = {}
    if config.small_label_policy == "exclude":
        train = Counter(r["label"] for r in members if r["subset"] == "train")
        fitted = {r["label"] for r in members if r["subset"] in ("train", "val")}
        excluded = {
            label: train[label]
            for label in sorted(fitted)
            if train[label] < config.min_images_per_label
        }
        members = [r for r in members if r["label"] not in excluded]
    counts: dict[str, dict[str, int]] = {}
    for r in members:
        counts.setdefault(r["subset"], {}).setdefault(r["label"], 0)
        counts[r["subset"]][r["label"]] += 1
    counts = {s: dict(sorted(counts[s].items())) for s in LABELLED_SUBSETS if s in counts}
    keyed = [(r["object_key"], r["etag"], r["subset"], r["label"]) for r in members]
    return DatasetVersion(
        dataset_fingerprint(bucket, keyed),
        members,
        counts,
        build_label_map(counts),
        excluded,
        dataset_fingerprint(bucket, (m for m in keyed if m[2] in TRAINING_SUBSETS)),
    )


def training_fingerprint(db: Database, dataset_version: str) -> str:
    """The fingerprint of the version's train and val members (`DatasetVersion`); versions
    recorded before it was stored get it from their membership, once."""
    info = get_dataset(db, dataset_version)
    if info.get("training_fingerprint"):
        return info["training_fingerprint"]
    rows = db.query(
        "SELECT i.object_key, m.etag, m.subset, m.label FROM dataset_version_images m"
        " JOIN images i ON i.id = m.image_id WHERE m.dataset_version = %s"
        " AND m.subset IN ('train', 'val')",
        (dataset_version,),
    )
    fingerprint = dataset_fingerprint(
        info["bucket"], ((r["object_key"], r["etag"], r["subset"], r["label"]) for r in rows)
    )
    db.execute(
        "UPDATE dataset_versions SET training_fingerprint = %s WHERE dataset_version = %s",
        (fingerprint, dataset_version),
    )
    return fingerprint


def _fetch_and_inspect(
    store: ObjectStore,
    obj: ObjectInfo,
    config: ScanConfig,
    *,
    header_bytes: int,
    full_fetch_max_bytes: int,
) -> tuple[Inspection | None, int]:
    """Inspect one object; returns (inspection or None if it vanished, GETs issued).

    Objects read whole are decoded too (`inspect_image`), so the scan's verdict is final. A
    transient S3 error raises `ServiceUnavailable`: it never becomes a rejection. An object S3
    refuses to let these credentials read is `unreadable` (see `check_unreadable`).
    """
    if obj.size == 0:
        return inspect_image(b"", size=0, complete=True), 0
    if obj.size > config.max_object_bytes:
        return Inspection(
            "rejected",
            REJECT_TOO_LARGE,
            reject_detail=f"{obj.size} bytes > max_object_bytes {config.max_object_bytes}",
        ), 0
    limits = {"max_pixels": config.max_pixels, "min_side": config.min_side}
    # Every GET is of the listed version (If-Match) and reads at most its listed size: an object
    # replaced after the LIST (by a bigger one, say) is neither read nor judged by the old ETag.
    whole = {"byte_range": (0, obj.size - 1), "if_match": obj.etag}
    gets = 0
    try:
        if obj.size <= full_fetch_max_bytes:
            gets += 1
            data = store.get_bytes(obj.key, **whole)
            return inspect_image(data, size=obj.size, complete=True, **limits), gets
        gets += 1
        head = store.get_bytes(obj.key, byte_range=(0, header_bytes - 1), if_match=obj.etag)
        result = inspect_image(head, size=obj.size, complete=False, **limits)
        if result.reject_reason == REJECT_CORRUPT:
            # The header may lie beyond the first bytes (e.g. a large EXIF block): read it all
            # (bounded by max_object_bytes above).
            gets += 1
            data = store.get_bytes(obj.key, **whole)
            result = inspect_image(data, size=obj.size, complete=True, **limits)
        return result, gets
    except Exception as exc:
        code = s3_error_code(exc)
        if code in S3_MISSING_CODES or code in S3_CHANGED_CODES:
            what = "vanished" if code in S3_MISSING_CODES else "changed"
            log.warning("object %s %s during the scan; the next scan catches up", obj.key, what)
            return None, gets
        if code in S3_UNREADABLE_CODES:
            detail = f"{code}: S3 refused to let the pipeline's credentials read it"
            return Inspection("rejected", REJECT_UNREADABLE, reject_detail=detail), gets
        if is_transient(exc):
            raise s3_unavailable(exc, store.endpoint) from exc
        raise


def _in_order(
    pool: ThreadPoolExecutor,
    inspect,
    objects: Iterable[tuple[str, ObjectInfo]],
    depth: int,
    batch: int = _GET_BATCH,
):
    """(key, inspect(obj)) in order, computed on `pool` at most `depth` ahead of the caller.

    Each task inspects `batch` objects one after the other: a future per object costs more
    client CPU than the validation of a small image. An error is raised at its own key, after
    the results before it, as if each object were a task of its own.
    """
    pending: deque[tuple[list[str], Future]] = deque()
    ahead = 0
    objects = iter(objects)
    while True:
        group = list(islice(objects, batch))
        if group:
            keys = [key for key, _ in group]
            pending.append((keys, pool.submit(_inspect_all, inspect, [obj for _, obj in group])))
            ahead += len(keys)
        while pending and (ahead >= depth or not group):
            keys, future = pending.popleft()
            ahead -= len(keys)
            results, error = future.result()
            yield from zip(keys, results, strict=False)
            if error is not None:
                raise error
        if not group:
            return


def _inspect_all(inspect, objects: list[ObjectInfo]) -> tuple[list[Any], BaseException | None]:
    """inspect(obj) of each object in turn, up to the first error (returned, not raised)."""
    results = []
    for obj in objects:
        try:
            results.append(inspect(obj))
        except Exception as exc:  # noqa: BLE001 - raised again by the caller, at its key
            return results, exc
    return results, None


def inspect_objects(
    lock: HeldLock,
    store: ObjectStore,
    prefix: str,
    listing: Listing,
    rows: dict[str, dict[str, Any]],
    stored: dict[str, tuple],
    keys: Sequence[str],
    config: ScanConfig,
    *,
    pool: ThreadPoolExecutor,
    chunk_size: int,
    header_bytes: int,
    full_fetch_max_bytes: int,
) -> tuple[set[str], int]:
    """GET and validate `keys`, committing their rows chunk by chunk; returns (inspected, GETs).

    Each chunk is its own transaction, so a scan killed or timed out here keeps what it
    validated: the next scan finds those objects unchanged and GETs only the rest. The pool
    keeps validating up to one chunk ahead while a chunk is written. Chunks commit on the scan
    lock's connection, only while it holds the lock (`LockLost` else): a scan that lost it
    (another scan may hold it now) writes no more rows over that scan's.
    """
    inspected: set[str] = set()
    gets = 0
    if not keys:
        return inspected, gets
    t0 = time.monotonic()
    now = utc_now()
    results = _in_order(
        pool,
        _inspector(store, config, header_bytes, full_fetch_max_bytes),
        ((k, listing.objects[k][1]) for k in keys),
        # One chunk ahead: GETs go on while a chunk is written, and a killed scan loses at
        # most that much validated work.
        depth=2 * chunk_size,
    )
    for start in range(0, len(keys), chunk_size):
        done = []
        for _ in range(min(chunk_size, len(keys) - start)):
            key, (inspection, n_gets) = next(results)
            gets += n_gets
            if inspection is None:
                continue  # vanished between LIST and GET
            parsed, obj = listing.objects[key]
            subset = carve_subset(
                parsed.relative_key,
                parsed.split,
                val_percent=config.val_percent,
                has_val_split=listing.has_val_split,
            )
            apply_object(
                rows,
                parsed,
                obj,
                inspection,
                bucket=store.bucket,
                prefix=prefix,
                subset=subset,
                now=now,
                validated_under=config.limits_key(),
            )
            inspected.add(key)
            if inspection.reject_reason != REJECT_UNREADABLE:  # held for `check_unreadable`
                done.append(key)
        _commit_chunk(lock, rows, stored, done, now)
        elapsed = time.monotonic() - t0
        rate = len(inspected) / max(elapsed, 1e-9)
        log.info(
            "validated %d/%d new or changed objects (%.0f/s, ETA %.0fs, %d GETs)",
            len(inspected),
            len(keys),
            rate,
            (len(keys) - len(inspected)) / max(rate, 1e-9),
            gets,
        )
    return inspected, gets


def _commit_chunk(
    lock: HeldLock,
    rows: dict[str, dict[str, Any]],
    stored: dict[str, tuple],
    keys: Sequence[str],
    now: datetime,
) -> None:
    """Commit the rows of one chunk's `keys` as seen `now`, in one transaction on the scan
    lock's connection (`LockLost` once another scan may hold it)."""
    for key in keys:
        rows[key]["last_seen_at"] = now
    with lock.transaction() as cur:
        write_rows(cur, RowWrites(upserts=[rows[k] for k in keys]))
    stored.update((k, _row_state(rows[k])) for k in keys)
    pause_point(PAUSE_AFTER_CHUNK_ENV)


def _inspector(
    store: ObjectStore, config: ScanConfig, header_bytes: int, full_fetch_max_bytes: int
):
    """`_fetch_and_inspect` of one listed object with the scan's settings."""

    def inspect(obj: ObjectInfo) -> tuple[Inspection | None, int]:
        return _fetch_and_inspect(
            store,
            obj,
            config,
            header_bytes=header_bytes,
            full_fetch_max_bytes=full_fetch_max_bytes,
        )

    return inspect


def _load_rows(db: Database, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    # Only what the diff and the dataset version need: this query is most of what a rescan
    # of an unchanged bucket costs beyond its LIST.
    rows = db.query(
        f"SELECT id, {', '.join(_LOADED_COLUMNS)} FROM images WHERE bucket = %s AND prefix = %s",
        (bucket, prefix),
    )
    return {r["object_key"]: r for r in rows}


def min_images_per_label(db: Database, info: dict[str, Any], given: int | None) -> int:
    """`given`, or (None: the param left empty) the minimum the scans of the dataset version's
    bucket+prefix use now (a later scan may have raised it on an unchanged version)."""
    if given is not None:
        return given
    saved = load_scan_config(db, info["bucket"], info["prefix"]) or ScanConfig()
    return saved.min_images_per_label


def load_scan_config(db: Database, bucket: str, prefix: str) -> ScanConfig | None:
    """The configuration stored for bucket+prefix by its last scan, or None."""
    rows = db.query(
        "SELECT config FROM scan_configs WHERE bucket = %s AND prefix_hash = %s",
        (bucket, _key_hash(normalize_prefix(prefix))),
    )
    return ScanConfig.from_dict(json.loads(rows[0]["config"])) if rows else None


def scan(
    db: Database,
    store: ObjectStore,
    prefix: str,
    *,
    workers: int = 16,
    header_bytes: int = 64 * 1024,
    full_fetch_max_bytes: int = 8 * 1024 * 1024,
    lock_timeout_s: int = 600,
    chunk_size: int = 500,
    max_delete_fraction: float = 0.5,
    force_delete: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Catalog `s3://<bucket>/<prefix>/` into MySQL and record the dataset version.

    `options` are `ScanConfig` fields (`val_percent`, `leakage_policy`, ...); those not given
    (or None) come from the configuration stored by the prefix's last scan, else the defaults,
    and the result is stored again. New objects are inserted, changed ones (ETag or size)
    re-validated, vanished ones get `deleted_at` (history stays), reappearing ones are revived;
    unchanged objects cost no GET and no write. LIST, validation and writes run under a MySQL
    named lock on bucket+prefix; validated rows are committed every `chunk_size` objects.

    Returns a JSON-able summary (see the module docstring for the choices it embodies).
    """
    prefix = normalize_prefix(prefix)
    bucket = store.bucket
    where = f"s3://{bucket}/{prefix}"
    started, t0 = utc_now(), time.monotonic()
    ScanConfig().overridden(options)  # unknown or invalid options fail before any work
    with named_lock(
        db, scan_lock(bucket, prefix), timeout_s=lock_timeout_s, what=f"scan of {where}"
    ) as lock:
        stored_config = load_scan_config(db, bucket, prefix) or ScanConfig()
        config = stored_config.overridden(options)
        listing = read_listing(store.iter_objects(f"{prefix}/" if prefix else ""), prefix)
        log.info(
            "listed %d objects under %s in %.1fs", listing.n_listed, where, time.monotonic() - t0
        )
        previous = _latest_summary(db, bucket, prefix)
        if previous and is_unchanged(previous, listing, config, _catalog_mark(db, bucket, prefix)):
            return _record_unchanged(lock, where, previous, listing, started=started, t0=t0)
        rows = _load_rows(db, bucket, prefix)
        stored = {k: _row_state(r) for k, r in rows.items()}
        # Objects validated under other limits (max_pixels, min_side, max_object_bytes) than
        # this scan's are judged again, also after a scan with new limits that did not finish.
        diff = diff_listing(
            listing, rows, limits=config.limits_key(), stored_limits=stored_config.limits_key()
        )
        if not force_delete:
            check_deletions(diff, rows, max_delete_fraction=max_delete_fraction, where=where)
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="scan-get")
        try:
            inspected, gets = inspect_objects(
                lock,
                store,
                prefix,
                listing,
                rows,
                stored,
                diff.to_fetch,
                config,
                pool=pool,
                chunk_size=chunk_size,
                header_bytes=header_bytes,
                full_fetch_max_bytes=full_fetch_max_bytes,
            )
        finally:  # a failed scan leaves no GETs queued behind it
            pool.shutdown(wait=True, cancel_futures=True)
        check_unreadable(rows, inspected, max_fraction=max_delete_fraction, where=where)
        summary = record_changes(
            lock, bucket, prefix, listing, diff, rows, stored, inspected, gets, config, started, t0
        )
    summary["seconds"] = round(time.monotonic() - t0, 3)
    _log_scan(where, summary)
    return summary


def record_changes(
    lock: HeldLock,
    bucket: str,
    prefix: str,
    listing: Listing,
    diff: Diff,
    rows: dict[str, dict[str, Any]],
    stored: dict[str, tuple],
    inspected: set[str],
    gets: int,
    config: ScanConfig,
    started: datetime,
    t0: float,
) -> dict[str, Any]:
    """After validation: deletions and revivals applied, cross-checks, the dataset version and
    the rows still to write, all in one transaction (`write_scan`) on the connection holding the
    scan's `lock`; returns the summary."""
    now = utc_now()
    has_val = apply_listing(
        rows, listing, diff, inspected, config, bucket=bucket, prefix=prefix, now=now
    )
    cross = _cross_checks(
        rows,
        leakage_policy=config.leakage_policy,
        label_conflict_policy=config.label_conflict_policy,
    )
    version = build_dataset_version(bucket, rows.values(), config)
    summary = _summary(bucket, prefix, listing, diff, rows, version, config, cross, gets)
    summary["has_val_split"] = has_val
    unreadable = any(rows[k]["reject_reason"] == REJECT_UNREADABLE for k in inspected)
    if set(diff.to_fetch) - inspected or unreadable:
        # Objects that vanished or changed between LIST and GET are not in the catalog as
        # listed, unreadable ones are to be tried again: the next scan must not take this
        # listing as done, even if it sees it again.
        summary["listing_digest"] = None
    summary["seconds"] = round(time.monotonic() - t0, 3)
    summary.update(
        write_scan(
            lock,
            rows_to_write(rows, stored, [k for k in listing.objects if k in rows], inspected, now),
            [rows[k]["id"] for k in diff.deleted],
            version,
            config,
            summary,
            started=started,
            now=now,
        )
    )
    return summary


def _record_unchanged(
    lock: HeldLock, where: str, previous: dict[str, Any], listing, *, started, t0: float
) -> dict[str, Any]:
    """Record a scan that found the listing, config and catalog as the last scan left them."""
    summary = unchanged_summary(previous, listing)
    summary["seconds"] = round(time.monotonic() - t0, 3)
    with lock.transaction() as cur:
        _insert_scan(cur, summary, started)
    _log_scan(where, summary)
    return summary


def apply_listing(
    rows: dict[str, dict[str, Any]],
    listing,
    diff,
    inspected,
    config: ScanConfig,
    *,
    bucket: str,
    prefix: str,
    now,
) -> None:
    """Bring `rows` to what the listing says: every listed object applied with its subset
    (val carved by `config` unless a val/ split holds images: `has_val_images`), every
    vanished one marked deleted at `now`. An object fetched for inspection that was not
    inspected vanished between LIST and GET: left out. Returns whether val/ holds images."""
    fetched = set(diff.to_fetch)
    applied = {k: v for k, v in listing.objects.items() if k not in fetched or k in inspected}
    has_val = has_val_images(rows, applied)
    for parsed, obj in applied.values():
        subset = carve_subset(
            parsed.relative_key, parsed.split, val_percent=config.val_percent, has_val_split=has_val
        )
        apply_object(rows, parsed, obj, None, bucket=bucket, prefix=prefix, subset=subset, now=now)
    for key in diff.deleted:
        rows[key]["deleted_at"] = now
    return has_val


def has_val_images(rows: dict[str, dict[str, Any]], objects: dict[str, tuple]) -> bool:
    """Whether a val/ split of `objects` (key: (ParsedKey, ObjectInfo)) holds images that passed
    validation: a stray text file or a broken image under val/ does not stop the carve of val
    from train (it would leave the dataset without val images)."""
    return any(
        parsed.split == "val"
        and key in rows
        and (rows[key]["status"] == "ok" or rows[key]["reject_reason"] in CROSS_REASONS)
        for key, (parsed, _) in objects.items()
    )


def _latest_summary(db: Database, bucket: str, prefix: str) -> dict[str, Any] | None:
    rows = db.query(
        "SELECT summary FROM scans WHERE bucket = %s AND prefix = %s ORDER BY id DESC LIMIT 1",
        (bucket, prefix),
    )
    return json.loads(rows[0]["summary"]) if rows else None


_CATALOG_MARK = "SELECT COUNT(*), MAX(updated_at) FROM images WHERE bucket = %s AND prefix = %s"


def _catalog_mark(db_or_cursor: Any, bucket: str, prefix: str) -> str:
    """Row count and last change of a prefix's catalog rows: any write to them changes it."""
    if isinstance(db_or_cursor, Database):
        with db_or_cursor.transaction() as cur:
            return _catalog_mark(cur, bucket, prefix)
    db_or_cursor.execute(_CATALOG_MARK, (bucket, prefix))
    count, latest = db_or_cursor.fetchone()
    return f"{count}:{latest.isoformat() if latest else ''}"


def is_unchanged(
    previous: dict[str, Any], listing: Listing, config: ScanConfig, catalog_mark: str
) -> bool:
    """True when the previous scan saw this very listing with this config, and no catalog row
    changed since: its dataset version and counts hold, nothing needs loading or writing."""
    return (
        previous.get("listing_digest") == listing.digest
        and previous.get("catalog_mark") == catalog_mark
        and ScanConfig.from_dict(previous) == config
    )


def unchanged_summary(previous: dict[str, Any], listing: Listing) -> dict[str, Any]:
    """The summary of a scan that found what `previous` left (keys it ignores may differ)."""
    return previous | {
        "listed": listing.n_listed,
        "new": 0,
        "changed_objects": 0,
        "unchanged": len(listing.objects),
        "revived": 0,
        "deleted": 0,
        "ignored": sum(listing.ignored.values()),
        "ignored_reasons": dict(sorted(listing.ignored.items())),
        "ignored_examples": dict(listing.ignored_examples),
        "gets": 0,
        "changed": False,
        "new_version": False,
    }


def _summary(
    bucket: str,
    prefix: str,
    listing: Listing,
    diff: Diff,
    rows: dict[str, dict[str, Any]],
    version: DatasetVersion,
    config: ScanConfig,
    cross: dict[str, Any],
    gets: int,
) -> dict[str, Any]:
    live = [r for r in rows.values() if r["deleted_at"] is None]
    reasons = Counter(r["reject_reason"] for r in live if r["status"] != "ok")
    return {
        "bucket": bucket,
        "prefix": prefix,
        "dataset_version": version.dataset_version,
        "listed": listing.n_listed,
        "new": len(diff.new),
        "changed_objects": len(diff.changed),
        "unchanged": diff.unchanged,
        "revived": len(diff.revived),
        "deleted": len(diff.deleted),
        "ok": sum(1 for r in live if r["status"] == "ok"),
        "rejected": sum(1 for r in live if r["status"] != "ok"),
        "ignored": sum(listing.ignored.values()),
        "reasons": dict(sorted(reasons.items())),
        "ignored_reasons": dict(sorted(listing.ignored.items())),
        "ignored_examples": dict(listing.ignored_examples),
        "counts": version.counts,
        "inbox": sum(1 for r in live if r["status"] == "ok" and r["subset"] == INBOX),
        "label_map": version.label_map,
        "unseen_labels": unseen_labels(version.counts),
        "excluded_labels": version.excluded_labels,
        "gets": gets,
        "listing_digest": listing.digest,
        **asdict(config),
        **cross,
    }


def write_scan(
    lock: HeldLock,
    writes: RowWrites,
    deleted_ids: Sequence[int],
    version: DatasetVersion,
    config: ScanConfig,
    summary: dict[str, Any],
    *,
    started: datetime,
    now: datetime,
) -> dict[str, Any]:
    """One transaction: changed rows, deletions, the dataset version (when new) with its
    membership, the stored config and the scan's row. Returns `changed`, `new_version` and the
    catalog mark (`is_unchanged`) the rows have once written.

    It runs on the connection that holds the scan's lock (`HeldLock.transaction`): if that
    connection ended, the lock went with it and nothing is written, however late it ended."""
    bucket, prefix = summary["bucket"], summary["prefix"]
    config_json = json.dumps(asdict(config), sort_keys=True)
    with lock.transaction() as cur:
        left_out = write_rows(cur, writes)
        for i in range(0, len(deleted_ids), _BATCH):
            ids = deleted_ids[i : i + _BATCH]
            cur.execute(
                f"UPDATE images SET deleted_at = %s WHERE id IN ({', '.join(['%s'] * len(ids))})",
                (now, *ids),
            )
        if left_out or _live_rejected(cur, bucket, prefix) != summary["rejected"]:
            # Rejected under this scan (`mark_rejected` while it ran): the next scan must read
            # the catalog again, not take this listing and catalog mark as done.
            log.warning("images of s3://%s/%s were rejected while this scan ran", bucket, prefix)
            summary["listing_digest"] = None
        cur.execute(
            "SELECT dataset_version FROM scans WHERE bucket = %s AND prefix = %s"
            " ORDER BY id DESC LIMIT 1",
            (bucket, prefix),
        )
        previous = cur.fetchone()
        cur.execute(
            "SELECT 1 FROM dataset_versions WHERE dataset_version = %s", (version.dataset_version,)
        )
        version_is_new = cur.fetchone() is None
        if version_is_new:
            _insert_dataset_version(cur, version, bucket, prefix, config_json, now)
        cur.execute(
            "INSERT INTO scan_configs (bucket, prefix, prefix_hash, config, updated_at)"
            " VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE"
            " updated_at = IF(config = VALUES(config), updated_at, VALUES(updated_at)),"
            " config = VALUES(config)",
            (bucket, prefix, _key_hash(prefix), config_json, now),
        )
        result = {
            "changed": previous is None or previous[0] != version.dataset_version,
            "new_version": version_is_new,
            "catalog_mark": _catalog_mark(cur, bucket, prefix),
        }
        _insert_scan(cur, summary | result, started)
    return result


def _live_rejected(cur: Any, bucket: str, prefix: str) -> int:
    cur.execute(
        "SELECT COUNT(*) FROM images WHERE bucket = %s AND prefix = %s AND deleted_at IS NULL"
        " AND status <> 'ok'",
        (bucket, prefix),
    )
    return int(cur.fetchone()[0])


def _insert_scan(cur: Any, summary: dict[str, Any], started: datetime) -> None:
    cur.execute(
        "INSERT INTO scans (bucket, prefix, started_at, finished_at, dataset_version,"
        " listed, new_objects, changed_objects, deleted_objects, ok, rejected, ignored,"
        " gets, summary) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            summary["bucket"],
            summary["prefix"],
            started,
            utc_now(),
            summary["dataset_version"],
            summary["listed"],
            summary["new"],
            summary["changed_objects"],
            summary["deleted"],
            summary["ok"],
            summary["rejected"],
            summary["ignored"],
            summary["gets"],
            json.dumps(summary, ensure_ascii=False, default=str),
        ),
    )


def _insert_dataset_version(
    cur: Any, version: DatasetVersion, bucket: str, prefix: str, config_json: str, now: datetime
) -> None:
    cur.execute(
        "INSERT INTO dataset_versions (dataset_version, bucket, prefix, n_images, counts,"
        " label_map, training_fingerprint, scan_config, excluded_labels, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            version.dataset_version,
            bucket,
            prefix,
            len(version.members),
            json.dumps(version.counts, ensure_ascii=False),
            json.dumps(version.label_map, ensure_ascii=False),
            version.training_fingerprint,
            config_json,
            json.dumps(version.excluded_labels, ensure_ascii=False),
            now,
        ),
    )
    # Every live row, not only accepted ones: a member rejected since the scan read it
    # (`mark_rejected`) stays a member of the version as built; readers skip rejected images.
    cur.execute(
        "SELECT id, object_key FROM images WHERE bucket = %s AND prefix = %s"
        " AND deleted_at IS NULL",
        (bucket, prefix),
    )
    ids = {key: image_id for image_id, key in cur.fetchall()}
    membership = [
        (version.dataset_version, ids[r["object_key"]], r["subset"], r["label"], r["etag"])
        for r in version.members
    ]
    for i in range(0, len(membership), _BATCH):
        insert_rows(
            cur,
            "INSERT INTO dataset_version_images (dataset_version, image_id, subset, label, etag)",
            membership[i : i + _BATCH],
        )


def _log_scan(where: str, summary: dict[str, Any]) -> None:
    log.info(
        "scan of %s: dataset %s (changed=%s), %d listed, %d new, %d changed, %d deleted,"
        " %d rejected, %d ignored, %d GETs, %.1fs",
        where,
        summary["dataset_version"],
        summary["changed"],
        summary["listed"],
        summary["new"],
        summary["changed_objects"],
        summary["deleted"],
        summary["rejected"],
        summary["ignored"],
        summary["gets"],
        summary["seconds"],
    )
    if summary["unseen_labels"]:
        log.warning("labels in val/test but not in train: %s", summary["unseen_labels"])
    if summary["excluded_labels"]:
        log.warning(
            "labels left out of dataset %s (fewer than %d train images): %s",
            summary["dataset_version"],
            summary["min_images_per_label"],
            summary["excluded_labels"],
        )


def _dataset_row(row: dict[str, Any]) -> dict[str, Any]:
    created = row["created_at"]
    return {
        "dataset_version": row["dataset_version"],
        "bucket": row["bucket"],
        "prefix": row["prefix"],
        "n_images": int(row["n_images"]),
        "counts": json.loads(row["counts"]),
        "label_map": json.loads(row["label_map"]),
        "training_fingerprint": row.get("training_fingerprint"),
        "excluded_labels": json.loads(row.get("excluded_labels") or "{}"),
        "scan_config": json.loads(row.get("scan_config") or "{}"),
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
    return [image_record(r) for r in db.query(sql + " ORDER BY i.object_key", args)]


def image_record(row: dict[str, Any]) -> ImageRecord:
    """The record of a `membership_query` / `inbox_query` row."""
    return ImageRecord(
        int(row["id"]),
        row["bucket"],
        row["object_key"],
        row["etag"],
        row["subset"],
        row["label"],
        int(row["size_bytes"]),
    )


def membership_query(dataset_version: str, subsets: Sequence[str]) -> tuple[str, tuple]:
    """SQL (columns id, bucket, object_key, etag, subset, label, size_bytes; `i` = images) and
    its args for the usable members of a dataset version in `subsets`: accepted, live, and
    unchanged since."""
    return (
        "SELECT i.id, i.bucket, i.object_key, m.etag, m.subset, m.label, i.size_bytes"
        " FROM dataset_version_images m JOIN images i ON i.id = m.image_id"
        " WHERE m.dataset_version = %s AND i.status = 'ok' AND i.deleted_at IS NULL"
        f" AND i.etag = m.etag AND m.subset IN ({', '.join(['%s'] * len(subsets))})",
        (dataset_version, *subsets),
    )


def trained_members(
    db: Database, dataset_version: str, subsets: Sequence[str], *, among: str
) -> set[int]:
    """Ids of members of dataset version `among` that a model trained on `subsets` of
    `dataset_version` saw: the same images as versioned there (also those deleted or rejected
    since), or the same content under another key (a file moved from train/ to val/ gets a
    new image id). LookupError for an unknown `dataset_version`."""
    get_dataset(db, dataset_version)
    marks = ", ".join(["%s"] * len(subsets))
    trained = (
        "SELECT m.image_id, i.content_sha256 FROM dataset_version_images m"
        " JOIN images i ON i.id = m.image_id AND i.etag = m.etag"
        f" WHERE m.dataset_version = %s AND m.subset IN ({marks})"
    )
    rows = db.query(
        "SELECT g.image_id FROM dataset_version_images g JOIN images gi ON gi.id = g.image_id"
        f" WHERE g.dataset_version = %s AND (g.image_id IN (SELECT t.image_id FROM ({trained}) t)"
        f" OR gi.content_sha256 IN (SELECT t.content_sha256 FROM ({trained}) t"
        " WHERE t.content_sha256 IS NOT NULL))",
        (among, dataset_version, *subsets, dataset_version, *subsets),
    )
    return {int(r["image_id"]) for r in rows}


def inbox_query(bucket: str, prefix: str) -> tuple[str, tuple]:
    """SQL (the columns of `membership_query`, label NULL) and args for the accepted, live
    unlabelled images under `<prefix>/inbox/`."""
    return (
        "SELECT i.id, i.bucket, i.object_key, i.etag, i.subset, NULL AS label, i.size_bytes"
        " FROM images i WHERE i.bucket = %s AND i.prefix = %s AND i.subset = 'inbox'"
        " AND i.status = 'ok' AND i.deleted_at IS NULL",
        (bucket, normalize_prefix(prefix)),
    )


def inbox_images(db: Database, bucket: str, prefix: str) -> list[ImageRecord]:
    """Accepted, live unlabelled images under `<prefix>/inbox/` (label None), ordered by key."""
    sql, args = inbox_query(bucket, prefix)
    return [image_record(r) for r in db.query(sql + " ORDER BY i.object_key", args)]


def split_reason(reason: str) -> tuple[str, str | None]:
    """`"code: detail"` (how decoders and fetchers word a failure) → (code, detail)."""
    code, sep, detail = reason.partition(": ")
    return code.strip()[:255], (detail.strip()[:1024] or None) if sep else None


def mark_rejected(db: Database, rejections: Sequence[tuple[ImageRecord, str]]) -> int:
    """Reject images found damaged later (e.g. a truncated JPEG at decode); returns rows changed.

    Each reason is `"code"` or `"code: detail"`; the code goes to `reject_reason`, the detail to
    `reject_detail`. A rejection holds for the ETag it was made for: a row whose object changed
    meanwhile is left alone, and later scans keep a rejection until the ETag changes (then the
    object is validated again).
    """
    items = [(*split_reason(reason), r.image_id, r.etag) for r, reason in rejections]
    if not items:
        return 0

    def write(cur) -> int:  # the same UPDATEs again when MySQL drops the connection
        return sum(
            cur.executemany(
                "UPDATE images SET status = 'rejected', reject_reason = %s, reject_detail = %s"
                " WHERE id = %s AND etag = %s",
                items[i : i + _BATCH],
            )
            for i in range(0, len(items), _BATCH)
        )

    changed = db.transact(write)
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
    default = ScanConfig()
    stored = "default: the prefix's stored scan configuration, else"
    parser.add_argument(
        "--val-percent",
        type=int,
        help=f"percent of train carved into val ({stored} {default.val_percent})",
    )
    parser.add_argument(
        "--leakage-policy", choices=POLICIES, help=f"{stored} {default.leakage_policy}"
    )
    parser.add_argument(
        "--label-conflict-policy",
        choices=POLICIES,
        help=f"{stored} {default.label_conflict_policy}",
    )
    parser.add_argument(
        "--small-label-policy",
        choices=SMALL_LABEL_POLICIES,
        help=f"labels with fewer than --min-images-per-label train images: refuse training or"
        f" exclude them from the dataset version ({stored} {default.small_label_policy})",
    )
    parser.add_argument(
        "--min-images-per-label", type=int, help=f"{stored} {default.min_images_per_label}"
    )
    parser.add_argument("--max-pixels", type=int, help=f"{stored} {default.max_pixels}")
    parser.add_argument("--min-side", type=int, help=f"{stored} {default.min_side}")
    parser.add_argument("--max-object-bytes", type=int, help=f"{stored} {default.max_object_bytes}")
    parser.add_argument("--workers", type=int, default=16, help="GET threads")
    parser.add_argument(
        "--chunk-size", type=int, default=500, help="validated objects committed per transaction"
    )
    parser.add_argument(
        "--force-delete",
        action="store_true",
        help="accept a scan that marks more than half of the catalogued images deleted",
    )


def cli_scan(args: argparse.Namespace, settings: Any) -> int:
    db = Database(settings.mysql)
    store, prefix = location_from_args(settings, args)
    s = scan(
        db,
        store,
        prefix,
        workers=args.workers,
        chunk_size=args.chunk_size,
        force_delete=args.force_delete,
        **{f.name: getattr(args, f.name) for f in fields(ScanConfig)},
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
    if s["excluded_labels"]:
        print(
            f"\nlabels left out (fewer than {s['min_images_per_label']} train images): "
            f"{s['excluded_labels']}"
        )
    if s["leakage"] or s["label_conflicts"]:
        print(f"\nleakage groups: {s['leakage']}, label conflicts: {s['label_conflicts']}")
    return 0
