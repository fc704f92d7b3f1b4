"""MySQL access: connections and versioned, idempotent schema migrations."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import pymysql
import pymysql.cursors

from pipeline.config import MySQLSettings
from pipeline.errors import ServiceUnavailable, is_transient

T = TypeVar("T")

log = logging.getLogger(__name__)

MIGRATION_LOCK = "imgpipe_schema_migrations"
# `wait_timeout` of a `named_lock` connection without keep-alive pings: a day, so the server
# keeps an idle holder's lock.
LOCK_IDLE_TIMEOUT_S = 86_400
# How often a held lock's connection is used while its holder works: below the idle timeouts of
# the proxies and load balancers in front of managed MySQL (minutes).
LOCK_KEEPALIVE_S = 60.0
# With pings, the server ends a lock's connection (and frees the lock) after this many missed
# ones: a holder whose host vanished without closing its connection (power loss, a partition)
# holds the lock minutes, not a day.
LOCK_MISSED_PINGS = 5
# Longest a read on a lock's connection waits for the server; lock waits are sliced below it.
LOCK_READ_TIMEOUT_S = 120
_LOCK_WAIT_SLICE_S = 60
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def utc_now() -> datetime:
    """Now in UTC, naive: what the DATETIME(6) columns hold (sessions run in UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Database:
    """Opens connections to one MySQL/MariaDB database; cheap to create, safe to pass around."""

    def __init__(self, settings: MySQLSettings) -> None:
        self.settings = settings

    @property
    def name(self) -> str:
        return self.settings.database

    def connect(
        self, *, autocommit: bool = False, read_timeout: float | None = None
    ) -> pymysql.connections.Connection:
        """A new connection (utf8mb4, UTC session time zone, dict rows off); `read_timeout`:
        seconds a read may wait for the server (None: no limit)."""
        s = self.settings
        try:
            return pymysql.connect(
                host=s.host,
                port=s.port,
                user=s.user,
                password=s.password,
                database=s.database,
                charset="utf8mb4",
                autocommit=autocommit,
                connect_timeout=10,
                read_timeout=read_timeout,
                init_command="SET time_zone = '+00:00'",
                ssl=s.ssl,
                unix_socket=s.unix_socket,
            )
        except pymysql.err.OperationalError as exc:
            raise ConnectionError(
                f"cannot connect to MySQL at {s.host}:{s.port} as {s.user!r} "
                f"(database {s.database!r}): {exc.args[-1]}; check MYSQL_* in .env "
                f"or the Airflow MySQL connection, and that `make up` ran"
            ) from exc

    @property
    def endpoint(self) -> str:
        """host:port/database, for messages."""
        return f"{self.settings.host}:{self.settings.port}/{self.settings.database}"

    @contextmanager
    def transaction(self) -> Iterator[pymysql.cursors.Cursor]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except BaseException:
            with contextlib.suppress(pymysql.err.Error):  # a killed connection cannot roll back
                conn.rollback()
            raise
        finally:
            with contextlib.suppress(pymysql.err.Error):
                conn.close()

    def transact(self, work: Callable[[pymysql.cursors.Cursor], T], *, attempts: int = 4) -> T:
        """`work(cursor)` in one transaction, rerun from the start when MySQL drops or kills
        the connection, or aborts it for a deadlock or lock wait (bounded, exponential
        backoff); then `ServiceUnavailable` naming MySQL. `work` must be safe to rerun.
        """

        def once() -> T:
            with self.transaction() as cur:
                return work(cur)

        return self._retrying(once, attempts)

    def _retrying(self, once: Callable[[], T], attempts: int) -> T:
        """`once()`, rerun on a lost or killed connection, a deadlock or a lock wait timeout."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, pymysql.err.Error | ConnectionError) and is_transient(exc)

        retrying = Retrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, max=8),
            before_sleep=lambda state: log.warning(
                "MySQL at %s: %s; retrying (attempt %d of %d)",
                self.endpoint,
                state.outcome.exception(),
                state.attempt_number + 1,
                attempts,
            ),
            reraise=True,
        )
        try:
            return retrying(once)
        except (pymysql.err.Error, ConnectionError) as exc:
            if transient(exc):
                raise ServiceUnavailable("MySQL", self.endpoint, str(exc)) from exc
            raise

    def query(
        self, sql: str, args: Sequence[Any] | dict[str, Any] | None = None, *, attempts: int = 4
    ) -> list[dict]:
        """Run one read query and return its rows as dicts; run again on a fresh connection
        when MySQL drops or kills the one it ran on (as `transact`)."""

        def once() -> list[dict]:
            conn = self.connect(autocommit=True)
            try:
                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall())
            finally:
                with contextlib.suppress(pymysql.err.Error):
                    conn.close()

        return self._retrying(once, attempts)

    def execute(self, sql: str, args: Sequence[Any] | dict[str, Any] | None = None) -> int:
        """Run one statement in its own transaction; returns affected rows."""
        with self.transaction() as cur:
            return cur.execute(sql, args)


# Characters of VALUES per statement `insert_rows` sends: at most 4 bytes each in utf8mb4, so a
# statement stays under 1 MB, as pymysql's executemany keeps it (max_allowed_packet is larger).
_MAX_STATEMENT_CHARS = 250_000


def insert_rows(cur: Any, head: str, rows: Iterable[Sequence[Any]], tail: str = "") -> int:
    """`head VALUES (...), (...) tail` for `rows` (few statements); returns affected rows.

    What `executemany` sends for an INSERT, escaped here at a fraction of its CPU: pymysql
    dispatches every value through its encoders, while a batch repeats most of its values
    (bucket, prefix, labels, timestamps), so each distinct string or datetime is escaped once.
    `head` is `INSERT INTO t (a, b, ...)`; values are str, int, None, datetime (or anything
    pymysql escapes).
    """
    conn = cur.connection
    literal = conn.literal
    memo: dict[Any, str] = {}
    affected, values, size = 0, [], 0
    for row in rows:
        parts = []
        for value in row:
            kind = type(value)
            if kind is int:
                parts.append(str(value))
            elif value is None:
                parts.append("NULL")
            elif kind is str or kind is datetime:
                text = memo.get(value)
                if text is None:
                    text = memo[value] = literal(value)
                parts.append(text)
            else:
                parts.append(literal(value))
        text = f"({','.join(parts)})"
        values.append(text)
        size += len(text) + 1
        if size > _MAX_STATEMENT_CHARS:
            affected += cur.execute(f"{head} VALUES {','.join(values)}{tail}")
            values, size = [], 0
    if values:
        affected += cur.execute(f"{head} VALUES {','.join(values)}{tail}")
    return affected


class LockTimeout(TimeoutError):
    """Another process held a MySQL named lock longer than this one could wait (transient)."""


class LockLost(ConnectionError):
    """The connection holding a MySQL named lock ended (a server restart or failover, a KILL,
    a network cut): the server released the lock and another process may hold it now
    (transient: the task fails before acting on it, and its retry takes the lock again)."""


def mysql_lock_name(db: Database, name: str) -> str:
    """The server-side name of `named_lock(db, name)`: scoped to `db`, hashed to 48 characters."""
    digest = hashlib.sha256(f"{db.name}\0{name}".encode()).hexdigest()[:40]
    return f"imgpipe_{digest}"


@dataclass
class HeldLock:
    """A named lock held by `connection` (see `named_lock`). Its methods may be called from
    any thread: they take turns on the connection."""

    name: str
    server_name: str
    connection: Any
    _turn: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _ping_failure: BaseException | None = field(default=None, repr=False)

    def ping(self) -> None:
        """Use the idle connection, so that nothing between here and the server (a proxy, a
        load balancer) ends it for idleness. A failure is for `ensure_held` to report."""
        with self._turn:
            if self._ping_failure is not None:
                return
            try:
                self.connection.ping(reconnect=False)
            except (pymysql.err.Error, OSError) as exc:
                self._ping_failure = exc
                log.warning("the MySQL connection holding the lock %r was lost: %s", self.name, exc)

    def ensure_held(self) -> None:
        """Raise `LockLost` unless this connection still holds the lock: call it right before
        the write the lock protects, since the server drops a lock with its connection."""
        try:
            with self._turn, self.connection.cursor() as cur:
                cur.execute("SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (self.server_name,))
                held = cur.fetchone()[0] == 1
        except pymysql.err.Error as exc:
            cause = self._ping_failure or exc  # a failed ping closed it: the real cause
            raise LockLost(
                f"the MySQL connection holding the lock {self.name!r} was lost ({cause});"
                " another process may hold it now: nothing was changed under it"
            ) from exc
        if not held:
            raise LockLost(
                f"the MySQL lock {self.name!r} is no longer held by this process (its connection"
                " was reset); nothing was changed under it"
            )

    def release(self) -> None:
        """RELEASE_LOCK (after a ping still under way); a lost connection released it already."""
        try:
            with self._turn, self.connection.cursor() as cur:
                cur.execute("SELECT RELEASE_LOCK(%s)", (self.server_name,))
        except pymysql.err.Error as exc:
            log.warning("releasing the MySQL lock %r: %s", self.name, exc)

    @contextmanager
    def transaction(self) -> Iterator[pymysql.cursors.Cursor]:
        """A transaction on the lock's own connection: it commits only while that connection,
        and so the lock, lives. A connection that ends on the way rolls it back (`LockLost`)."""
        with self._turn:  # the keep-alive ping waits until it ends
            self.ensure_held()
            conn = self.connection
            try:
                conn.begin()
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except pymysql.err.Error as exc:
                with contextlib.suppress(pymysql.err.Error):
                    conn.rollback()
                if is_transient(exc):
                    raise LockLost(
                        f"the MySQL connection holding the lock {self.name!r} was lost ({exc}):"
                        " its transaction was rolled back"
                    ) from exc
                raise
            except BaseException:
                with contextlib.suppress(pymysql.err.Error):
                    conn.rollback()
                raise


@contextmanager
def named_lock(
    db: Database,
    name: str,
    *,
    timeout_s: int,
    what: str,
    keepalive_s: float | None = LOCK_KEEPALIVE_S,
) -> Iterator[HeldLock]:
    """Hold the MySQL named lock `name` (GET_LOCK) for the `with` block, on its own connection.

    The server releases the lock when that connection ends, so a holder that is killed never
    leaves it behind; the other side of that coin is a holder whose connection ends while it
    works on: it must call `HeldLock.ensure_held()` before each write the lock protects.
    While the block runs, a thread pings the connection every `keepalive_s` seconds (None: never)
    so that no proxy or load balancer on the way ends it as idle during hours of work.
    Names are scoped to `db` and hashed (MySQL allows 64 characters). `what` names the work
    the lock serialises, for the timeout's message.
    """
    lock = mysql_lock_name(db, name)
    # No read on it waits past LOCK_READ_TIMEOUT_S: a connection cut without a reset (a
    # black-holed network, a stalled proxy) fails the ping instead of hanging the holder.
    conn = db.connect(autocommit=True, read_timeout=LOCK_READ_TIMEOUT_S)
    try:
        with conn.cursor() as cur:
            # The connection idles between the pings while its holder works (hours, for a
            # training): the server ends it (`wait_timeout`) only after pings stop coming.
            cur.execute("SET SESSION wait_timeout = %s", (lock_idle_timeout_s(keepalive_s),))
            _get_lock(cur, lock, name=name, timeout_s=timeout_s, what=what)
        held = HeldLock(name, lock, conn)
        try:
            with _kept_alive(held, keepalive_s):
                yield held
        finally:
            held.release()
    finally:
        conn.close()


def lock_idle_timeout_s(keepalive_s: float | None) -> int:
    """`wait_timeout` of a lock's connection pinged every `keepalive_s` seconds (None: never)."""
    if keepalive_s is None:
        return LOCK_IDLE_TIMEOUT_S
    return max(10, math.ceil(LOCK_MISSED_PINGS * keepalive_s))


@contextmanager
def _kept_alive(held: HeldLock, every_s: float | None) -> Iterator[None]:
    """`held.ping()` every `every_s` seconds on a daemon thread while the block runs."""
    if every_s is None:
        yield
        return
    stop = threading.Event()

    def ping() -> None:
        while not stop.wait(every_s):
            held.ping()

    thread = threading.Thread(target=ping, name=f"lock-keepalive {held.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=LOCK_READ_TIMEOUT_S + 5)  # a ping under way ends by then


def _get_lock(cur: Any, lock: str, *, name: str, timeout_s: int, what: str) -> None:
    """GET_LOCK on `cur`'s connection; says who holds it before waiting for it."""
    cur.execute("SELECT GET_LOCK(%s, 0)", (lock,))
    if cur.fetchone()[0] == 1:
        return
    cur.execute("SELECT IS_USED_LOCK(%s)", (lock,))
    holder = cur.fetchone()[0]
    log.info(
        "waiting up to %ss for another %s to finish (MySQL connection %s holds the lock %r)",
        timeout_s,
        what,
        holder,
        name,
    )
    # In slices shorter than the connection's read timeout (`named_lock`).
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        cur.execute("SELECT GET_LOCK(%s, %s)", (lock, max(1, min(int(left), _LOCK_WAIT_SLICE_S))))
        if cur.fetchone()[0] == 1:
            return
    raise LockTimeout(
        f"another {what} held the MySQL lock {name!r} for more than {timeout_s}s;"
        " wait for it to finish (a killed holder releases it at once)"
    )


def create_database(settings: MySQLSettings, name: str) -> Database:
    """Create the empty database `name` (utf8mb4, binary collation: labels compare exactly) on
    the server of `settings`, reachable with its account; returns it. For throwaway test/bench databases."""
    Database(settings).execute(
        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    )
    return Database(replace(settings, database=name))


def drop_database(settings: MySQLSettings, name: str) -> None:
    """Drop the database `name` if it exists (the counterpart of `create_database`)."""
    Database(settings).execute(f"DROP DATABASE IF EXISTS `{name}`")


def available_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every `pipeline/migrations/NNNN_name.sql`, in order."""
    found = []
    for entry in resources.files("pipeline.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration numbers in pipeline/migrations: {versions}")
    return found


def split_statements(sql: str) -> list[str]:
    """Split a migration file on `;` at line ends, dropping `--` comment lines."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    statements, current = [], []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";"))
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return [s for s in statements if s]


# "Duplicate column name" / "Duplicate key name": an ALTER that an interrupted run of the same
# migration already applied (MySQL 8.4 has no ADD COLUMN IF NOT EXISTS; DDL is not transactional).
_ALREADY_APPLIED = (1060, 1061)
_UNKNOWN_COLUMN = 1054
_RENAME = re.compile(r"ALTER\s+TABLE\s+`?(\w+)`?\s+CHANGE\s+COLUMN\s+`?(\w+)`?\s+`?(\w+)`?", re.I)


def apply_migration(cur, sql: str) -> None:
    """Run one migration's statements; each may have run before (a run killed before the
    migration was recorded): such a statement is skipped, anything else raises."""
    for statement in split_statements(sql):
        _execute_ddl(cur, statement)


def _execute_ddl(cur, statement: str) -> None:
    try:
        cur.execute(statement)
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else None
        if not (code in _ALREADY_APPLIED or code == _UNKNOWN_COLUMN and _renamed(cur, statement)):
            raise
        log.info("already applied (%s): %s", exc.args[1], statement.splitlines()[0][:120])


def _renamed(cur, statement: str) -> bool:
    """True when `statement` renames a column (CHANGE COLUMN old new) that already has its new
    name: the rename ran before."""
    found = _RENAME.search(statement)
    if not found:
        return False
    table, _, new = found.groups()
    cur.execute(
        "SELECT COUNT(*) FROM information_schema.columns"
        " WHERE table_schema = DATABASE() AND table_name = %s AND column_name = %s",
        (table, new),
    )
    return cur.fetchone()[0] == 1


def migrate(db: Database, *, timeout_s: int = 60) -> list[int]:
    """Apply pending migrations in order; returns the versions applied now.

    Safe to call from many processes at once: a named lock serialises them and each
    version is recorded in `schema_migrations`, so every migration runs exactly once.
    """
    conn = db.connect(autocommit=True)
    applied_now: list[int] = []
    try:
        with conn.cursor() as cur:
            lock = mysql_lock_name(db, MIGRATION_LOCK)  # within MySQL's 64 characters
            _get_lock(cur, lock, name=MIGRATION_LOCK, timeout_s=timeout_s, what="schema migration")
            try:
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INT PRIMARY KEY, name VARCHAR(200) NOT NULL,"
                    " applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"
                    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
                )
                cur.execute("SELECT version FROM schema_migrations")
                done = {row[0] for row in cur.fetchall()}
                for version, name, sql in available_migrations():
                    if version in done:
                        continue
                    log.info("applying migration %04d_%s to %s", version, name, db.name)
                    apply_migration(cur, sql)
                    cur.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                    applied_now.append(version)
            finally:
                cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
    finally:
        conn.close()
    return applied_now
