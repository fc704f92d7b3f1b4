"""Named locks held for hours behind a proxy that ends idle connections (a real TCP proxy in
front of the real MySQL server)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pipeline.db import Database, LockLost, named_lock
from tests.faults.idle_cutting_proxy import IdleCuttingProxy


@pytest.fixture
def proxied_db(db):
    """`db` reached through a proxy that ends a connection after 1.5 s without traffic."""
    proxy = IdleCuttingProxy(db.settings.host, db.settings.port, idle_s=1.5)
    try:
        yield Database(replace(db.settings, host="127.0.0.1", port=proxy.port)), proxy
    finally:
        proxy.close()


def test_a_held_lock_outlives_a_proxys_idle_timeout_while_its_holder_works(proxied_db):
    """The holder trains (or validates) for longer than the proxy lets a connection idle: the
    keep-alive pings keep the lock's connection, and the lock, through the idle time."""
    db, proxy = proxied_db
    with named_lock(db, "work", timeout_s=5, what="test", keepalive_s=0.3) as held:
        time.sleep(4)  # work elsewhere: nothing on the lock's connection but the pings
        held.ensure_held()
        with held.transaction() as cur:
            cur.execute("SELECT 1")
    assert proxy.cut == 0


def test_without_keep_alive_the_proxy_ends_the_idle_lock_connection(proxied_db):
    """The fault the keep-alive exists for: the idle connection is cut, the server releases
    the lock, and the holder finds out before its next protected write."""
    db, proxy = proxied_db
    with named_lock(db, "work", timeout_s=5, what="test", keepalive_s=None) as held:
        time.sleep(4)
        with pytest.raises(LockLost, match="was lost"):
            held.ensure_held()
    assert proxy.cut == 1
