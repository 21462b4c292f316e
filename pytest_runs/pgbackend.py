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
- **Schemas are independent**: the store lock's key names the schema.

Riding out a restart of the server (an outage of up to :data:`RIDE_OUT` seconds), whoever
calls (the session, its keeper, the command line), once a connection was made at all:

- A transaction whose connection is found closed before it began is begun again, with
  backoff; one whose connection closes inside it or at its ``COMMIT`` raises
  :class:`~pytest_runs.errors.ConnectionLost`, and the store does the change again (a retried
  claim or end recognises its own earlier effect).
- :meth:`PgOwnerLock.still_held` takes the lock back on a new connection; a waiter's
  connections are opened again by its next wait.
- Readers know that a restart drops every lock: an owner whose lock is free but whose last
  heartbeat is older than the server's start is judged by its own lease instead, and given
  at least ``RIDE_OUT`` + 5 s after the start to come back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import select
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import ConnectionLost, InvalidTransition, StateError, StoreLocked, StoreUnreachable
from .liveness import DEFAULT_LEASE
from .model import Run, Status
from .queue import Waiter
from .settings import mask_url

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCHEMA_VERSION", "PgBackend", "is_database_url", "mask", "parse_url", "store_lock_key"]

#: The schema this version creates, and the newest it uses.
SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "pytest_runs"
#: The first key of the advisory lock every write transaction takes (its value spells "runs");
#: the second names the schema (:func:`store_lock_key`), so stores in different schemas of
#: one database never wait for each other. Two 32-bit keys (``objsubid`` 2 in ``pg_locks``)
#: never meet an owner's single 64-bit key (``objsubid`` 1).
_STORE_LOCK = 0x72756E73
#: The longest a call waits for a server it reached before to come back (a restart, seconds). A
#: session cut off from a server that stays up loses its liveness lock when the server's
#: keepalives (below) end its connection, 25 s after the last word from it: an owner riding out
#: an outage must stop before that, as it cannot tell a restart from being cut off.
RIDE_OUT = 20.0
#: After the server (re)starts, a run whose owner's lock is free but whose last heartbeat is
#: older than the start is given this long, and its own lease, to come back (it may be riding out).
_COME_BACK = RIDE_OUT + 5.0
_FIRST_PAUSE, _LAST_PAUSE = 0.05, 1.0
#: How often a waiter asks again for a holder's lock that was free (being taken back after a restart).
_ARM_EVERY = 0.5
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


# libpq's options that take one of a few words, and those that take whole numbers (port: one per host).
_WORDS = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
}
_NUMBERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count")
_NUMBER = re.compile(r"-?[0-9]+")


def parse_url(url: str, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The libpq URL without our ``schema`` parameter, and the schema; checked without connecting.

    Raises :class:`ValueError`, one line with the password masked, for a URL that is the user's
    mistake: one that cannot be parsed (by ``urllib`` or, when psycopg is installed, by libpq's
    own parser: unknown parameters, bad percent-encoding, a port that is no number), a schema that
    is no lower-case SQL name, a libpq option whose value libpq refuses (``sslmode=bogus``), and
    one that names no database (no ``/DATABASE``, ``dbname``, ``service``, ``$PGDATABASE`` or
    ``$PGSERVICE``: libpq would pick one after the user's name).
    """
    where = mask(url)
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a bad port or address
    except ValueError as error:
        raise ValueError(f"store {where} is not a valid URL: {error}") from None
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"store {where} is not a valid URL: '#' must be percent-encoded (%23)")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"store {where}: schema {schema!r} must be a lower-case SQL name (letters, digits, _)")
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    # Not urlunsplit, which turns "postgresql://" into "postgresql:", a string libpq cannot read.
    conninfo = url.partition("?")[0] + (f"?{rest}" if rest else "")
    options = _libpq_options(conninfo, where)
    if options is None:  # no psycopg (it says so when the store is opened): what urllib sees
        options = {key: value for key, value in query if key != "schema"}
        options.setdefault("dbname", urllib.parse.unquote(parts.path.removeprefix("/")))
    for key, words in _WORDS.items():
        if key in options and options[key] not in words:
            raise ValueError(f"store {where}: {key} must be one of {', '.join(words)}, not {options[key]!r}")
    for key in _NUMBERS:
        if key in options and not _NUMBER.fullmatch(options[key]):
            raise ValueError(f"store {where}: {key} must be a whole number, not {options[key]!r}")
    for port in options.get("port", "").split(","):
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"store {where}: port must be a number from 1 to 65535, not {port!r}")
    named = options.get("dbname") or options.get("service") or environ.get("PGDATABASE") or environ.get("PGSERVICE")
    if not named:
        raise ValueError(
            f"store {where} names no database: add it to the URL (postgresql://HOST/DATABASE) or set PGDATABASE"
        )
    return conninfo, schema


def _libpq_options(conninfo: str, where: str) -> dict[str, str] | None:
    """The options libpq's own parser reads in ``conninfo`` (no connection); ``None`` without psycopg."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return None
    try:
        return {key: str(value) for key, value in conninfo_to_dict(conninfo).items() if value is not None}
    except ProgrammingError as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"store {where} is not a valid URL: {detail}") from None


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as error:
        raise StateError(
            f"a postgresql:// store needs psycopg 3 ({error}); install it with: pip install 'pytest-runs[postgres]'"
        ) from None
    return psycopg


def store_lock_key(schema: str) -> tuple[int, int]:
    """The two keys of the store lock of ``schema``, as ``pg_advisory_xact_lock(int, int)`` takes them."""
    digest = hashlib.sha256(schema.encode()).digest()
    return _STORE_LOCK, int.from_bytes(digest[:4], "big") >> 1  # 31 bits: the same in pg_locks' objid


#: Whether an owner's liveness lock (the two halves of its key) is held, by any session of this database.
_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock' "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND classid = %s AND objid = %s AND objsubid = 1)"
)
#: When the server last started: its postmaster, or, after a crash, its checkpointer started again
#: (which only a role that may read the server's activity sees; the postmaster's start otherwise).
_SERVER_START = (
    "SELECT GREATEST(pg_postmaster_start_time(), "
    "(SELECT max(backend_start) FROM pg_stat_activity WHERE backend_type = 'checkpointer'))"
)


