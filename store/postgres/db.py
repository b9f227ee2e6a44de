"""The PostgreSQL store's connections: one psycopg pool, reads and transactions, counted round trips and bytes.

`Db.read(op, fn)` runs fn(Tx) on a pooled connection in autocommit mode: each read of the store is one SQL
statement, which PostgreSQL runs in one snapshot. `Db.write(op, fn)` runs fn(Tx) inside
`with conn.transaction():` (READ COMMITTED; each write locks the rows it reads before it changes them), all or
nothing: anything raised inside rolls it back. A deadlock or serialization failure between two writes is
retried (the write is a function of its arguments). Every statement, BEGIN and COMMIT is one round trip,
counted per op with the bytes of bytea values sent and received (`IoCounters`); a COPY of many rows is one.

Errors: psycopg's become StoreError naming the database (without its password) and what to do; a database
that cannot be reached (down, restarting, no connection free within `timeout`) StoreUnavailable; after one,
each call first probes the database with one connection (still down: StoreUnavailable at once; back: a fresh
pool replaces the broken one; one probe at a time, the calls meanwhile answer StoreUnavailable without waiting
for it). A read whose connection is lost is tried once more, and so is a write whose connection is lost before
its COMMIT was sent: the database rolled it back, nothing of it landed (a pooled connection the database ended
meanwhile, by a restart or by idle_in_transaction_session_timeout while this process was paused, costs the
caller nothing). Lost again, StoreUnavailable: nothing changed, the caller may retry. A write lost at COMMIT may
have landed (OutcomeUnknown, a StoreUnavailable), which is not tried again and the caller must not simply repeat;
StoreError("... closed") after close(), StoreError("... read-only") for a write on a read-only store.

Every connection has idle_in_transaction_session_timeout set (IDLE_IN_TRANSACTION; a URL's own `options` may
set another): the database ends a transaction whose client stopped in its middle (a replica paused, or cut off
from the database), so that its row locks (a lease row a commit holds FOR SHARE) do not hold other replicas off
for as long as it stays stopped. Its own transactions never idle that long: their statements follow each other.
Knows psycopg and SQL statements; knows nothing about what the tables hold.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Iterable, Sequence, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import OutcomeUnknown, StoreError, StoreUnavailable

T = TypeVar("T")
RETRIES = 3
# what a call meets on a connection the database ended or lost: unreachable() tells which of these it was
_LOST = (psycopg.OperationalError, pg_errors.IdleInTransactionSessionTimeout)
IDLE_IN_TRANSACTION = 10.0  # seconds a transaction may wait for its client's next statement


def describe(url: str) -> str:
    """The database a URL names, for messages: postgresql://user@host:port/db (never the password); a multi-host
    URL (libpq tries its hosts in turn: a primary and its standbys) as postgresql://user@h1:p1,h2:p2/db."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable URL)"
    user = f"{d['user']}@" if d.get("user") else ""
    hosts = str(d.get("host", "")).split(",")
    ports = str(d["port"]).split(",") if d.get("port") else [""]
    if len(ports) == 1:  # one port for every host
        ports = ports * len(hosts)
    where = ",".join(h + (f":{p}" if p else "") for h, p in itertools.zip_longest(hosts, ports, fillvalue=""))
    return f"postgresql://{user}{where}/{d.get('dbname', '')}"


def _nbytes(values) -> int:
    """Bytes of the bytes-like values in values (nested lists and tuples too)."""
    n = 0
    for v in values:
        if isinstance(v, (bytes, bytearray, memoryview)):
            n += len(v)
        elif isinstance(v, (list, tuple)):
            n += _nbytes(v)
    return n


def unreachable(exc: BaseException) -> bool:
    """Whether a psycopg error says the database cannot be reached (no SQLSTATE: the connection failed; 08:
    connection exception; 57: operator intervention, such as a shutdown; 53: too many connections; or the
    connection ended by idle_in_transaction_session_timeout), rather than that a statement failed."""
    if isinstance(exc, pg_errors.IdleInTransactionSessionTimeout):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    return exc.sqlstate is None or exc.sqlstate[:2] in ("08", "57", "53")


def locked(exc: StoreError) -> bool:
    """Whether a StoreError of Db.write came from a statement that waited past its lock_timeout for a row lock."""
    return isinstance(exc.__cause__, pg_errors.LockNotAvailable)


