"""Copy a local `<split>/<label>/<file>` tree into the bucket, skipping files already there."""

from __future__ import annotations

import argparse
import hashlib
import logging
import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.errors import is_transient, s3_error_code
from pipeline.store import ObjectStore, add_location_arguments, location_from_args

log = logging.getLogger(__name__)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_content(store: ObjectStore, there, path: Path) -> bool:
    """Whether the object `there` (listed, of the file's size) holds the bytes of `path`."""
    if there.etag == _md5(path):
        return True
    try:
        data = store.get_bytes(there.key, if_match=there.etag)  # at most the file's size
    except Exception as exc:
        # Gone or replaced since the LIST, or not readable as it is (SSE-C wants its key): an
        # answer about the object, so upload the file; an outage is raised.
        if s3_error_code(exc) is not None and not is_transient(exc):
            return False
        raise
    return hashlib.sha256(data).digest() == hashlib.sha256(path.read_bytes()).digest()


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a name the file system gave as bytes carries surrogates
    except UnicodeEncodeError:
        return False
    return True


def upload_tree(
    store: ObjectStore, local_dir: str | Path, prefix: str, *, workers: int = 16
) -> dict[str, int]:
    """Upload every file under `local_dir` to `<prefix>/<relative path>`; returns counts (and
    `not_utf8`: files left out because their names are no UTF-8, which an S3 key must be).

    One LIST of the prefix tells what is there: a file whose size and MD5 match the
    object's (single-part) ETag is skipped, so re-running uploads nothing. No HEAD per file.
    An object of the same size whose ETag is no MD5 of its bytes (uploaded in parts by another
    tool, or encrypted with SSE-KMS/SSE-C) is read and compared: rewriting identical bytes
    would give it a new ETag, and the next scan a new dataset version to train on.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    prefix = prefix.strip("/")
    start = f"{prefix}/" if prefix else ""
    existing = {o.key: o for o in store.iter_objects(start)}
    files, unnamable = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        (files if _utf8(path.relative_to(root).as_posix()) else unnamable).append(path)
    if unnamable:
        log.warning(
            "%d files are left out: their names are not UTF-8 (S3 keys are), e.g. %s;"
            " rename them (convmv -f latin1 -t utf8) and upload again",
            len(unnamable),
            ascii(str(unnamable[0].relative_to(root))),
        )
    t0 = time.monotonic()

    def one(path: Path) -> bool:
        key = start + path.relative_to(root).as_posix()
        there = existing.get(key)
        size = path.stat().st_size
        if there is not None and there.size == size and _same_content(store, there, path):
            return False
        content_type = mimetypes.guess_type(path.name)[0]
        store.put_bytes(key, path.read_bytes(), content_type=content_type)
        return True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        uploaded = sum(pool.map(one, files))
    elapsed = time.monotonic() - t0
    result = {
        "files": len(files) + len(unnamable),
        "uploaded": uploaded,
        "skipped": len(files) - uploaded,
        "not_utf8": [ascii(str(p.relative_to(root))) for p in unnamable],
    }
    log.info(
        "upload of %s to s3://%s/%s: %d uploaded, %d skipped in %.1fs (%.0f files/s)",
        root,
        store.bucket,
        prefix,
        uploaded,
        result["skipped"],
        elapsed,
        len(files) / max(elapsed, 1e-9),
    )
    return result


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("local_dir", metavar="LOCAL_DIR", help="a <split>/<label>/<file> tree")
    add_location_arguments(parser)
    parser.add_argument("--workers", type=int, default=16, help="parallel uploads (default 16)")


def cli_upload(args: argparse.Namespace, settings: Any) -> int:
    store, prefix = location_from_args(settings, args)
    store.ensure_bucket()
    result = upload_tree(store, args.local_dir, prefix, workers=args.workers)
    print(
        f"s3://{store.bucket}/{prefix.strip('/')}: {result['uploaded']} uploaded, "
        f"{result['skipped']} skipped (already there), {result['files']} files"
    )
    if result["not_utf8"]:
        print(f"not uploaded, names not UTF-8 (rename them): {', '.join(result['not_utf8'])}")
        return 1
    return 0
