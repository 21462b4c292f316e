"""The PostgreSQL backend: one store shared by every CI host that reaches the database.

Selected by a ``postgresql://`` (or ``postgres://``) URL as the store; needs psycopg 3
(``pip install 'pytest-runs[postgres]'``). Credentials come from the URL, the ``PG*``
environment variables or ``~/.pgpass``, as libpq reads them; a password never appears in
a message (:func:`mask`). The URL may name the schema to use with ``?schema=NAME``
(default ``pytest_runs``); it is created, with its tables, on first write.

What the database itself guarantees, not only this code:

- **One active run per machine**: a partial unique index on ``runs(machine)`` for pending
  and running runs. Every write transaction also takes a transaction-level advisory lock,
  so the store's rules run one writer at a time, as with the file backend's ``flock``,
  waited for at most the lock timeout (``lock_timeout``), then :class:`StoreLocked`.
- **Fences** count in ``machines.fence``, updated in the transaction that makes a run active.
- **Liveness from the server.** A session holds a session-level advisory lock keyed by its
  owner token on a connection of its own, with TCP keepalives on both ends. The server
  lets it go when that connection ends (the process died, ``pg_terminate_backend``, a
  vanished host once keepalives give up), and readers ask ``pg_locks``; a paused owner
  whose connection is open keeps its machine. Heartbeats and leases use ``now()``, the
  database's clock.
- **Waiting without polling.** A waiter listens (``LISTEN``) for runs that end, which every
  ending ``NOTIFY``s, and at the same time asks for a shared lock on the holder's
  liveness key, which the server grants the moment the holder lets go or dies.
- **Schema versions** in ``meta``; a newer schema is refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import InvalidTransition, StateError, StoreLocked, StoreUnreachable
from .liveness import DEFAULT_LEASE
from .model import Run, Status
from .queue import Waiter
from .settings import mask_url

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCHEMA_VERSION", "PgBackend", "is_database_url", "mask"]

#: The schema this version creates, and the newest it uses.
SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "pytest_runs"
#: The advisory lock every write transaction takes (its value spells "runs").
_STORE_LOCK = 0x72756E73
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ACTIVE = "('pending', 'running')"
# Keepalives on the owner's connection: a vanished host frees its machine within a minute.
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3"}


def is_database_url(text: str) -> bool:
    """Whether ``text`` names a PostgreSQL store rather than a state dir."""
    return text.startswith(("postgresql://", "postgres://"))


def mask(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and records."""
    return mask_url(url)


