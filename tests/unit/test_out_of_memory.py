"""A decoder that runs out of memory is the worker's fault, not the image's: scoring's decode and
the scan's validation raise it (the task fails and is retried) instead of rejecting a good image
for good. Memory really runs out: a child process under RLIMIT_AS decodes a big, valid PNG."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import resource, struct, sys, zlib
    from pipeline import catalog
    from pipeline.data import ImageDecodeError, decode_image

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # A valid 6000x6000 RGB PNG (108 MB decoded) written row by row: building it never holds
    # the pixels, so no freed memory is left for the decoder to reuse under the limit below.
    side, pack = 6000, zlib.compressobj(9)
    row = b"\\0" + bytes([10, 200, 30]) * side
    idat = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    limit = sys.argv[2] == "limited"
    if limit:
        with open("/proc/self/status") as status:
            in_use = next(int(s.split()[1]) * 1024 for s in status if s.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (in_use + 48 * 2**20, resource.RLIM_INFINITY))
    try:
        if sys.argv[1] == "score":
            decode_image(data)
        else:
            got = catalog.inspect_image(data, size=len(data), complete=True, max_pixels=10**9)
            if got.status != "ok":
                print("REJECTED", got.reject_reason, got.reject_detail)
                sys.exit(3)
    except ImageDecodeError as exc:
        print("REJECTED", exc)
        sys.exit(3)
    except (MemoryError, RuntimeError) as exc:
        print("OUT OF MEMORY", type(exc).__name__, str(exc)[:200])
        sys.exit(4)
    print("DECODED")
    """
)


def _child(step: str, limit: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, step, limit],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("step", ["score", "scan"])
def test_running_out_of_memory_while_decoding_is_raised_not_a_rejection(step):
    free = _child(step, "unlimited")
    assert (free.returncode, free.stdout.strip()) == (0, "DECODED"), free.stdout + free.stderr
    starved = _child(step, "limited")
    assert starved.returncode == 4, starved.stdout + starved.stderr
    assert starved.stdout.startswith("OUT OF MEMORY"), starved.stdout