class IoCounters:
    """Round trips per op, and bytea bytes read and written, since the store was opened."""

    def __init__(self):
        self._lock = threading.Lock()
        self.round_trips: dict[str, int] = {}
        self.bytes_read = 0
        self.bytes_written = 0

    def add(self, op: str, trips: int, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.round_trips[op] = self.round_trips.get(op, 0) + trips
            self.bytes_read += read
            self.bytes_written += written

    def snapshot(self) -> dict:
        with self._lock:
            return {"round_trips": dict(self.round_trips), "bytes_read": self.bytes_read,
                    "bytes_written": self.bytes_written}


class Tx:
    """One connection inside a read (autocommit) or a write (a transaction). Every statement that changes
    rows goes through `write` or `copy` (what tests make fail); reads through `rows`."""

    __slots__ = ("conn", "io", "op")

    def __init__(self, conn: psycopg.Connection, io: IoCounters, op: str):
        self.conn, self.io, self.op = conn, io, op

    def _run(self, sql: str, params) -> list[tuple]:
        with self.conn.cursor(binary=True) as cur:
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description is not None else []
        self.io.add(self.op, 1, sum(_nbytes(r) for r in rows), _nbytes(params or ()))
        return rows

    def rows(self, sql: str, params: Sequence | dict | None = None) -> list[tuple]:
        """The rows of a query that changes nothing."""
        return self._run(sql, params)

    def one(self, sql: str, params: Sequence | dict | None = None) -> tuple | None:
        rows = self._run(sql, params)
        return rows[0] if rows else None

    def write(self, sql: str, params: Sequence | dict | None = None) -> list[tuple]:
        """Run a statement that changes rows; its RETURNING rows ([] without)."""
        return self._run(sql, params)

    def copy(self, sql: str, rows: Iterable[tuple], types: Sequence[str]) -> None:
        """COPY ... FROM STDIN (FORMAT BINARY) of rows of `types`: one round trip for any number of rows."""
        sent = 0
        with self.conn.cursor() as cur:
            with cur.copy(sql) as cp:
                cp.set_types(list(types))
                for row in rows:
                    cp.write_row(row)
                    sent += _nbytes(row)
        self.io.add(self.op, 1, 0, sent)


class Db:
    """A pool of connections to one database."""

    def __init__(self, url: str, *, readonly: bool, pool_min: int = 1, pool_max: int = 10,
                 timeout: float = 30.0):
        self.where = describe(url)
        self.readonly = readonly
        self.io = IoCounters()
        idle = f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION * 1000)}"
        options = f"{idle} {conninfo_to_dict(url).get('options', '')}".strip()  # the URL's own come last: they win
        if readonly:
            options = f"{options} -c default_transaction_read_only=on".strip()
        extra = {"options": options} if options else {}
        if "connect_timeout" not in conninfo_to_dict(url):
            extra["connect_timeout"] = max(2, int(timeout))
        self.conninfo = make_conninfo(url, application_name="memsvc", **extra)
        self._cond = threading.Condition()
        self._running = 0
        self.closed = False
        self._sizes, self._timeout = (pool_min, pool_max), timeout
        self._down = False  # a call found the database unreachable: the next ones probe it first
        self._probe_lock = threading.Lock()  # held by the one call probing the database
        self._last_error = ""  # what the last call that found the database unreachable was told
        self.pool = self._new_pool()

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(self.conninfo, min_size=self._sizes[0], max_size=self._sizes[1], timeout=self._timeout,
                              reconnect_timeout=max(self._timeout, 1.0), kwargs={"autocommit": True}, open=False,
                              name="memsvc-store")

    def connect(self, timeout: float = 10.0) -> psycopg.Connection:
        """One connection outside the pool (for migrations), autocommit."""
        try:
            return psycopg.connect(self.conninfo, autocommit=True, connect_timeout=max(1, int(timeout)))
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to the database {self.where}: {str(exc).strip()}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the database {self.where}: {str(exc).strip()}") from exc

    def open(self) -> None:
        try:
            self.pool.open(wait=True, timeout=30.0)
        except PoolTimeout as exc:
            self.pool.close()
            raise StoreError(f"cannot open connections to the database {self.where} within 30 s") from exc

    def close(self) -> None:
        """Refuse new calls, wait for the running ones, close the pool. Idempotent."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            while self._running:
                self._cond.wait()
        self.pool.close()

    def _enter(self) -> None:
        with self._cond:
            if self.closed:
                raise StoreError(f"the store at {self.where} is closed")
            self._running += 1

    def _leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store at {self.where} is open read-only")

    def _failed(self, exc: Exception, at_commit: bool = False) -> StoreError:
        """The StoreError for a psycopg or pool error; at_commit: it came from a write's COMMIT."""
        if isinstance(exc, pg_errors.IdleInTransactionSessionTimeout):
            return StoreUnavailable(f"the database {self.where} ended this call's transaction, which had waited "
                                    f"past idle_in_transaction_session_timeout for this process (paused, or cut off "
                                    f"from the database): nothing of it was written; retry it")
        if isinstance(exc, PoolTimeout):
            return StoreUnavailable(f"the database {self.where} is unavailable: no connection to it within "
                                    f"{self.pool.timeout:g} s ({exc}); is it running? The call changed nothing; "
                                    f"retry it once the database is back")
        if unreachable(exc) and at_commit:
            return OutcomeUnknown(f"the database {self.where} became unavailable at the COMMIT of this write: "
                                  f"{str(exc).strip()}; it may or may not have landed: once the database is back, "
                                  f"read the session again, and retry the call only if it did not land")
        if unreachable(exc):
            return StoreUnavailable(f"the database {self.where} is unavailable: {str(exc).strip()}; the call "
                                    f"changed nothing; retry it once the database is back")
        return StoreError(f"the database {self.where} refused a statement: {type(exc).__name__}: "
                          f"{str(exc).strip()}")

    def _pool(self) -> ConnectionPool:
        """The pool to take a connection from. While the database is known down, one quick connection first
        tells whether it is back: still down, StoreUnavailable at once (not after the pool's timeout); back, a
        fresh pool replaces the old one, whose connections are broken and whose reconnection attempts are
        backing off (it is closed aside). One call probes at a time, and the others do not wait for it: where
        the server's address swallows connections (a frozen server, a dead machine), a probe takes the whole
        connect_timeout, and calls queued behind it would each wait for all those before it."""
        if not self._down:
            return self.pool
        if not self._probe_lock.acquire(blocking=False):
            raise StoreUnavailable(f"the database {self.where} is unavailable (another call is checking whether it "
                                   f"is back; the last error: {self._last_error}); the call changed nothing; retry "
                                   f"it once the database is back")
        try:
            if self._down:
                try:
                    psycopg.connect(self.conninfo, autocommit=True).close()
                except psycopg.Error as exc:
                    self._last_error = str(exc).strip()
                    raise self._failed(exc) from exc
                old, self.pool = self.pool, self._new_pool()
                self.pool.open(wait=False)
                self._down = False
                threading.Thread(target=old.close, kwargs={"timeout": 1.0}, name="memsvc-old-pool",
                                 daemon=True).start()
            return self.pool
        finally:
            self._probe_lock.release()

    def _lost(self, exc: BaseException) -> None:
        if isinstance(exc, PoolTimeout) or unreachable(exc):
            self._last_error = str(exc).strip()
            self._down = True

    def read(self, op: str, fn: Callable[[Tx], T]) -> T:
        self._enter()
        try:
            for attempt in (1, 2):
                try:
                    with self._pool().connection() as conn:
                        return fn(Tx(conn, self.io, op))
                except _LOST as exc:
                    if attempt == 2 or not unreachable(exc):
                        raise
                    self._lost(exc)  # a broken pooled connection: the retry probes, then uses a fresh pool
        except (psycopg.Error, PoolTimeout) as exc:
            self._lost(exc)
            raise self._failed(exc) from exc
        finally:
            self._leave()

    def _transaction(self, op: str, fn: Callable[[Tx], T], committing: list[bool]) -> T:
        """fn(tx) in one transaction; committing[0] is set once fn has returned (the COMMIT is next)."""
        committing[0] = False
        with self._pool().connection() as conn:
            self.io.add(op, 1)  # BEGIN
            try:
                with conn.transaction():
                    result = fn(Tx(conn, self.io, op))
                    committing[0] = True  # leaving the block sends COMMIT
                return result
            finally:
                self.io.add(op, 1)  # COMMIT or ROLLBACK

    def write(self, op: str, fn: Callable[[Tx], T]) -> T:
        """fn(tx) in one transaction, all or nothing; rerun after a deadlock or serialization failure, and once
        after its connection was lost before the COMMIT was sent."""
        self.check_writable()
        self._enter()
        committing = [False]
        try:
            attempt, reconnected = 1, False
            while True:
                try:
                    return self._transaction(op, fn, committing)
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    if attempt == RETRIES:
                        raise
                    time.sleep(0.01 * attempt)
                    attempt += 1
                except _LOST as exc:
                    if committing[0] or reconnected or not unreachable(exc):
                        raise  # lost at COMMIT (it may have landed), lost twice, or a statement refused
                    self._lost(exc)  # rolled back: once more, after a probe, on a fresh pool
                    reconnected = True
        except (psycopg.Error, PoolTimeout) as exc:
            self._lost(exc)
            raise self._failed(exc, at_commit=committing[0]) from exc
        finally:
            self._leave()