def _split_schema(url: str) -> tuple[str, str]:
    """The libpq URL without our ``schema`` parameter, and the schema."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA_NAME.match(schema):
        raise StateError(f"store {mask(url)}: schema {schema!r} must be a lower-case SQL name (letters, digits, _)")
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schema


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as error:
        raise StateError(
            f"a postgresql:// store needs psycopg 3 ({error}); install it with: pip install 'pytest-runs[postgres]'"
        ) from None
    return psycopg


def _signed_key(token: str) -> int:
    """An owner token's advisory lock key, as the signed 64-bit number the lock functions take."""
    value = int(token[:16], 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def _lock_key(token: str) -> tuple[int, int]:
    """The two 32-bit halves of an owner token's advisory lock key, as ``pg_locks`` shows them."""
    value = int(token[:16], 16)
    return value >> 32, value & 0xFFFFFFFF


class PgBackend:
    """Runs kept in a PostgreSQL schema; see the module docs. One transaction at a time per object."""

    def __init__(self, url: str, *, lock_timeout: float) -> None:
        self.url = url
        self.location = mask(url)
        try:
            _ = urllib.parse.urlsplit(url).port
        except ValueError as error:
            raise StateError(f"store {self.location} is not a valid URL: {error}") from None
        self.wakes_on_change = True
        self.lock_timeout = lock_timeout
        self.conninfo, self.schema = _split_schema(url)
        self._psycopg = _driver()
        self._conn: psycopg.Connection[Any] | None = None
        self._socket: tuple[int, int] | None = None  # what self._conn's descriptor named when it was opened
        self._mutex = threading.Lock()
        self._inside = threading.local()
        self._ready = False
        self._waiter: _Waiter | None = None

    # -- connections ------------------------------------------------------------------

    def connect(self, **extra: Any) -> psycopg.Connection[Any]:
        """A new connection; :class:`StoreUnreachable` naming the masked URL if there is none."""
        timeout = max(1, min(int(self.lock_timeout), 30))
        try:
            return self._psycopg.connect(  # type: ignore[no-any-return]
                self.conninfo, connect_timeout=timeout, application_name="pytest-runs", **extra
            )
        except self._psycopg.Error as error:
            raise self.unreachable(error) from None

    def unreachable(self, error: BaseException) -> StoreUnreachable:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if password := urllib.parse.urlsplit(self.url).password:
            detail = detail.replace(password, "***").replace(urllib.parse.quote(password), "***")
        return StoreUnreachable(f"cannot reach the store {self.location}: {detail}")

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and _socket_of(self._conn) != self._socket:
            _abandoned.append(self._conn)  # closed under us (os.closerange): never close its number again
            self._conn = None
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
            self._socket = _socket_of(self._conn)
        return self._conn

    def close(self) -> None:
        """Close this backend's connections (a new one is opened on the next call)."""
        self.stop_waiting()
        if self._conn is not None and not self._conn.closed and _socket_of(self._conn) != self._socket:
            _abandoned.append(self._conn)
            self._conn = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- transactions -----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, write: bool, durable: bool = True) -> Iterator[PgTransaction]:
        """A critical section; see :class:`pytest_runs.backend.Backend`."""
        psycopg = self._psycopg
        if getattr(self._inside, "active", False):
            raise RuntimeError(f"store {self.location} was called again from inside one of its operations (from mk?)")
        if not self._mutex.acquire(timeout=self.lock_timeout):
            raise StoreLocked(f"store {self.location} is busy in another thread for over {self.lock_timeout:g}s", [])
        try:
            self._inside.active = True
            conn = self._connection()
            try:
                if write and not self._ready:
                    self._ensure_schema(conn)
                with conn.transaction():
                    cursor = conn.cursor()
                    if not write:
                        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    cursor.execute(f"SET LOCAL lock_timeout = '{max(1, int(self.lock_timeout * 1000))}ms'")
                    if not durable:
                        cursor.execute("SET LOCAL synchronous_commit = off")
                    if write:
                        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_STORE_LOCK,))
                    elif not self._ready:
                        self._check_schema(cursor, create=False)
                    yield PgTransaction(self, cursor, missing=not self._ready)
            except psycopg.errors.LockNotAvailable:
                raise StoreLocked(
                    f"store {self.location} has been locked by another session for more than "
                    f"{self.lock_timeout:.3g}s; if that process is stuck, stop it",
                    [],
                ) from None
            except psycopg.errors.UniqueViolation as error:
                raise InvalidTransition(f"the database refused a second active run on a machine: {error}") from None
            except (psycopg.DataError, UnicodeEncodeError) as error:
                raise ValueError(f"store {self.location} cannot hold this value: {error}") from None
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                self.close()
                raise self.unreachable(error) from None
        finally:
            self._inside.active = False
            self._mutex.release()

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            cursor = conn.cursor()
            cursor.execute(f"SET LOCAL lock_timeout = '{max(1, int(self.lock_timeout * 1000))}ms'")
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_STORE_LOCK,))
            self._check_schema(cursor, create=True)

    def _check_schema(self, cursor: psycopg.Cursor[Any], *, create: bool) -> None:
        s = self.schema
        cursor.execute("SELECT to_regclass(%s)", (f"{s}.meta",))
        row = cursor.fetchone()
        if row is None or row[0] is None:
            if not create:
                return  # nothing to read, and looking must not create the store
            for statement in _schema_statements(s):
                cursor.execute(statement)
            cursor.execute(f"INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s)", (str(SCHEMA_VERSION),))
            self._ready = True
            return
        cursor.execute(f"SELECT value FROM {s}.meta WHERE key = 'schema_version'")
        found = cursor.fetchone()
        version = int(found[0]) if found and str(found[0]).isdigit() else None
        if version is None:
            raise StateError(f"store {self.location}: schema {s} has no valid schema_version in {s}.meta")
        if version > SCHEMA_VERSION:
            raise StateError(
                f"store {self.location}: schema {s} has version {version}, newer than this pytest-runs uses "
                f"({SCHEMA_VERSION}); upgrade pytest-runs"
            )
        self._ready = True

    # -- liveness ---------------------------------------------------------------------

    def liveness_lock(self) -> PgOwnerLock:
        """A session-level advisory lock on a connection of its own, already held."""
        lock = PgOwnerLock(self)
        lock.acquire()
        return lock

    def wait_for_change(self, holder: Run, timeout: float) -> bool:
        """Return when a run ends (``NOTIFY``) or ``holder``'s owner lets go or dies, or after ``timeout``.

        The waiting connections are kept from one call to the next while the holder is the
        same, so that a caller may wait in short steps (to show progress) at no cost.
        """
        waiter = self._waiter
        if waiter is not None and waiter.token != holder.owner_token:
            self.stop_waiting()
            waiter = None
        try:
            if waiter is None:
                waiter = self._waiter = _Waiter(self, holder.owner_token)
            if waiter.wait(timeout):
                self.stop_waiting()
                return True
        except (self._psycopg.Error, OSError, StateError):
            self.stop_waiting()
            time.sleep(max(0.0, min(1.0, timeout)))
            return True
        return False

    def stop_waiting(self) -> None:
        """Close the connections of :meth:`wait_for_change`."""
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None


