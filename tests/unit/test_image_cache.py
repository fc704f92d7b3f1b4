"""The image cache's budget: least recently used copies go first, recent ones never (real files)."""

from __future__ import annotations

import os
import time

import pytest

from pipeline.config import ConfigError, cache_max_bytes
from pipeline.data import CACHE_MIN_AGE_S, ImageCache, read_cached
from pipeline.records import ImageRecord

HOUR = 3600


def _record(i: int) -> ImageRecord:
    return ImageRecord(i, "images", f"test/a/{i}.png", f"etag{i}", "test", "a", size=1000)


def _put(cache: ImageCache, i: int, *, used_hours_ago: float) -> str:
    path = cache.path(_record(i))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([i]) * 1000)
    when = time.time() - used_hours_ago * HOUR
    os.utime(path, (when, when))
    return str(path)


def test_trim_deletes_the_copies_used_longest_ago_until_the_cache_fits(tmp_path):
    cache = ImageCache(tmp_path, max_bytes=2500)
    ages = {1: 30, 2: 10, 3: 20, 4: 9, 5: 1}  # hours since last use
    paths = {i: _put(cache, i, used_hours_ago=h) for i, h in ages.items()}
    done = cache.trim()
    # 5000 bytes over 2500: the three used longest ago go (30 h, 20 h, 10 h ago)
    assert {i for i, p in paths.items() if os.path.exists(p)} == {4, 5}
    assert done == {"deleted": 3, "deleted_bytes": 3000, "kept_bytes": 2000, "stale_tmp": 0}


def test_trim_never_deletes_a_copy_used_recently_even_over_budget(tmp_path, caplog):
    cache = ImageCache(tmp_path, max_bytes=0)
    recent = CACHE_MIN_AGE_S / HOUR - 1
    paths = [_put(cache, 1, used_hours_ago=recent), _put(cache, 2, used_hours_ago=recent + 2)]
    done = cache.trim()
    assert [os.path.exists(p) for p in paths] == [True, False]
    assert done["kept_bytes"] == 1000
    assert "over its budget" in caplog.text and "PIPELINE_CACHE_MAX_GB" in caplog.text


def test_reading_a_copy_marks_it_used_so_it_outlives_older_ones(tmp_path):
    cache = ImageCache(tmp_path, max_bytes=1000)
    read = _put(cache, 1, used_hours_ago=40)
    unread = _put(cache, 2, used_hours_ago=20)
    assert cache.get(store=None, record=_record(1)) == bytes([1]) * 1000  # a hit: no S3 call
    cache.trim()
    assert os.path.exists(read) and not os.path.exists(unread)

    # A fill makes room first, then finds its copies cached (no GET) and marks them used.
    os.utime(read, (time.time() - 40 * HOUR,) * 2)
    listed = _put(cache, 3, used_hours_ago=30)
    assert cache.fill(None, [_record(3)]) == {}
    assert not os.path.exists(read)
    assert time.time() - os.stat(listed).st_mtime < 60


def test_trim_removes_temporary_files_of_killed_writers_but_not_of_live_ones(tmp_path):
    cache = ImageCache(tmp_path, max_bytes=10**9)
    kept = _put(cache, 1, used_hours_ago=100)  # under budget: stays
    shard = os.path.dirname(kept)
    stale, live = f"{shard}/x.abc.tmp", f"{shard}/y.def.tmp"
    for path, hours in ((stale, 2), (live, 0)):
        with open(path, "wb") as f:
            f.write(b"partial")
        os.utime(path, (time.time() - hours * HOUR,) * 2)
    assert cache.trim()["stale_tmp"] == 1
    assert [os.path.exists(p) for p in (kept, stale, live)] == [True, False, True]


def test_without_a_budget_trim_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_CACHE_MAX_GB", raising=False)
    cache = ImageCache(tmp_path)
    path = _put(cache, 1, used_hours_ago=1000)
    assert cache.trim()["deleted"] == 0 and os.path.exists(path)
    monkeypatch.setenv("PIPELINE_CACHE_MAX_GB", "0")
    ImageCache(tmp_path).trim()
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", None), ("50", 50 * 10**9), ("0.5", 5 * 10**8), ("0", 0)],
)
def test_cache_budget_from_the_environment(raw, expected):
    assert cache_max_bytes({"PIPELINE_CACHE_MAX_GB": raw}) == expected


@pytest.mark.parametrize("raw", ["-1", "ten", "nan", "inf"])
def test_a_bad_cache_budget_is_refused_naming_the_variable(raw):
    with pytest.raises(ConfigError, match="PIPELINE_CACHE_MAX_GB must be a number"):
        cache_max_bytes({"PIPELINE_CACHE_MAX_GB": raw})


def test_training_reads_mark_copies_used_so_a_long_training_keeps_them(tmp_path):
    """Training's loader opens the copies itself: each read marks the copy used."""
    import io

    from PIL import Image

    from pipeline.data import EvalPreset, ImageDataset

    cache = ImageCache(tmp_path, max_bytes=0)
    path = cache.path(_record(1))
    path.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    long_ago = time.time() - 30 * HOUR
    os.utime(path, (long_ago, long_ago))
    image, target, _ = ImageDataset([path], [0], EvalPreset(8))[0]
    assert target == 0 and image.shape == (3, 8, 8)
    cache.trim()
    assert path.exists()


@pytest.mark.parametrize("planted", ["symlink", "fifo", "too-big"])
def test_only_the_caches_own_file_at_a_copys_path_is_read(tmp_path, planted):
    """Whoever else writes a shared cache directory: a symlink there (to a secret, or out of the
    cache), a FIFO (a read that never ends) or a huge file is a miss, fetched again, never read."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 1000)
    record = _record(1)
    path = ImageCache(tmp_path / "cache").path(record)
    path.parent.mkdir(parents=True)
    if planted == "symlink":
        path.symlink_to(secret)
    elif planted == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"b" * 10_000)
    with pytest.raises(FileNotFoundError):
        read_cached(path, record.size)
    path.unlink()
    path.write_bytes(b"c" * 1000)
    assert read_cached(path, record.size) == b"c" * 1000


def test_trim_deletes_nothing_through_a_symlinked_images_folder(tmp_path, caplog):
    """`images/` replaced by a link to another folder (anyone who writes the cache volume): trim
    deleted that folder's old files as if they were copies."""
    victim = tmp_path / "elsewhere" / "ab"
    victim.mkdir(parents=True)
    kept = victim / "important.db"
    kept.write_bytes(b"x" * 5000)
    old = time.time() - 30 * HOUR
    os.utime(kept, (old, old))
    cache = ImageCache(tmp_path / "cache", max_bytes=1000)
    cache.root.parent.mkdir(parents=True)
    cache.root.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert cache.trim()["deleted"] == 0
    assert kept.exists()
    assert "is a symlink: not trimmed" in caplog.text
