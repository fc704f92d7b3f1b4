"""`make airflow` (scripts/stack.py airflow): no Airflow process outlives a TERM to it or `make down`.

It starts the real `airflow standalone` of this checkout (on its own port, so a UI a developer
runs on 8080 keeps its port; an earlier `make airflow` of the same checkout is stopped first, as
`make airflow` itself does).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
PIDS = REPO / ".local" / "pids"
PORT = 18_793
START_TIMEOUT_S = 300


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start(tmp_path: Path, started: list[int]) -> tuple[subprocess.Popen, int]:
    log = open(tmp_path / "airflow.log", "ab")  # noqa: SIM115 - closed with the process
    launcher = subprocess.Popen(
        [sys.executable, "scripts/stack.py", "airflow"],
        cwd=REPO,
        # Under `stack.py run` the derived AIRFLOW__API__PORT is already exported: set both.
        env={**os.environ, "AIRFLOW_API_PORT": str(PORT), "AIRFLOW__API__PORT": str(PORT)},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    pgid_file = PIDS / "airflow.pgid"

    def up() -> bool:
        if launcher.poll() is not None:
            tail = (tmp_path / "airflow.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"stack.py airflow exited early:\n{tail}")
        if pgid_file.exists() and not started:
            started.append(int(pgid_file.read_text()))  # killed by the fixture whatever happens
        return pgid_file.exists() and _port_open(PORT)

    _wait(up, START_TIMEOUT_S, f"airflow standalone on port {PORT}")
    pgid = int(pgid_file.read_text())
    _wait(lambda: len(_group(pgid)) >= 3, 60, "the scheduler, API server and the rest")
    return launcher, pgid


@pytest.fixture
def cleanup():
    started: list[int] = []
    yield started
    for pgid in started:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_term_to_make_airflow_stops_every_airflow_process(tmp_path, cleanup):
    launcher, pgid = _start(tmp_path, cleanup)
    assert int((PIDS / "airflow.pid").read_text()) == launcher.pid
    # Every socket the group listens on (API server; no log servers) is on loopback.
    listening = [
        (proc.name(), conn.laddr.ip, conn.laddr.port)
        for proc in _group(pgid)
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert any(port == PORT for _, _, port in listening), listening
    assert [s for s in listening if not ipaddress.ip_address(s[1]).is_loopback] == []

    launcher.send_signal(signal.SIGTERM)  # what `kill PID` or a service manager sends
    launcher.wait(timeout=60)
    _wait(lambda: not _group(pgid), 30, "the Airflow process group to be gone")
    assert not _port_open(PORT)
    assert not (PIDS / "airflow.pid").exists() and not (PIDS / "airflow.pgid").exists()


def test_make_down_stops_airflow_even_after_its_launcher_was_killed(tmp_path, cleanup):
    launcher, pgid = _start(tmp_path, cleanup)
    launcher.send_signal(signal.SIGKILL)  # nothing can clean up after this one
    launcher.wait(timeout=30)
    time.sleep(2)
    orphans = _group(pgid)
    assert len(orphans) >= 3, (
        "killing the launcher alone stops nothing: the case `down` must handle"
    )

    result = subprocess.run(
        [sys.executable, "scripts/stack.py", "down", "airflow"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped airflow" in result.stdout
    assert not _group(pgid)
    _wait(lambda: not _port_open(PORT), 10, f"port {PORT} to be free")