def _timed_out(error: BaseException) -> bool:
    """Whether ``error`` says the server did not answer at all (rather than refused, or closed the connection)."""
    text = str(error).lower()
    return "timeout expired" in text or "timed out" in text


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
            self.conninfo, self.schema = parse_url(url)
        except ValueError as error:
            raise StateError(str(error)) from None
        self.wakes_on_change = True
        self.lock_timeout = lock_timeout
        self._psycopg = _driver()
        self._conn: psycopg.Connection[Any] | None = None
        self._socket: tuple[int, int] | None = None  # what self._conn's descriptor named when it was opened
        self._mutex = threading.Lock()
        self._inside = threading.local()
        self._ready = False
        self._waiter: _Waiter | None = None
        #: Whether a connection was ever made: only then is a failure an outage to ride out.
        self._reached = False
        #: A call rode out a whole outage window in vain: the next ones fail at once, until one
        #: reaches the server again (their callers try again as they see fit: the next heartbeat,
        #: the waiting loop's next look).
        self._gave_up = False
        self._full_lock_timeout = lock_timeout
        #: From a call of wait_for_change to the first commit after stop_waiting: every call is
        #: bounded by the lock timeout, which the waiting session shortens to the wait left.
        self._waiting = False
        self._waiting_over = False

    # -- connections ------------------------------------------------------------------

    def connect(self, **extra: Any) -> psycopg.Connection[Any]:
        """A new connection; :class:`StoreUnreachable` naming the masked URL if there is none."""
        timeout = max(1, min(int(self.lock_timeout), 30))
        try:
            conn = self._psycopg.connect(
                self.conninfo, connect_timeout=timeout, application_name="pytest-runs", **extra
            )
        except self._psycopg.Error as error:
            raise self.unreachable(error) from None
        self._reached, self._gave_up = True, False
        return conn  # type: ignore[no-any-return]

    def unreachable(self, error: BaseException) -> StoreUnreachable:
        return StoreUnreachable(f"cannot reach the store {self.location}: {self._detail(error)}")

    def _detail(self, error: BaseException) -> str:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if password := urllib.parse.urlsplit(self.url).password:
            detail = detail.replace(password, "***").replace(urllib.parse.quote(password), "***")
        return detail

    def outage_window(self) -> float:
        """How long a call waits for a server it reached before to come back (a restart), in seconds.

        Nothing for a server never reached (the session exits 69 at once), nor after a call
        gave up on it, until one reaches it again. Else :data:`RIDE_OUT`, but no longer than the
        lock timeout while the caller waits for a machine (it shortens the lock timeout to the
        wait left, and looks again after each call that gives up).
        """
        if not self._reached or self._gave_up:
            return 0.0
        if self._waiting or self.lock_timeout < self._full_lock_timeout:
            return min(RIDE_OUT, self.lock_timeout)
        return RIDE_OUT

    def lost(self, conn: psycopg.Connection[Any] | None, error: BaseException) -> bool:
        """Whether ``error`` means that ``conn`` is gone (the server restarted or ended it), not a refusal."""
        errors = self._psycopg.errors
        if isinstance(error, errors.AdminShutdown | errors.CrashShutdown | errors.CannotConnectNow):
            return True
        return conn is None or conn.closed or conn.broken

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and _socket_of(self._conn) != self._socket:
            _abandoned.append(self._conn)  # closed under us (os.closerange): never close its number again
            self._conn = None
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
            self._socket = _socket_of(self._conn)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None and not self._conn.closed and _socket_of(self._conn) != self._socket:
            _abandoned.append(self._conn)  # its descriptor was closed under us: never close that number
            self._conn = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close this backend's connections (a new one is opened on the next call)."""
        self.stop_waiting()
        self._drop_connection()

    # -- transactions -----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, write: bool, durable: bool = True) -> Iterator[PgTransaction]:
        """A critical section; see :class:`pytest_runs.backend.Backend`.

        A connection found closed before anything was done (the server restarted since the
        last call) is opened again, with backoff, for up to :meth:`outage_window`. One that
        closes inside the transaction, or at its commit, raises :class:`ConnectionLost`: the
        transaction may have committed, and the caller decides whether doing it again is safe.
        """
        psycopg = self._psycopg
        if getattr(self._inside, "active", False):
            raise RuntimeError(f"store {self.location} was called again from inside one of its operations (from mk?)")
        if not self._mutex.acquire(timeout=self.lock_timeout):
            raise StoreLocked(f"store {self.location} is busy in another thread for over {self.lock_timeout:g}s", [])
        conn: Any = None
        try:
            self._inside.active = True
            conn, cursor = self._begin(write=write, durable=durable)
            try:
                yield PgTransaction(self, cursor, missing=not self._ready)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise
            conn.commit()
            if self._waiting_over:
                self._waiting = self._waiting_over = False
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
            lost = conn is not None and self.lost(conn, error)  # (None: _begin gave up, or was refused)
            self._drop_connection()
            if lost:
                raise ConnectionLost(
                    f"lost the connection to the store {self.location} inside a transaction "
                    f"(it may or may not have been recorded): {self._detail(error)}"
                ) from None
            raise self.unreachable(error) from None
        finally:
            self._inside.active = False
            self._mutex.release()

    def _begin(self, *, write: bool, durable: bool) -> tuple[psycopg.Connection[Any], psycopg.Cursor[Any]]:
        """A connection inside a new transaction (the store lock taken for a write), and its cursor.

        Rides out a closed connection, or a server that does not answer yet, for up to
        :meth:`outage_window`: nothing was done yet, so trying again cannot apply anything twice.
        """
        psycopg = self._psycopg
        give_up_at = time.monotonic() + self.outage_window()
        pause = _FIRST_PAUSE
        while True:
            conn: Any = None
            try:
                conn = self._connection()
                if write and not self._ready:
                    self._ensure_schema(conn)
                cursor = conn.cursor()
                if not write:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cursor.execute(f"SET LOCAL lock_timeout = '{max(1, int(self.lock_timeout * 1000))}ms'")
                if not durable:
                    cursor.execute("SET LOCAL synchronous_commit = off")
                if write:
                    cursor.execute(
                        "SELECT pg_advisory_xact_lock(%s::integer, %s::integer)", store_lock_key(self.schema)
                    )
                elif not self._ready:
                    self._check_schema(cursor, create=False)
                return conn, cursor
            except StoreUnreachable as error:
                failure: StoreUnreachable = error
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                if isinstance(error, psycopg.errors.LockNotAvailable) or not self.lost(conn, error):
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.rollback()
                    raise
                failure = self.unreachable(error)
            self._drop_connection()
            left = give_up_at - time.monotonic()
            if left <= 0:
                self._gave_up = True
                raise failure
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LAST_PAUSE)

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            cursor = conn.cursor()
            cursor.execute(f"SET LOCAL lock_timeout = '{max(1, int(self.lock_timeout * 1000))}ms'")
            cursor.execute("SELECT pg_advisory_xact_lock(%s::integer, %s::integer)", store_lock_key(self.schema))
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

    def server_start(self, cursor: psycopg.Cursor[Any]) -> datetime:
        """When the server last (re)started (see :data:`_SERVER_START`), asked through ``cursor``."""
        cursor.execute(_SERVER_START)
        row = cursor.fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

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
        self._waiting = True
        waiter = self._waiter
        if waiter is not None and waiter.token != holder.owner_token:
            self._close_waiter()
            waiter = None
        try:
            if waiter is None:
                waiter = self._waiter = _Waiter(self, holder)
            if waiter.wait(timeout):
                self._close_waiter()
                return True
        except (self._psycopg.Error, OSError, StateError):
            self._close_waiter()
            time.sleep(max(0.0, min(1.0, timeout)))
            return True
        return False

    def stop_waiting(self) -> None:
        """Close the connections of :meth:`wait_for_change`: the caller waits no more.

        Calls stay bounded by the lock timeout until the next one that commits (the claim, or
        leaving the line), which are still part of the wait.
        """
        self._close_waiter()
        self._waiting_over = self._waiting

    def _close_waiter(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None


class _Waiter:
    """A waiting session's two connections: one listening for ended runs, one asking for the holder's lock.

    The holder's lock is asked for only while someone holds it: right after a restart of the
    server it is free until the holder takes it back, and asking then would both wake this
    waiter for nothing and keep the holder from taking it back. Until then the waiter listens,
    and tries again every :data:`_ARM_EVERY` seconds.
    """

    def __init__(self, backend: PgBackend, holder: Run) -> None:
        self.token = holder.owner_token
        self.heartbeat_at = holder.heartbeat_at
        self.listener = backend.connect(autocommit=True)
        self.watcher: psycopg.Connection[Any] | None = None
        self.armed = False
        self.gone = False
        try:
            self.listener.execute(f"LISTEN {backend.schema}_ended")
            if self.token:
                self.watcher = backend.connect(autocommit=True)
                self.gone = self._arm()
        except BaseException:
            self.close()
            raise

    def _arm(self) -> bool:
        """Ask for the holder's lock if someone holds it; True if it was let go since the holder's last heartbeat."""
        assert self.watcher is not None
        row = self.watcher.execute(_HELD, _lock_key(self.token)).fetchone()
        if row and row[0]:
            # Granted by the server the moment the holder lets go or its session ends.
            self.watcher.pgconn.send_query(
                f"SELECT pg_advisory_lock_shared({_signed_key(self.token)}::bigint)".encode()
            )
            self.armed = True
            return False
        started = self.watcher.execute(_SERVER_START).fetchone()
        # Free though the holder beat after the server started: its session ended. Else wait for it.
        return self.heartbeat_at is None or started is None or self.heartbeat_at >= started[0]

    def wait(self, timeout: float) -> bool:
        """Whether something changed within ``timeout`` seconds."""
        if self.gone:
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        while (left := deadline - time.monotonic()) > 0:
            if self.watcher is not None and not self.armed:
                if self._arm():
                    return True
                left = min(left, _ARM_EVERY)
            sockets = [self.listener.fileno()] + (
                [self.watcher.fileno()] if self.watcher is not None and self.armed else []
            )
            readable, _, _ = select.select(sockets, [], [], left)
            if self.listener.fileno() in readable and any(True for _ in self.listener.notifies(timeout=0)):
                return True
            if self.watcher is not None and self.armed and self.watcher.fileno() in readable:
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
        self._server_start: datetime | None = None

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

    def server_start(self) -> datetime:
        """When the server last started, or restarted after a crash: every session, and lock, is newer."""
        if self._server_start is None:
            self._server_start = self.backend.server_start(self.cursor)
        return self._server_start

    def stale_reason(self, run: Run) -> str | None:
        if run.status.is_terminal:
            return None
        if run.owner_token:
            self.cursor.execute(_HELD, _lock_key(run.owner_token))
            row = self.cursor.fetchone()
            if row and row[0]:
                return None
            beat = run.heartbeat_at
            if beat is not None and beat < self.server_start():
                # Its lock went with the server's restart, not with its owner: the owner may be
                # reconnecting. Judged by its own lease, and given time to ride the outage out.
                lease = run.owner_lease or DEFAULT_LEASE
                now = self.now()
                if now - beat <= timedelta(seconds=lease) or now - self.server_start() <= timedelta(seconds=_COME_BACK):
                    return None
                return (
                    "its liveness lock is free since the server restarted, and no heartbeat for more "
                    f"than its lease of {lease:g}s"
                )
            return "its liveness lock is free: its database session has ended"
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
        #: Let go of for good: a still_held riding out an outage on another thread must not take it again.
        self._dropped = False
        #: When the server had last started as the lock was taken (see :meth:`lost_to_a_restart`).
        self._server_start: Any = None

    def acquire(self) -> None:
        self._conn = self._connect()
        try:
            self._conn.execute("SELECT pg_advisory_lock(%s)", (self._key,))
            row = self._conn.execute(_SERVER_START).fetchone()
        except self.backend._psycopg.Error as error:
            self._close()
            raise self.backend.unreachable(error) from None
        self._server_start = row[0] if row else None
        _live_locks.add(self)

    def lost_to_a_restart(self) -> bool:
        """After the lock's connection closed: whether the server went away with it (a restart), never raises.

        Readers keep a run whose owner's lock went with a restart for its owner's lease, so its
        owner may take the lock back and go on. A server that is up and did not restart since
        the lock was taken ended the connection on purpose (``pg_terminate_backend``): anyone
        may have found the lock free and taken the machine at once. A server that refuses
        connections now is restarting; one that does not answer at all may be cut off from this
        host while it stays up (it frees the lock once keepalives end the connection): not a
        restart.
        """
        try:
            with self.backend.connect(autocommit=True) as conn:
                row = conn.execute(_SERVER_START).fetchone()
        except StoreUnreachable as error:
            return not _timed_out(error)
        except Exception:
            return False
        return bool(row and self._server_start is not None and row[0] != self._server_start)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = self.backend.connect(autocommit=True, **_KEEPALIVES)
        try:
            # The server's side of the keepalives: it ends the session of a vanished host.
            conn.execute("SET tcp_keepalives_idle = 10")
            conn.execute("SET tcp_keepalives_interval = 5")
            conn.execute("SET tcp_keepalives_count = 3")
        except self.backend._psycopg.Error as error:
            with contextlib.suppress(Exception):
                conn.close()
            raise self.backend.unreachable(error) from None
        return conn

    def fileno(self) -> int | None:
        """The socket of the connection that holds the lock (to watch: it turns readable as it closes), or None."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.fileno()

    def still_held(self, *, take_back: bool = True, within: float | None = None) -> bool:
        """Whether the lock is held; if its connection was lost, take it again if nobody has.

        A server that restarted, or refuses connections while it does, is waited for (with
        backoff) for up to the backend's :meth:`~PgBackend.outage_window`: readers keep a run
        whose lock went with a restart for its owner's lease. A server that does not answer at
        all (a timeout: this host may be cut off from a server that stays up, which frees the
        lock once its keepalives end the connection) is not waited for. Whether the run is still
        this session's is for the next heartbeat to say (a reclaim shows in the run).
        With ``take_back=False`` a lost lock is only reported, never taken again; ``within``
        bounds how long it tries to take it back (a waiting session's wait has its own bound).
        """
        if os.getpid() != self._pid:
            return False
        psycopg = self.backend._psycopg
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
            except psycopg.Error as error:
                cut_off = _timed_out(error)
            else:
                cut_off = False
            if not take_back:
                return False
            window = self.backend.outage_window() if within is None else min(within, self.backend.outage_window())
            give_up_at = time.monotonic() + (0.0 if cut_off else window)
            pause = _FIRST_PAUSE
            while True:
                self._close()
                if self._dropped:
                    return False
                try:
                    self._conn = self._connect()
                    # Waits (briefly) for a waiter that holds the key shared, as it watches for us
                    # to go, to let go; nobody else can hold this session's own key.
                    wait_ms = max(100, int(min(5.0, max(0.0, give_up_at - time.monotonic())) * 1000))
                    self._conn.execute(f"SET lock_timeout = '{wait_ms}ms'")
                    self._conn.execute("SELECT pg_advisory_lock(%s)", (self._key,))
                    if self._dropped:  # let go of meanwhile, on another thread
                        self._close()
                        return False
                    row = self._conn.execute(_SERVER_START).fetchone()
                    self._server_start = row[0] if row else None
                    return True
                except psycopg.errors.LockNotAvailable:
                    self._close()
                    return False
                except (StateError, psycopg.Error) as error:
                    if _timed_out(error):
                        give_up_at = 0.0
                left = give_up_at - time.monotonic()
                if left <= 0:
                    self._close()
                    self.backend._gave_up = True
                    return False
                time.sleep(min(pause, left))
                pause = min(pause * 2, _LAST_PAUSE)

    def release(self) -> None:
        self.drop()

    def drop(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child that ran on into pytest's end: the lock is its parent's
        self._dropped = True
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
