"""Local files written whole or not at all, safe with many writers (threads, processes, containers
sharing a volume)."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name unique to this writer (pids collide
    between containers), then rename: a reader sees the old file, the whole new one, or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_own_file(path: Path, max_bytes: int | None = None) -> tuple[bytes, os.stat_result]:
    """(bytes, stat) of a file a cache wrote itself (`write_atomically`): a regular file of at
    most `max_bytes`. Anything else at `path` (a symlink to a secret or out of the cache, a FIFO
    that never ends, a device, something huge) is FileNotFoundError, a miss: whoever else can
    write a shared cache directory makes the reader fetch again, and the next write replaces it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink
            raise FileNotFoundError(
                errno.ENOENT, "a symlink, not a cached file", str(path)
            ) from exc
        raise
    with os.fdopen(fd, "rb") as file:
        found = os.fstat(file.fileno())
        if not stat.S_ISREG(found.st_mode) or (max_bytes is not None and found.st_size > max_bytes):
            raise FileNotFoundError(errno.ENOENT, "not a cached file", str(path))
        return file.read(found.st_size + 1), found