class _Waiter:
    """A waiting session's two connections: one listening for ended runs, one asking for the holder's lock."""

    def __init__(self, backend: PgBackend, token: str) -> None:
        self.token = token
        self.listener = backend.connect(autocommit=True)
        self.watcher: psycopg.Connection[Any] | None = None
        try:
            self.listener.execute(f"LISTEN {backend.schema}_ended")
            if token:
                self.watcher = backend.connect(autocommit=True)
                # Granted by the server the moment the holder lets go or its session ends.
                self.watcher.pgconn.send_query(f"SELECT pg_advisory_lock_shared({_signed_key(token)}::bigint)".encode())
        except BaseException:
            self.close()
            raise

    def wait(self, timeout: float) -> bool:
        """Whether something changed within ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        sockets = [self.listener.fileno()] + ([self.watcher.fileno()] if self.watcher is not None else [])
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(sockets, [], [], left)
            if self.listener.fileno() in readable and any(True for _ in self.listener.notifies(timeout=0)):
                return True
            if self.watcher is not None and self.watcher.fileno() in readable:
                self.watcher.pgconn.consume_input()
                if not self.watcher.pgconn.is_busy():
                    return True  # the holder's lock was granted to us: it let go or died
        return False

    def close(self) -> None:
        for conn in (self.watcher, self.listener):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


def _schema_statements(s: str) -> list[str]:
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE {s}.runs (
            id text PRIMARY KEY,
            machine text NOT NULL CHECK (machine <> ''),
            status text NOT NULL CHECK (status IN
                ('pending', 'running', 'completed', 'failed', 'interrupted', 'timeout')),
            record json NOT NULL
        )""",
        # The invariant, enforced by the database: at most one active run per machine.
        f"CREATE UNIQUE INDEX runs_one_active_run_per_machine ON {s}.runs (machine) WHERE status IN {_ACTIVE}",
        f"CREATE INDEX runs_ended_by_machine ON {s}.runs (machine, id) WHERE status NOT IN {_ACTIVE}",
        f"CREATE TABLE {s}.waiters (token text PRIMARY KEY, record json NOT NULL)",
        f"""CREATE TABLE {s}.machines (
            machine text PRIMARY KEY,
            fence bigint NOT NULL DEFAULT 0,
            ended bigint NOT NULL DEFAULT 0 CHECK (ended >= 0)
        )""",
    ]


