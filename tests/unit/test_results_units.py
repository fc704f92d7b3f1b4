"""The results page's pure pieces: cursors, filters, run links, thumbnails, cache paths, the
newest drift check of each subset."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline import results
from pipeline.records import ImageRecord


@pytest.mark.parametrize(
    ("confidence", "prediction_id"),
    [
        pytest.param(0.0, 1, id="zero"),
        pytest.param(0.1 + 0.2, 7, id="inexact-float"),
        pytest.param(1.0, 2**40, id="one-big-id"),
        pytest.param(5e-324, 3, id="denormal"),
    ],
)
def test_cursor_round_trips_exactly(confidence, prediction_id):
    cursor = results.encode_cursor(confidence, prediction_id)
    assert results.decode_cursor(cursor) == (confidence, prediction_id)


@pytest.mark.parametrize(
    "cursor", ["", "0.5", "abc_1", "0.5_x", "0.5-3", "nan_5", "inf_1", "-inf_2"]
)
def test_a_malformed_cursor_is_refused_saying_what_to_pass(cursor):
    with pytest.raises(ValueError, match="`next` value of the previous page"):
        results.decode_cursor(cursor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"queue": "wrong"}, "expected one of: review, all", id="queue"),
        pytest.param({"subset": "holdout"}, "expected one of: train, val, test", id="subset"),
        pytest.param({"below": 0.0}, "confidence in", id="below-zero"),
        pytest.param({"below": 1.5}, "confidence in", id="below-above-one"),
    ],
)
def test_filter_refuses_bad_values_listing_the_allowed_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        results.PredictionFilter(**kwargs)


def test_review_queue_is_low_confidence_or_wrong_and_filters_add_up():
    clauses, args = results.PredictionFilter(
        true_label="cat", subset="test", below=0.3, wrong_only=True
    ).where()
    assert clauses[0] == "(p.confidence < %s OR p.correct = 0)"
    assert args == [results.REVIEW_CONFIDENCE, "cat", "test", 0.3]
    assert "p.correct = 0" in clauses
    assert results.PredictionFilter(queue="all").where() == ([], [])


@pytest.mark.parametrize("limit", [0, results.MAX_PAGE + 1])
def test_page_size_is_bounded(limit):
    with pytest.raises(ValueError, match="limit must be"):
        results.prediction_page_query("m", 1, results.PredictionFilter(), limit=limit)


def test_page_query_orders_by_the_index_and_reads_one_row_more():
    sql, args = results.prediction_page_query(
        "m", 3, results.PredictionFilter(queue="all"), after="0.25_9", limit=10
    )
    assert sql.endswith("ORDER BY p.confidence, p.id LIMIT %s")
    assert args == ["m", 3, 0.25, 0.25, 9, 11]


@pytest.mark.parametrize(
    ("uri", "run_id", "expected"),
    [
        pytest.param(
            "http://127.0.0.1:5000/", "abc", "http://127.0.0.1:5000/#/runs/abc", id="http"
        ),
        pytest.param(None, "abc", None, id="no-uri"),
        pytest.param("http://h:5000", None, None, id="no-run"),
        pytest.param("databricks", "abc", None, id="not-a-web-ui"),
        pytest.param(
            "https://admin:s3cret@mlflow.internal:5000",
            "abc",
            "https://mlflow.internal:5000/#/runs/abc",
            id="no-credentials",
        ),
    ],
)
def test_mlflow_run_url(uri, run_id, expected):
    assert results.mlflow_run_url(uri, run_id) == expected


@pytest.mark.parametrize(
    ("mode", "size", "bound"),
    [
        pytest.param("RGB", (640, 320), 128, id="wide-rgb"),
        pytest.param("L", (50, 300), 64, id="tall-grey"),
        pytest.param("RGBA", (20, 20), 256, id="small-alpha-not-enlarged"),
        pytest.param("P", (400, 400), 256, id="palette"),
        pytest.param("I;16", (300, 100), 64, id="sixteen-bit-grey"),
        pytest.param("1", (90, 30), 64, id="one-bit"),
    ],
)
def test_thumbnail_is_a_jpeg_within_the_bound_keeping_aspect(mode, size, bound):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    with Image.open(io.BytesIO(results.render_thumbnail(buf.getvalue(), bound))) as thumb:
        assert thumb.format == "JPEG"
        assert max(thumb.size) == min(bound, max(size))
        assert abs(thumb.size[0] / thumb.size[1] - size[0] / size[1]) < 0.1


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_parts_of_a_thumbnail_are_white(mode):
    """As a viewer shows them (black before: the hidden colour under full transparency)."""
    buf = io.BytesIO()
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    (clear if mode == "RGBA" else clear.convert(mode)).save(buf, format="PNG")
    with Image.open(io.BytesIO(results.render_thumbnail(buf.getvalue(), 64))) as thumb:
        assert min(thumb.convert("L").getdata()) >= 250


def test_bytes_that_do_not_decode_get_no_thumbnail():
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    for data in (
        b"not an image",
        png.getvalue()[:60],
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ):
        with pytest.raises(results.NoThumbnail, match="does not decode"):
            results.render_thumbnail(data, 64)


MEASURE_THUMBNAIL = """
import resource, sys
from pathlib import Path
from PIL import Image
from pipeline import results
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
thumb = results.render_thumbnail(data, 128)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Path(sys.argv[2]).write_bytes(thumb)
print((after - before) // 1024)
"""


def test_a_large_jpeg_thumbnail_never_decodes_the_full_picture(tmp_path):
    """A 7200 x 3600 JPEG rotated by EXIF (orientation 6): the full picture is 78 MB of RGB;
    rendered at a reduced scale, the renderer's peak memory grows by a fraction of that."""
    import subprocess
    import sys

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    source = tmp_path / "large.jpg"
    Image.new("RGB", (7200, 3600), (200, 30, 30)).save(source, format="JPEG", exif=exif)
    out = tmp_path / "thumb.jpg"
    grown = subprocess.run(
        [sys.executable, "-c", MEASURE_THUMBNAIL, str(source), str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(grown) < 30, f"peak memory grew by {grown} MB"
    with Image.open(out) as thumb:
        assert thumb.size == (64, 128)  # rotated: portrait


def test_thumbnail_cache_path_changes_with_the_objects_etag_and_the_size(tmp_path):
    record = ImageRecord(1, "b", "p/test/cat/1.png", "etag-1", "test", "cat", 10)
    changed = ImageRecord(1, "b", "p/test/cat/1.png", "etag-2", "test", "cat", 10)
    path = results.thumbnail_path(tmp_path, record, 128)
    assert path.is_relative_to(tmp_path / "thumbnails") and path.suffix == ".jpg"
    assert path != results.thumbnail_path(tmp_path, changed, 128)
    assert path != results.thumbnail_path(tmp_path, record, 64)


def test_thumbnail_size_must_be_one_of_the_offered_sizes(tmp_path):
    with pytest.raises(ValueError, match="size must be one of: 64, 128, 256"):
        results.thumbnail(None, None, 1, size=1000, cache_dir=tmp_path)


def test_the_newest_drift_check_of_each_subset_is_marked_latest():
    rows = [
        {"subset": "test", "model_version": 2},
        {"subset": "inbox", "model_version": 2},
        {"subset": "test", "model_version": 1},
        {"subset": "inbox", "model_version": 1},
        {"subset": "test", "model_version": 1},
    ]
    marked = results.mark_latest(rows)
    assert [r["latest"] for r in marked] == [True, True, False, False, False]
    assert [r["model_version"] for r in marked] == [2, 2, 1, 1, 1]
    assert "latest" not in rows[0], "the rows passed in are left as they were"
    assert results.mark_latest([]) == []


def test_a_later_check_without_a_verdict_does_not_hide_the_one_that_stands():
    rows = [
        {"subset": "inbox", "status": "not_enough_images", "model_version": 5},  # a quiet hour
        {"subset": "inbox", "status": "checked", "model_version": 5},  # yesterday's drift
        {"subset": "test", "status": "no_reference", "model_version": 6},  # a new champion
        {"subset": "test", "status": "checked", "model_version": 5},  # not its verdict
        {"subset": "inbox", "status": "checked", "model_version": 5},
    ]
    assert [r["latest"] for r in results.mark_latest(rows)] == [False, True, True, False, False]


@pytest.mark.parametrize("limit", [0, results.MAX_PAGE + 1])
def test_drift_history_is_bounded(limit):
    with pytest.raises(ValueError, match="limit must be"):
        results.drift_history(None, "m", limit=limit)
