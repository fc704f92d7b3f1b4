"""`insert_rows` sends what pymysql's executemany sends, and `parse_list_page` reads a
ListObjectsV2 page as the MinIO SDK does (no services)."""

from __future__ import annotations

from datetime import datetime

import pymysql.converters
import pymysql.cursors
import pytest
from minio.datatypes import parse_list_objects
from pymysql.connections import Connection
from pymysql.constants import SERVER_STATUS

from pipeline import db
from pipeline.store import ObjectInfo, parse_list_page


class RecordingCursor(pymysql.cursors.Cursor):
    """A cursor on no server: records the statements it would send."""

    def __init__(self, no_backslash_escapes: bool = False) -> None:
        conn = Connection.__new__(Connection)
        conn.encoding, conn.charset, conn.encoders = "utf8", "utf8mb4", pymysql.converters.encoders
        conn.server_status = (
            SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES if no_backslash_escapes else 0
        )
        super().__init__(conn)
        self.sent: list[str] = []

    def execute(self, query, args=None):
        query = self.mogrify(query, args)
        self.sent.append(query.decode() if isinstance(query, bytes | bytearray) else query)
        return 1


NOW = datetime(2026, 1, 2, 3, 4, 5, 678)
ROWS = [
    ("b", "k'1\\x", 7, None, NOW, 'label "q"; DROP', "ü猫\n\0", 0),
    ("b", "k2%s", -3, "x", datetime(2026, 1, 2), "label", "", 2**40),
    ("b", "k3", 0, None, NOW, "label", "%(x)s", None),
]


@pytest.mark.parametrize("no_backslash", [False, True], ids=["backslash", "no-backslash"])
def test_insert_rows_sends_the_statement_executemany_sends(no_backslash):
    head = "INSERT INTO t (a, b, c, d, e, f, g, h)"
    tail = " ON DUPLICATE KEY UPDATE c = VALUES(c)"
    ours, theirs = RecordingCursor(no_backslash), RecordingCursor(no_backslash)
    assert db.insert_rows(ours, head, iter(ROWS), tail) == 1
    theirs.executemany(f"{head} VALUES ({', '.join(['%s'] * 8)}){tail}", ROWS)
    assert [s.replace(", ", ",") for s in ours.sent] == [s.replace(", ", ",") for s in theirs.sent]


def test_insert_rows_splits_long_batches_and_sends_nothing_for_none():
    cur = RecordingCursor()
    assert db.insert_rows(cur, "INSERT INTO t (a)", []) == 0
    assert cur.sent == []
    rows = [("x" * 1000,)] * 600
    assert db.insert_rows(cur, "INSERT INTO t (a)", rows) == 3
    assert sum(s.count("'x") for s in cur.sent) == 600
    assert all(len(s) < 260_000 for s in cur.sent)


NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def page(contents: str, extra: str = "", ns: str = NS) -> bytes:
    xmlns = f' xmlns="{ns}"' if ns else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult{xmlns}><Name>b</Name>'
        f"<Prefix>p/</Prefix><MaxKeys>1000</MaxKeys>{extra}{contents}</ListBucketResult>"
    ).encode()


def item(key: str, size: int = 5, etag: str = "&#34;abc&#34;") -> str:
    return (
        f"<Contents><Key>{key}</Key><LastModified>2026-01-02T03:04:05.000Z</LastModified>"
        f"<ETag>{etag}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
    )


class Response:
    def __init__(self, data: bytes) -> None:
        self.data = data


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(page(item("p/a.png") + item("p/b c.png", 0, "")), id="last-page"),
        pytest.param(page(item("p/a.png"), ns=""), id="no-namespace"),
        pytest.param(
            page(
                item("p/a+b%2Bc%C3%BC.png"),
                "<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
                "<NextContinuationToken>tok+en</NextContinuationToken>",
            ),
            id="url-encoded-with-token",
        ),
        pytest.param(
            page(item("p/a+b.png"), "<IsTruncated>true</IsTruncated>"), id="not-url-encoded"
        ),
        pytest.param(
            page(
                item("p/x%2By.png"),
                "<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
                "<NextMarker>p/x%2By.png</NextMarker>",
            ),
            id="next-marker",
        ),
        pytest.param(
            page(item("p/last.png"), "<IsTruncated>true</IsTruncated>"), id="truncated-no-token"
        ),
        pytest.param(page("", "<IsTruncated>false</IsTruncated>"), id="empty"),
    ],
)
def test_a_list_page_reads_as_the_sdk_reads_it(body):
    objects, truncated, token, _ = parse_list_objects(Response(body))
    expected = [ObjectInfo(o.object_name, int(o.size), (o.etag or "").strip('"')) for o in objects]
    assert parse_list_page(body) == (expected, token if truncated else None)


def test_a_listed_object_without_a_key_or_size_is_an_error():
    with pytest.raises(ValueError, match="Key"):
        parse_list_page(page("<Contents><Size>1</Size></Contents>"))
    with pytest.raises(TypeError):
        parse_list_page(page("<Contents><Key>k</Key></Contents>"))