def _decode(record: Any, where: str) -> Run:
    try:
        data = json.loads(record) if isinstance(record, str) else record
        return Run.from_dict(data)
    except (TypeError, ValueError) as error:
        raise StateError(f"{where}: {error}") from None


class PgTransaction:
    """One database transaction of a :class:`PgBackend`."""

    def __init__(self, backend: PgBackend, cursor: psycopg.Cursor[Any], *, missing: bool) -> None:
        self.backend = backend
        self.cursor = cursor
        self.s = backend.schema
        self.missing = missing  # a read of a store not created yet: everything is empty
        self._now: datetime | None = None

    def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.missing:
            return []
        self.cursor.execute(query, params)
        return self.cursor.fetchall()

    def _runs(self, query: str, params: tuple[Any, ...] = ()) -> list[Run]:
        return [_decode(row[0], f"store {self.backend.location}") for row in self._rows(query, params)]

    # -- clock and liveness ----------------------------------------------------------

    def now(self) -> datetime:
        if self._now is None:
            self.cursor.execute("SELECT now()")
            row = self.cursor.fetchone()
            assert row is not None
            self._now = row[0]
        return self._now

    def stale_reason(self, run: Run) -> str | None:
        if run.status.is_terminal:
            return None
        if run.owner_token:
            high, low = _lock_key(run.owner_token)
            self.cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = "
                "'ExclusiveLock' AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = %s AND objid = %s AND objsubid = 1)",
                (high, low),
            )
            row = self.cursor.fetchone()
            held = bool(row and row[0])
            return None if held else "its liveness lock is free: its database session has ended"
        if run.heartbeat_at is None:
            return None
        lease = run.owner_lease or DEFAULT_LEASE
        if self.now() - run.heartbeat_at > timedelta(seconds=lease):
            return f"no heartbeat for more than its lease of {lease:g}s"
        return None

    def forget_owner(self, run: Run) -> None:
        """Nothing to remove: the server dropped the lock with its session."""

    def sweep_owners(self) -> None:
        """Nothing left behind: advisory locks end with their sessions."""

    # -- reads ------------------------------------------------------------------------

    def latest_id(self) -> str | None:
        rows = self._rows(f"SELECT value FROM {self.s}.meta WHERE key = 'latest_id'")
        return str(rows[0][0]) if rows else None

    def active(self) -> list[Run]:
        return self._runs(f"SELECT record FROM {self.s}.runs WHERE status IN {_ACTIVE} ORDER BY id")

    def get(self, run_id: str) -> Run | None:
        if "\x00" in run_id:
            return None  # no text in the database holds one
        runs = self._runs(f"SELECT record FROM {self.s}.runs WHERE id = %s", (run_id,))
        return runs[0] if runs else None

    def machines(self) -> list[str]:
        rows = self._rows(
            f"SELECT machine FROM {self.s}.machines m WHERE ended > 0 OR EXISTS "
            f"(SELECT 1 FROM {self.s}.runs r WHERE r.machine = m.machine AND r.status IN {_ACTIVE}) ORDER BY machine"
        )
        return [str(row[0]) for row in rows]

    def last_ended(self, machine: str) -> Run | None:
        runs = self._runs(
            f"SELECT record FROM {self.s}.runs WHERE machine = %s AND status NOT IN {_ACTIVE} ORDER BY id DESC LIMIT 1",
            (machine,),
        )
        return runs[0] if runs else None

    def ended_count(self, machine: str) -> int:
        rows = self._rows(f"SELECT ended FROM {self.s}.machines WHERE machine = %s", (machine,))
        return int(rows[0][0]) if rows else 0

    def oldest_ended(self, machine: str, count: int) -> list[Run]:
        return self._runs(
            f"SELECT record FROM {self.s}.runs WHERE machine = %s AND status NOT IN {_ACTIVE} ORDER BY id LIMIT %s",
            (machine, max(0, count)),
        )

    def ended(self) -> Iterator[Run]:
        yield from self._runs(f"SELECT record FROM {self.s}.runs WHERE status NOT IN {_ACTIVE} ORDER BY machine, id")

    def newest_first(self) -> Iterator[Run]:
        if self.missing:
            return
        offset_id: str | None = None
        while True:
            # Pages by keyset: a small limit reads only the newest rows, through the primary key.
            page = self._runs(
                f"SELECT record FROM {self.s}.runs WHERE %s::text IS NULL OR id < %s ORDER BY id DESC LIMIT 200",
                (offset_id, offset_id),
            )
            yield from page
            if len(page) < 200:
                return
            offset_id = page[-1].id

    # -- the line of waiters ----------------------------------------------------------

    def waiters(self) -> list[Waiter]:
        found = []
        for (record,) in self._rows(f"SELECT record FROM {self.s}.waiters ORDER BY token"):
            try:
                found.append(Waiter.from_dict(json.loads(record) if isinstance(record, str) else record))
            except (TypeError, ValueError) as error:
                raise StateError(f"store {self.backend.location}: a waiter: {error}") from None
        return found

    def put_waiter(self, waiter: Waiter) -> None:
        self.cursor.execute(
            f"INSERT INTO {self.s}.waiters (token, record) VALUES (%s, %s) "
            "ON CONFLICT (token) DO UPDATE SET record = EXCLUDED.record",
            (waiter.token, json.dumps(waiter.to_dict())),
        )

    def remove_waiter(self, token: str) -> None:
        if not self.missing:
            self.cursor.execute(f"DELETE FROM {self.s}.waiters WHERE token = %s", (token,))

    # -- changes ----------------------------------------------------------------------

    def next_fence(self, machine: str) -> int:
        self.cursor.execute(
            f"INSERT INTO {self.s}.machines (machine, fence) VALUES (%s, 1) "
            f"ON CONFLICT (machine) DO UPDATE SET fence = {self.s}.machines.fence + 1 RETURNING fence",
            (machine,),
        )
        row = self.cursor.fetchone()
        assert row is not None
        return int(row[0])

    def add(self, run: Run) -> None:
        s = self.s
        self.cursor.execute(
            f"INSERT INTO {s}.runs (id, machine, status, record) VALUES (%s, %s, %s, %s)",
            (run.id, run.machine, run.status.value, json.dumps(run.to_dict())),
        )
        self.cursor.execute(
            f"INSERT INTO {s}.meta (key, value) VALUES ('latest_id', %s) ON CONFLICT (key) DO UPDATE "
            f"SET value = GREATEST({s}.meta.value, EXCLUDED.value)",
            (run.id,),
        )
        self._count(run.machine, 1 if run.status.is_terminal else 0)
        if run.status.is_terminal:
            self._notify(run.machine)

    def replace(self, run: Run) -> None:
        s = self.s
        self.cursor.execute(
            f"UPDATE {s}.runs AS new SET status = %s, record = %s FROM {s}.runs AS old "
            f"WHERE new.id = %s AND old.id = new.id RETURNING old.status",
            (run.status.value, json.dumps(run.to_dict()), run.id),
        )
        row = self.cursor.fetchone()
        if row is None:
            raise StateError(f"store {self.backend.location}: run {run.id} vanished inside a transaction")
        if Status(row[0]) in (Status.PENDING, Status.RUNNING) and run.status.is_terminal:
            self._count(run.machine, 1)
            self._notify(run.machine)

    def delete(self, runs: list[Run]) -> None:
        by_machine: dict[str, list[str]] = {}
        for run in runs:
            by_machine.setdefault(run.machine, []).append(run.id)
        for machine, ids in by_machine.items():
            self.cursor.execute(
                f"DELETE FROM {self.s}.runs WHERE id = ANY(%s) AND status NOT IN {_ACTIVE}",
                (ids,),
            )
            self._count(machine, -self.cursor.rowcount)

    def _count(self, machine: str, ended: int) -> None:
        if ended < 0:
            self.cursor.execute(f"UPDATE {self.s}.machines SET ended = ended + %s WHERE machine = %s", (ended, machine))
            return
        self.cursor.execute(
            f"INSERT INTO {self.s}.machines (machine, ended) VALUES (%s, %s) "
            f"ON CONFLICT (machine) DO UPDATE SET ended = {self.s}.machines.ended + EXCLUDED.ended",
            (machine, ended),
        )

    def _notify(self, machine: str) -> None:
        # The payload is not read (waiters look again); a machine's name may exceed NOTIFY's 8000 bytes.
        self.cursor.execute("SELECT pg_notify(%s, '')", (f"{self.s}_ended",))


