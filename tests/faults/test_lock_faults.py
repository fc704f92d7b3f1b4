"""Named locks held for hours behind a network that ends idle connections or swallows packets
(a real TCP proxy in front of the real MySQL server)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pipeline import db as db_module
from pipeline.db import Database, LockLost, named_lock
from tests.faults.tcp_fault_proxy import TcpFaultProxy


@pytest.fixture
def proxied_db(db):
    """`db` reached through a proxy that ends a connection after 3 s without traffic."""
    proxy = TcpFaultProxy(db.settings.host, db.settings.port, idle_s=3)
    try:
        yield Database(replace(db.settings, host="127.0.0.1", port=proxy.port)), proxy
    finally:
        proxy.close()


def test_a_held_lock_outlives_a_proxys_idle_timeout_while_its_holder_works(proxied_db):
    """The holder trains (or validates) for longer than the proxy lets a connection idle: the
    keep-alive pings keep the lock's connection, and the lock, through the idle time."""
    db, proxy = proxied_db
    with named_lock(db, "work", timeout_s=5, what="test", keepalive_s=0.3) as held:
        time.sleep(7)  # work elsewhere: nothing on the lock's connection but the pings
        held.ensure_held()
        with held.transaction() as cur:
            cur.execute("SELECT 1")
    assert proxy.cut == 0


def test_without_keep_alive_the_proxy_ends_the_idle_lock_connection(proxied_db):
    """The fault the keep-alive exists for: the idle connection is cut, the server releases
    the lock, and the holder finds out before its next protected write."""
    db, proxy = proxied_db
    with named_lock(db, "work", timeout_s=5, what="test", keepalive_s=None) as held:
        time.sleep(7)
        with pytest.raises(LockLost, match="was lost"):
            held.ensure_held()
    assert proxy.cut == 1


def test_a_lock_connection_that_goes_silent_fails_the_holder_instead_of_hanging_it(db, monkeypatch):
    """The network swallows everything (no reset): the keep-alive ping's read times out, the
    holder's next check raises `LockLost` naming the timeout, and leaving the block (which
    releases the lock) does not hang either."""
    monkeypatch.setattr(db_module, "LOCK_READ_TIMEOUT_S", 2)
    proxy = TcpFaultProxy(db.settings.host, db.settings.port)
    proxied = Database(replace(db.settings, host="127.0.0.1", port=proxy.port))
    try:
        started = time.monotonic()
        with named_lock(proxied, "work", timeout_s=5, what="test", keepalive_s=0.3) as held:
            proxy.black_hole()
            time.sleep(3)  # a ping went out and waited its 2 s for the answer
            with pytest.raises(LockLost, match="timed out"):
                held.ensure_held()
        assert time.monotonic() - started < 30
        assert proxy.swallowed >= 1
    finally:
        proxy.close()


def test_a_holder_whose_host_vanished_frees_the_lock_after_its_missed_pings(db):
    """A holder process stopped dead (SIGSTOP: as a host that lost power or its network, which
    closes no connection) stops pinging: the server ends its connection after the missed pings
    and the lock is free (before: it was held until the 24 h `wait_timeout`, and every scan or
    retry of that key timed out meanwhile)."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import time; from pipeline.config import load_settings; from pipeline.db import"
        " Database, named_lock\n"
        "with named_lock(Database(load_settings().mysql), 'vanishing', timeout_s=5, what='t',"
        " keepalive_s=1):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    env = {**os.environ, "MYSQL_DATABASE": db.name}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        holder.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with named_lock(db, "vanishing", timeout_s=60, what="test", keepalive_s=None):
            waited = time.monotonic() - started
        assert waited <= db_module.lock_idle_timeout_s(1) + 15
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_read_whose_connection_is_killed_runs_again(db, caplog):
    """MySQL ends the connection of a read (KILL, as a failover or a proxy does): the read runs
    again on a fresh connection and returns its rows (before: the error failed the task; the
    page queries of a scoring shard are such reads)."""
    import logging
    import threading

    caplog.set_level(logging.WARNING, logger="pipeline.db")
    rows: list = []
    reader = threading.Thread(target=lambda: rows.append(db.query("SELECT SLEEP(2) AS s, 7 AS v")))
    reader.start()
    running = "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(2)%%'"
    deadline = time.monotonic() + 30
    while not (found := db.query(running)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found, "the read never started"
    db.execute("KILL CONNECTION %s", (found[0]["ID"],))
    reader.join(timeout=60)
    assert rows == [[{"s": 0, "v": 7}]]
    assert any("retrying" in r.getMessage() for r in caplog.records)
