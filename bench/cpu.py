"""CPU seconds of this process and of the local servers (S3, MySQL): per-item CPU costs are
what benchmarks on a shared machine can compare when wall-clock rates are noisy."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

S3_PID_FILE = Path(__file__).resolve().parent.parent / ".local" / "pids" / "s3.pid"


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used so far; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def server_pids() -> dict[str, int]:
    """Pids of the local S3 server (`make up`'s) and of MySQL/MariaDB, where found."""
    pids: dict[str, int] = {}
    try:
        pids["S3 server"] = int(S3_PID_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for name in ("mariadbd", "mysqld"):
        found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
        if found.split():
            pids["MySQL server"] = int(found.split()[0])
            break
    return pids


class CpuMeter:
    """CPU seconds used by this process and each local server between `start` and `per_item`."""

    def __init__(self) -> None:
        self.pids = server_pids()
        self.start()

    def start(self) -> None:
        self._process = time.process_time()
        self._switches = _context_switches()
        self._servers = {name: process_cpu(pid) for name, pid in self.pids.items()}

    def per_item(self, n: int) -> dict[str, float]:
        """CPU ms per item since `start`: {"this process": ..., "S3 server": ..., ...}."""
        out = {"this process": 1000 * (time.process_time() - self._process) / n}
        for name, before in self._servers.items():
            after = process_cpu(self.pids[name])
            if before is not None and after is not None:
                out[name] = 1000 * (after - before) / n
        return out

    def switches_per_item(self, n: int) -> tuple[float, float]:
        """(voluntary, involuntary) context switches of this process per item since `start`,
        threads that ended included: with many threads, voluntary ones are mostly GIL hand-offs
        and waits on sockets."""
        now = _context_switches()
        return ((now[0] - self._switches[0]) / n, (now[1] - self._switches[1]) / n)


def _context_switches() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw, usage.ru_nivcsw