class PgOwnerLock:
    """A session's liveness in the database: an advisory lock held by a connection of its own."""

    def __init__(self, backend: PgBackend) -> None:
        self.backend = backend
        self.token = secrets.token_hex(16)
        self._key = _signed_key(self.token)
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()
        self._guard = threading.Lock()

    def acquire(self) -> None:
        self._conn = self.backend.connect(autocommit=True, **_KEEPALIVES)
        try:
            # The server's side of the keepalives: it ends the session of a vanished host.
            self._conn.execute("SET tcp_keepalives_idle = 10")
            self._conn.execute("SET tcp_keepalives_interval = 5")
            self._conn.execute("SET tcp_keepalives_count = 3")
            self._conn.execute("SELECT pg_advisory_lock(%s)", (self._key,))
        except self.backend._psycopg.Error as error:
            self._close()
            raise self.backend.unreachable(error) from None
        _live_locks.add(self)

    def fileno(self) -> int | None:
        """The socket of the connection that holds the lock (to watch: it turns readable as it closes), or None."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.fileno()

    def still_held(self, *, take_back: bool = True) -> bool:
        if os.getpid() != self._pid:
            return False
        with self._guard:
            try:
                if self._conn is not None and not self._conn.closed:
                    row = self._conn.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND pid = pg_backend_pid() AND objsubid = 1 AND classid = %s AND objid = %s",
                        _lock_key(self.token),
                    ).fetchone()
                    if row and row[0]:
                        return True
            except self.backend._psycopg.Error:
                pass
            if not take_back:
                return False
            # Lost with its connection: take it again if nobody has (a reclaim shows in the run).
            self._close()
            try:
                self._conn = self.backend.connect(autocommit=True, **_KEEPALIVES)
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
                return bool(row and row[0])
            except (StateError, self.backend._psycopg.Error):
                self._close()
                return False

    def release(self) -> None:
        self.drop()

    def drop(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child that ran on into pytest's end: the lock is its parent's
        _live_locks.discard(self)
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                # Let go before closing: the server drops a closed session's locks a moment
                # later, and a reader asking right away must already find the lock free.
                self._conn.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _forget_in_child(self) -> None:
        # The child's copy of the socket would keep the connection, and so the lock, alive
        # after the owner dies: point the descriptor at /dev/null instead (its number stays taken).
        if self._conn is not None:
            with contextlib.suppress(Exception):
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, self._conn.fileno())
                os.close(null)
        self._conn = None


_live_locks: set[PgOwnerLock] = set()
# Connections whose descriptor a test closed (os.closerange), so that its number may now be
# one of the test's files: kept, never closed (closing would close the test's file).
_abandoned: list[Any] = []


def _socket_of(conn: psycopg.Connection[Any]) -> tuple[int, int] | None:
    """What ``conn``'s descriptor names (``st_dev``, ``st_ino``); ``None`` if it is closed or names nothing."""
    try:
        info = os.fstat(conn.fileno())
    except Exception:
        return None
    return info.st_dev, info.st_ino


def _forget_inherited_locks() -> None:
    for lock in list(_live_locks):
        lock._forget_in_child()
    _live_locks.clear()


os.register_at_fork(after_in_child=_forget_inherited_locks)
