"""The local stack listens on loopback only and keeps secrets out of argv and logs (scripts/stack.py).

Checks the running stack after `stack.py up`, and starts a private S3 and a private MLflow
through stack.py's own code (their own ports, state, log and pid folders), so the check never
depends on which services this checkout happened to start. Airflow's sockets are checked where
tests/integration/test_airflow_ui_process.py starts `stack.py airflow`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.faults.private_s3 import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack():
    spec = importlib.util.spec_from_file_location("stack_under_test", REPO / "scripts" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


def _beyond_loopback(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [s for s in sockets if not ipaddress.ip_address(s[1].split("%")[0]).is_loopback]


def _stack_processes(stack) -> list[psutil.Process]:
    procs = []
    for pid_file in sorted(stack.PIDS.glob("*.pid")):
        procs += _tree(int(pid_file.read_text().strip()))
    pgid_file = stack.PIDS / "airflow.pgid"
    if pgid_file.exists():
        procs += stack._group_members(int(pgid_file.read_text().strip()))
    return procs


def test_after_up_no_stack_process_listens_beyond_loopback(stack):
    result = subprocess.run(
        [sys.executable, "scripts/stack.py", "up"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Services found running (another checkout's, the machine's) are not this stack's: only
    # what stack.py started is looked at; the private instances below always are.
    assert _beyond_loopback(_listening(_stack_processes(stack))) == []


def test_a_fresh_s3_listens_on_loopback_only(stack, monkeypatch, tmp_path):
    monkeypatch.setattr(stack, "STATE", tmp_path / "state")
    monkeypatch.setattr(stack, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(stack, "PIDS", tmp_path / "pids")
    taken: set[int] = set()
    ports = {
        name: free_port(taken)
        for name in ("S3", "SEAWEED_MASTER_PORT", "SEAWEED_VOLUME_PORT", "SEAWEED_FILER_PORT")
    }
    env = stack.stack_env() | {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.pop('S3')}",
        **{name: str(port) for name, port in ports.items()},
    }
    try:
        stack.ensure_s3(env)
        pid = int((tmp_path / "pids" / "s3.pid").read_text())
        sockets = _listening(_tree(pid))
        assert len(sockets) >= 2, sockets  # at least the S3 API and the master
        assert _beyond_loopback(sockets) == []
    finally:
        stack.stop_process("s3")


def test_a_fresh_mlflow_listens_on_loopback_and_keeps_the_mysql_password_out_of_argv_and_log(
    stack, monkeypatch, tmp_path
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(stack, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(stack, "PIDS", tmp_path / "pids")
    env = stack.stack_env()
    password = env["MYSQL_PASSWORD"]
    assert password, "the check needs a MySQL password to look for"
    try:
        stack.ensure_mlflow(env)
        pid = int((tmp_path / "pids" / "mlflow.pid").read_text())
        procs = _tree(pid)
        sockets = _listening(procs)
        assert any(p == port for _, _, p in sockets), sockets
        assert _beyond_loopback(sockets) == []
        for proc in procs:
            try:
                argv = proc.cmdline()
            except psutil.NoSuchProcess:  # a worker that ended since it was listed
                continue
            assert password not in " ".join(argv), argv
        assert password not in (tmp_path / "logs" / "mlflow.log").read_text(errors="replace")
    finally:
        stack.stop_process("mlflow")
