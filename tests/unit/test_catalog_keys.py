"""Key parsing, validation split carving, format sniffing and dataset checks (no services)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image

from pipeline import catalog
from pipeline.catalog import IgnoredKey, ParsedKey


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param("ds/train/cat/a.png", ("train", "cat"), id="plain"),
        pytest.param("ds/val/dog/b.jpg", ("val", "dog"), id="val-split"),
        pytest.param("ds/test/Gold Fish/c d.png", ("test", "Gold Fish"), id="spaces"),
        pytest.param("ds/train/Ünïcödé 猫/x.png", ("train", "Ünïcödé 猫"), id="unicode"),
        pytest.param("ds/train/Cat/x.png", ("train", "Cat"), id="case-kept"),
        pytest.param('ds/train/it\'s "q"; DROP/x.png', ("train", 'it\'s "q"; DROP'), id="sql-ish"),
        pytest.param("ds/inbox/new.png", ("inbox", None), id="inbox"),
        pytest.param("ds/train/cat/noext", ("train", "cat"), id="no-extension"),
    ],
)
def test_keys_in_the_layout_are_parsed(key, expected):
    parsed = catalog.parse_key(key, "ds")
    assert isinstance(parsed, ParsedKey)
    assert (parsed.split, parsed.label) == expected
    assert parsed.relative_key == key[len("ds/") :]


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        pytest.param("ds/train/cat/", catalog.IGNORED_FOLDER_MARKER, id="trailing-slash"),
        pytest.param("ds/train/", catalog.IGNORED_FOLDER_MARKER, id="split-folder-marker"),
        pytest.param("ds/train/../cat/a.png", catalog.IGNORED_BAD_SEGMENT, id="dot-dot"),
        pytest.param("ds/train/./a.png", catalog.IGNORED_BAD_SEGMENT, id="dot"),
        pytest.param("ds/train//a.png", catalog.IGNORED_BAD_SEGMENT, id="empty-segment"),
        pytest.param("ds/train/cat/sub/a.png", catalog.IGNORED_TOO_DEEP, id="nested-deeper"),
        pytest.param("ds/inbox/sub/a.png", catalog.IGNORED_TOO_DEEP, id="inbox-nested"),
        pytest.param("ds/train/a.png", catalog.IGNORED_NO_LABEL, id="file-under-split"),
        pytest.param("ds/training/cat/a.png", catalog.IGNORED_UNKNOWN_SPLIT, id="unknown-split"),
        pytest.param("ds/Train/cat/a.png", catalog.IGNORED_UNKNOWN_SPLIT, id="split-case"),
        pytest.param("ds/readme.txt", catalog.IGNORED_OUTSIDE_LAYOUT, id="file-under-prefix"),
        pytest.param("ds/train/.ipynb_checkpoints/a.png", catalog.IGNORED_HIDDEN, id="ipynb"),
        pytest.param("ds/__MACOSX/train/cat/a.png", catalog.IGNORED_HIDDEN, id="macosx"),
        pytest.param("ds/train/cat/.DS_Store", catalog.IGNORED_HIDDEN, id="dot-file"),
        pytest.param("ds/train/cat/Thumbs.db", catalog.IGNORED_HIDDEN, id="thumbs-db"),
        pytest.param("ds/train/" + "x" * 256 + "/a.png", catalog.IGNORED_LABEL_TOO_LONG, id="long"),
        pytest.param("other/train/cat/a.png", catalog.IGNORED_OUTSIDE_LAYOUT, id="other-prefix"),
        pytest.param(
            "ds/train/cat /a.png", catalog.IGNORED_LABEL_TRAILING_SPACE, id="label-trailing-space"
        ),
        pytest.param(
            "ds/train/zz\n## Approve me/a.png",
            catalog.IGNORED_LABEL_CONTROL_CHARACTER,
            id="label-newline",
        ),
        pytest.param(
            "ds/train/cat\u202egnp/a.png",
            catalog.IGNORED_LABEL_CONTROL_CHARACTER,
            id="label-bidi-override",
        ),
    ],
)
def test_keys_outside_the_layout_are_ignored_with_a_reason(key, reason):
    parsed = catalog.parse_key(key, "ds")
    assert parsed == IgnoredKey(key, reason)


@pytest.mark.parametrize("prefix", ["data ", " data", "data /"])
def test_a_prefix_with_white_space_at_an_end_is_refused(prefix):
    with pytest.raises(ValueError, match="white space"):
        catalog.normalize_prefix(prefix)


@pytest.mark.parametrize("prefix", [pytest.param("", id="root"), pytest.param("/", id="slash")])
def test_empty_prefix_means_bucket_root(prefix):
    assert catalog.parse_key("train/cat/a.png", prefix) == ParsedKey(
        "train/cat/a.png", "train/cat/a.png", "train", "cat"
    )


def test_nested_prefix_with_trailing_slash_is_normalised():
    parsed = catalog.parse_key("a/b/test/dog/x.png", "/a/b/")
    assert isinstance(parsed, ParsedKey) and parsed.label == "dog"


def test_val_carving_is_stable_and_near_the_percentage():
    keys = [f"train/label{i % 7}/img_{i:05d}.png" for i in range(5000)]
    first = [catalog.carve_subset(k, "train", val_percent=10, has_val_split=False) for k in keys]
    again = [catalog.carve_subset(k, "train", val_percent=10, has_val_split=False) for k in keys]
    assert first == again
    share = first.count("val") / len(keys)
    assert 0.08 < share < 0.12
    assert set(first) == {"train", "val"}


@pytest.mark.parametrize(
    ("key", "bucket"),
    [
        pytest.param("train/cat/a.png", 97, id="ascii"),
        pytest.param("train/Ünï 猫/b.jpg", 86, id="unicode"),
        pytest.param("train/dog/IMG 0001.JPG", 58, id="space"),
        pytest.param("x", 76, id="short"),
    ],
)
def test_val_bucket_is_a_fixed_function_of_the_key(key, bucket):
    # Pinned values: the carve (and so every dataset version) must not move across machines,
    # Python versions or a rewrite of the formula.
    assert catalog.val_bucket(key) == bucket


@pytest.mark.parametrize(
    ("split", "has_val", "percent", "expected"),
    [
        pytest.param("train", True, 100, "train", id="val-split-present-no-carving"),
        pytest.param("train", False, 100, "val", id="all-carved"),
        pytest.param("train", False, 0, "train", id="none-carved"),
        pytest.param("test", False, 100, "test", id="test-never-carved"),
        pytest.param("inbox", False, 100, "inbox", id="inbox-never-carved"),
    ],
)
def test_carve_subset_rules(split, has_val, percent, expected):
    assert (
        catalog.carve_subset("x/y.png", split, val_percent=percent, has_val_split=has_val)
        == expected
    )


def test_carve_rejects_bad_percent():
    with pytest.raises(ValueError, match="val_percent must be 0-100"):
        catalog.carve_subset("k", "train", val_percent=101, has_val_split=False)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 1000)
        + b"IDAT"
        + b"\0" * 16
    )


@pytest.mark.parametrize(
    ("data", "complete", "reason"),
    [
        pytest.param(b"", True, catalog.REJECT_ZERO_BYTES, id="zero-bytes"),
        pytest.param(b"hello, not an image", True, catalog.REJECT_NOT_AN_IMAGE, id="text"),
        pytest.param(b"\0\0\x01\0" + b"\0" * 20, True, catalog.REJECT_UNSUPPORTED, id="ico"),
        pytest.param(b"GIF89a" + b"\0" * 20, True, catalog.REJECT_CORRUPT, id="broken-gif"),
        pytest.param(b"II*\x00" + b"\0" * 20, True, catalog.REJECT_CORRUPT, id="broken-tiff"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"junk" * 10, True, catalog.REJECT_CORRUPT, id="png"),
        pytest.param(_png(4, 40), True, catalog.REJECT_TOO_SMALL, id="too-small"),
        pytest.param(
            _png_header_only(100_000, 100_000), False, catalog.REJECT_TOO_MANY_PIXELS, id="bomb"
        ),
        pytest.param(
            _png_header_only(9000, 9000), False, catalog.REJECT_TOO_MANY_PIXELS, id="over-limit"
        ),
        pytest.param(_png(16, 16)[:-20], True, catalog.REJECT_CORRUPT, id="truncated-png"),
    ],
)
def test_inspect_image_rejects_with_reason(data, complete, reason):
    result = catalog.inspect_image(data, size=len(data), complete=complete, max_pixels=50_000_000)
    assert result.status == "rejected"
    assert result.reject_reason == reason
    if reason == catalog.REJECT_CORRUPT:  # says what is wrong with it
        assert result.reject_detail and len(result.reject_detail) <= 1024


def test_inspect_image_accepts_a_png_and_fingerprints_it():
    data = _png(16, 12)
    result = catalog.inspect_image(data, size=len(data), complete=True)
    assert (result.status, result.width, result.height, result.format, result.mode) == (
        "ok",
        16,
        12,
        "PNG",
        "RGB",
    )
    import hashlib

    assert result.content_sha256 == hashlib.sha256(data).hexdigest()


def _with_chunk_after_idat(png: bytes, cid: bytes, data: bytes, *, crc_delta: int = 0) -> bytes:
    """`png` with one more chunk before IEND (its CRC off by `crc_delta`)."""
    iend = png.rindex(b"IEND") - 4
    crc = (zlib.crc32(cid + data) + crc_delta) & 0xFFFFFFFF
    return (
        png[:iend] + struct.pack(">I", len(data)) + cid + data + struct.pack(">I", crc) + png[iend:]
    )


def test_png_checksums_are_checked_where_decoding_does_not_look():
    good = _with_chunk_after_idat(_png(16, 16), b"tEXt", b"k\0v")
    bad = _with_chunk_after_idat(_png(16, 16), b"tEXt", b"k\0v", crc_delta=1)
    damage = catalog.png_chunk_error(bad)
    assert catalog.png_chunk_error(good) is None
    assert "b'tEXt' at byte" in damage and "fails its CRC" in damage
    assert "without an IEND" in catalog.png_chunk_error(_png(16, 16)[:-12])
    assert "runs past the end" in catalog.png_chunk_error(_png(16, 16)[:-20])
    with Image.open(io.BytesIO(bad)) as im:
        im.load()  # Pillow decodes it: only the checksums tell
    assert catalog.inspect_image(good, size=len(good), complete=True).status == "ok"
    verdict = catalog.inspect_image(bad, size=len(bad), complete=True)
    assert verdict.reject_reason == catalog.REJECT_CORRUPT
    assert verdict.reject_detail == damage


def test_a_big_header_warns_nothing_and_pillows_own_limit_still_holds():
    """Between Pillow's warning and error sizes: no warning (scan threads share the filters);
    beyond its error size an image is refused whatever `max_pixels` says (training could not
    open it)."""
    limit = Image.MAX_IMAGE_PIXELS
    side = int((1.5 * limit) ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = _png_header_only(side, side)
        verdict = catalog.inspect_image(data, size=10**9, complete=False, max_pixels=10**10)
    assert verdict.status == "ok" and verdict.width == side
    side = int((2.5 * limit) ** 0.5)
    data = _png_header_only(side, side)
    verdict = catalog.inspect_image(data, size=10**9, complete=False, max_pixels=10**10)
    assert verdict.reject_reason == catalog.REJECT_TOO_MANY_PIXELS


def test_header_only_inspection_has_no_fingerprint():
    data = _png(16, 16)
    result = catalog.inspect_image(data[:-10], size=len(data), complete=False)
    assert result.status == "ok" and result.content_sha256 is None


def test_magic_bytes_win_over_the_extension():
    buf = io.BytesIO()
    Image.new("RGB", (9, 9)).save(buf, format="JPEG")
    assert catalog.sniff_format(buf.getvalue()) == "JPEG"
    assert catalog.sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert catalog.sniff_format(b"RIFF\0\0\0\0WAVEfmt ") is None


def test_dataset_fingerprint_ignores_order_and_sees_every_field():
    members = [("k1", "e1", "train", "a"), ("k2", "e2", "test", "b")]
    base = catalog.dataset_fingerprint("b", members)
    assert base == catalog.dataset_fingerprint("b", list(reversed(members)))
    assert len(base) == catalog.DATASET_VERSION_CHARS
    for i in range(4):
        changed = [list(m) for m in members]
        changed[0][i] += "x"
        assert catalog.dataset_fingerprint("b", [tuple(m) for m in changed]) != base
    assert catalog.dataset_fingerprint("other", members) != base


@pytest.mark.parametrize(
    ("counts", "kwargs", "fragment"),
    [
        pytest.param({}, {}, "no accepted train images", id="empty"),
        pytest.param({"train": {"a": 9}}, {}, "at least 2 labels", id="one-label"),
        pytest.param({"train": {"a": 9, "b": 2}}, {}, "'b' (2)", id="too-few"),
        pytest.param({"train": {"a": 9, "b": 9}, "test": {"c": 1}}, {}, "['c']", id="unseen-label"),
        pytest.param(
            {"train": {"caf\u00e9": 9, "cafe\u0301": 9, "dog": 9}},
            {},
            "'cafe\\u0301' and 'caf\\xe9'",
            id="nfc-nfd-look-alike",
        ),
    ],
)
def test_check_dataset_names_the_problem(counts, kwargs, fragment):
    problems = catalog.check_dataset({"counts": counts}, min_images_per_label=5, **kwargs)
    assert any(fragment in p for p in problems), problems


def test_labels_that_differ_in_case_are_two_classes():
    info = {"counts": {"train": {"A": 9, "a": 9}}}
    assert catalog.check_dataset(info, min_images_per_label=5) == []


def test_check_dataset_allows_unseen_labels_when_asked():
    info = {"counts": {"train": {"a": 9, "b": 9}, "test": {"c": 1}}}
    assert catalog.check_dataset(info, allow_unseen_labels=True) == []


def test_label_map_is_sorted_train_labels():
    counts = {"train": {"b": 1, "a": 2, "Gold Fish": 1}, "test": {"zz": 1}}
    assert catalog.build_label_map(counts) == {"Gold Fish": 0, "a": 1, "b": 2}
    assert catalog.unseen_labels(counts) == ["zz"]


def test_unknown_policy_is_refused_with_allowed_values():
    with pytest.raises(ValueError, match="expected one of: reject, keep"):
        catalog.scan(None, type("S", (), {"bucket": "b"})(), "p", leakage_policy="drop")
