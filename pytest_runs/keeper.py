"""The keeper: a small process of its own that keeps one session's machine, started by the session.

``python -m pytest_runs.keeper FD`` is started by :mod:`pytest_runs.keeper_client` at the
start of a tracked session, with one end of a socket pair as ``FD``. Everything that keeps
the session's machine lives here, not in the session's process:

- **The liveness lock.** The keeper takes it (the OFD lock on ``owners/<token>.lock``, or
  the advisory lock on a database connection of its own) and tells the session its token.
  The session's process holds no lock descriptor and no lock connection, so nothing a test
  forks, by ``os.fork`` or from C, inherits anything that keeps the machine.
- **The session's life.** The keeper watches the session's PID with a pidfd (not a pipe,
  which a C-forked child would hold open too). When the session dies, it SIGKILLs the
  xdist workers that registered with it, waits until each is gone, and only then lets go
  of the lock (leaving the file, so that readers find it free and reclaim the run at once).
- **Heartbeats.** It refreshes the run every heartbeat with a store of its own, and tells
  the session (a line on the channel and ``SIGURG``) the moment it finds the machine lost:
  released, reclaimed, gone from the store, or (database) its liveness connection closed,
  which it watches with ``select`` and so notices at once.
- **The deadline and the grace.** At ``--runs-timeout`` it asks the session to stop; once a
  stop is asked for (by the deadline, a lost machine, or a signal the session received), it
  waits the grace, then asks the session to end itself at once; a session that still does
  not end within :data:`FORCE_WINDOW` (stuck in C with the GIL, say) is stopped (SIGSTOP)
  with its descendants, its end recorded (``timeout`` or ``interrupted``, exit code 137,
  as a shell reports a SIGKILL; never ``completed``), then it is SIGKILLed, and the keeper
  lets go of the lock once it is gone.

The keeper shares the session's process group, so that Ctrl-Z and ``kill -STOP`` of the
group stop it too. SIGINT and SIGTERM to the group (Ctrl-C, ``timeout``) are the
session's to handle, but the keeper arms the grace on them as well (unless the session
ignores that signal), so that a session stuck in C is ended all the same. It ignores SIGHUP
and SIGQUIT; it ends when the session says it is done, or after the session.

The channel carries one JSON object per line. The session sends ``hello`` (the store and
its own PID) and gets ``ready`` (the token and the address workers register at) or
``error``; then ``held`` (answered), ``begin`` (the run, its owner, heartbeat and deadline),
``stop``, ``ending``, ``release`` / ``drop`` (answered ``released``) and ``done``. The keeper
sends ``lost``, ``timeout`` and ``force``, each with ``SIGURG``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

#: Seconds a session has to end itself once the keeper asked it to (after the grace) before
#: it is killed.
FORCE_WINDOW = 0.5
#: The exit code recorded for a session the keeper had to SIGKILL (as a shell reports it).
KILLED_EXIT_CODE = 128 + signal.SIGKILL
#: Seconds a waiting session's keeper tries at most to take a lost database lock back at once.
WAITING_RIDE_OUT = 1.0
#: The signal that tells the session to read the channel.
NOTIFY_SIGNAL = signal.SIGURG
_IGNORED = (signal.SIGHUP, signal.SIGQUIT)
#: Signals to the whole process group (Ctrl-C, ``timeout``) that ask the session to stop: the
#: keeper arms the grace itself, so that a session that cannot even run its handler (stuck in
#: C with the GIL) is ended all the same.
_STOPS = (signal.SIGINT, signal.SIGTERM)
_WORKER_WAIT = 30.0


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"\n{line}\n".encode(errors="backslashreplace"))


#: tgkill's system call number, by machine (Python has no tgkill of its own).
_SYS_TGKILL = {"x86_64": 234, "aarch64": 131, "riscv64": 131, "ppc64le": 250, "s390x": 241}


def _signal_main_thread(pidfd: int, pid: int) -> None:
    """Send :data:`NOTIFY_SIGNAL` to the session's main thread (its thread ID is its PID).

    Sent to the process, the kernel may deliver it to any thread (xdist's controller has
    execnet's), and the main thread, asleep in a wait with a timeout, would run the handler
    only when that wait ends. Where tgkill is unknown, or the session is gone, the process.
    """
    import ctypes
    import platform

    number = _SYS_TGKILL.get(platform.machine())
    if number is not None and not select.select([pidfd], [], [], 0)[0]:
        with contextlib.suppress(OSError, AttributeError):
            if ctypes.CDLL(None, use_errno=True).syscall(number, pid, pid, NOTIFY_SIGNAL) == 0:
                return
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, NOTIFY_SIGNAL)


def _is_descendant(pid: int, ancestor: int) -> bool:
    from .owner import proc_stat

    seen = 0
    while pid > 1 and seen < 1000:
        if pid == ancestor:
            return True
        try:
            pid = int(proc_stat(pid)[1])
        except (OSError, ValueError, IndexError):
            return False
        seen += 1
    return False


def _wait_gone(pidfds: list[int], timeout: float) -> None:
    """Wait until every process behind ``pidfds`` has exited (a pidfd turns readable then)."""
    deadline = time.monotonic() + timeout
    waiting = list(pidfds)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select(waiting, [], [], left)
        waiting = [fd for fd in waiting if fd not in ready]


class Keeper:
    """One session's keeper; see the module docs."""

    def __init__(self, control: socket.socket) -> None:
        self.control: socket.socket | None = control
        self.buffer = b""
        self.hello = self._read_hello()
        self.session_pid: int = self.hello["pid"]
        self.grace: float = self.hello["grace"]
        try:
            self.pidfd = os.pidfd_open(self.session_pid)
        except OSError:
            sys.exit(0)  # the session is gone already
        if os.getppid() != self.session_pid:
            sys.exit(0)  # the session died before we could watch it: nothing to keep
        self._store: Any = None
        self.lock: Any = None
        self.listener: socket.socket | None = None
        self.workers: dict[int, int] = {}  # pid -> pidfd
        self.run_id: str | None = None
        self.owner: Any = None
        self.heartbeat = 0.0
        self.next_beat: float | None = None
        self.deadline: float | None = None
        self.force_at: float | None = None
        self.kill_at: float | None = None
        self.stop: dict[str, Any] | None = None
        self.ending = False
        self.let_go = False
        self.lost = False
        self.beat_failing = False
        self.pending: list[dict[str, Any]] = []
        self.hello_timeout: float | None = None
        # The signals the group got, written by Python's C handler (set_wakeup_fd) and read here.
        self.wakeup, writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(writer)
        ignored = set(self.hello.get("ignored", ()))
        for signum in _STOPS:
            # What the session ignores (SIGINT in a background job) stays ignored here too.
            signal.signal(signum, signal.SIG_IGN if signum in ignored else _noted)

    # -- the channel ----------------------------------------------------------------

    def _read_hello(self) -> dict[str, Any]:
        assert self.control is not None
        while b"\n" not in self.buffer:
            chunk = self.control.recv(65536)
            if not chunk:
                sys.exit(0)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        hello: dict[str, Any] = json.loads(line)
        return hello

    def send(self, message: dict[str, Any]) -> bool:
        """One line to the session; False if the channel is gone."""
        if self.control is None:
            return False
        try:
            self.control.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            self._lose_control()
            return False
        return True

    def notify(self, message: dict[str, Any]) -> None:
        """An event for the session: on the channel (kept until it reconnects if the channel is gone), and a signal."""
        if not self.send(message):
            self.pending.append(message)
        _signal_main_thread(self.pidfd, self.session_pid)

    def _lose_control(self) -> None:
        # The session closed its end (a test that closed every descriptor): it may connect again.
        if self.control is not None:
            with contextlib.suppress(OSError):
                self.control.close()
        self.control, self.buffer = None, b""

    def _messages(self) -> list[dict[str, Any]]:
        assert self.control is not None
        try:
            chunk = self.control.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._lose_control()
            return []
        self.buffer += chunk
        messages = []
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            with contextlib.suppress(ValueError):
                messages.append(json.loads(line))
        return messages

    # -- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Take the liveness lock and listen for workers; tell the session (``ready`` or ``error``)."""
        hello = self.hello
        from .errors import StateError, StoreUnreachable

        try:
            if hello["store_url"]:
                from .pgbackend import PgBackend

                self.lock = PgBackend(hello["store_url"], lock_timeout=hello["lock_timeout"]).liveness_lock()
            else:
                # Only what the lock needs (the session made the state dir): the store is
                # imported at the first heartbeat, off the session's way to its first test.
                from .liveness import LivenessLock

                self.lock = LivenessLock(Path(hello["state_dir"]))
                try:
                    self.lock.acquire()
                except OSError as error:
                    detail = error.strerror or str(error)
                    raise StateError(f"cannot take a liveness lock in {hello['state_dir']}: {detail}") from None
        except StoreUnreachable as error:
            self.send({"op": "error", "unreachable": True, "message": str(error)})
            sys.exit(0)
        except (StateError, ValueError) as error:
            self.send({"op": "error", "unreachable": False, "message": str(error)})
            sys.exit(0)
        address = f"\0pytest-runs-keeper-{self.lock.token}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(16)
        self.send({"op": "ready", "token": self.lock.token, "address": address})

    # -- the loop -------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            watched: list[Any] = [self.pidfd, self.wakeup]
            if self.control is not None:
                watched.append(self.control)
            if self.listener is not None:
                watched.append(self.listener)
            liveness_fd = self._liveness_fd()
            if liveness_fd is not None:
                watched.append(liveness_fd)
            moments = [m for m in (self.next_beat, self.deadline, self.force_at, self.kill_at) if m is not None]
            timeout = max(0.0, min(moments) - time.monotonic()) if moments else None
            ready, _, _ = select.select(watched, [], [], timeout)
            if self.wakeup in ready:
                self.signalled()
            if self.pidfd in ready:
                self.session_ended()
                return
            if self.control is not None and self.control in ready:
                for message in self._messages():
                    if self.handle(message):
                        return
            if self.listener is not None and self.listener in ready:
                self.accept()
            if liveness_fd is not None and liveness_fd in ready:
                self.check_liveness_connection()
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                self.kill_session()
                return
            if self.force_at is not None and now >= self.force_at:
                self.force_at = None
                self.kill_at = now + FORCE_WINDOW
                self.notify({"op": "force"})  # the session says so itself, if it can
            if self.deadline is not None and now >= self.deadline:
                self.deadline = None
                reason = f"session passed its deadline (--runs-timeout={self.hello_timeout:g}s)"
                self.arm({"kind": "timeout", "reason": reason})
                self.notify({"op": "timeout", "reason": reason})
            if self.next_beat is not None and now >= self.next_beat:
                self.next_beat = now + self.heartbeat
                self.beat()

    def signalled(self) -> None:
        """The process group got SIGINT or SIGTERM: the session got it too; the grace starts now."""
        try:
            numbers = os.read(self.wakeup, 64)
        except OSError:
            return
        for number in numbers:
            if number in _STOPS and self.run_id is not None and not self.let_go:
                self.arm({"kind": "interrupted", "reason": f"interrupted by {signal.Signals(number).name}"})

    def handle(self, message: dict[str, Any]) -> bool:
        """One message from the session; True when the keeper is done."""
        op = message.get("op")
        if op == "held":
            self.send({"op": "held", "value": self.held()})
        elif op == "ping":
            self.send({"op": "pong"})
        elif op == "begin":
            from .owner import Owner

            fields = message["owner"]
            self.owner = Owner(
                host=fields["owner_host"],
                boot_id=fields["owner_boot_id"],
                pid=fields["owner_pid"],
                started=fields["owner_started"],
                ci_url=fields["owner_ci_url"],
                token=fields["owner_token"],
                lease=fields["owner_lease"],
            )
            self.run_id = message["run_id"]
            self.heartbeat = message["heartbeat"]
            self.next_beat = time.monotonic() + self.heartbeat
            self.hello_timeout = message["timeout"]
            if message["timeout"] is not None and self.stop is None:
                self.deadline = time.monotonic() + message["timeout"]
        elif op == "stop":
            self.arm(message)
        elif op == "ending":
            self.ending = True
            self.next_beat = self.deadline = None
        elif op in ("release", "drop"):
            self.let_go_of_lock(remove_file=op == "release")
            self.send({"op": "released"})
        elif op == "done":
            if not self.let_go:
                self.let_go_of_lock(remove_file=False)
            return True
        return False

    def arm(self, request: dict[str, Any]) -> None:
        """A stop was asked for: the grace starts now (the first request counts)."""
        if self.stop is not None:
            return
        self.stop = request
        self.deadline = None
        self.force_at = time.monotonic() + self.grace

    def accept(self) -> None:
        """A worker registering, or the session connecting again after its channel was closed under it."""
        assert self.listener is not None
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", credentials)[0]
        if pid == self.session_pid:
            self._lose_control()
            self.control = connection
            for message in self.pending:
                self.send(message)
            self.pending.clear()
            return
        with connection:
            if not _is_descendant(pid, self.session_pid):
                with contextlib.suppress(OSError):
                    connection.sendall(b'{"op": "refused"}\n')
                return
            try:
                self.workers[pid] = os.pidfd_open(pid)
            except OSError:
                return
            with contextlib.suppress(OSError):
                connection.sendall(b'{"op": "registered"}\n')

    @property
    def store(self) -> Any:
        """The keeper's own store on the session's location, opened at first use."""
        if self._store is None:
            from .store import open_store

            hello = self.hello
            self._store = open_store(
                hello["state_dir"], hello["store_url"], lock_timeout=hello["lock_timeout"], keep=hello["keep"]
            )
        return self._store

    # -- liveness -------------------------------------------------------------------

    def held(self) -> bool:
        if self.lock is None or self.let_go or self.lost:
            return False
        if self.run_id is None:
            return self._held_while_waiting()
        return bool(self.lock.still_held())

    def _held_while_waiting(self) -> bool:
        """Before the run begins: held, or taken back, within :data:`WAITING_RIDE_OUT` at most.

        A waiting session's every wait has its own bound, and the keeper answers one message at
        a time: it never rides out a whole outage here (the session asks again at its next look).
        """
        if getattr(self.lock, "fileno", None) is None:
            return bool(self.lock.still_held())  # the files: a lock on this kernel is asked at once
        return bool(self.lock.still_held(within=WAITING_RIDE_OUT))

    def _liveness_fd(self) -> int | None:
        fileno = getattr(self.lock, "fileno", None)
        if fileno is None or self.let_go or self.lost:
            return None
        fd: int | None = fileno()
        return fd

    def check_liveness_connection(self) -> None:
        """The database connection that holds the lock has something to read: it is closing, or it is news."""
        if self.run_id is None:
            # Still waiting: no run of ours is running; take the lock back if it is free (the
            # session asks before each look and each claim, and runs no test without it).
            self._held_while_waiting()
            return
        if self.lock.still_held(take_back=False):
            return
        if not self.lock.lost_to_a_restart():
            # The server stayed up and ended the connection: readers may already have found the
            # lock free and handed the machine on. Stop now, not at the next heartbeat.
            self.lose("its liveness connection to the database was closed; another session may take the machine")
            return
        # A restart: readers keep the run for its lease. Take the lock back (riding out the
        # outage), then make sure the run is still ours before the tests go on.
        if not self.lock.still_held():
            self.lose("its liveness connection to the database was closed by a restart and it cannot take it again")
            return
        self.beat()

    def beat(self) -> None:
        from .errors import InvalidTransition, StateError
        from .owner import proc_stat
        from .store import RunEnded, RunNotFound

        assert self.run_id is not None
        with contextlib.suppress(OSError, IndexError):
            if proc_stat(self.session_pid)[0] in ("T", "t"):
                return  # a stopped session does not beat, as if it beat itself
        if not self.lock.still_held():
            self.lose(f"run {self.run_id} lost its liveness lock and cannot take it again")
            return
        for attempt in (1, 2):
            try:
                self.store.heartbeat(self.run_id, self.owner)
                self.beat_failing = False
                return
            except RunEnded as ended:
                run = ended.run
                self.lose(f"run {run.id} was ended by someone else ({run.status.value}, {run.error_msg})")
                return
            except InvalidTransition as error:
                self.lose(str(error))
                return
            except RunNotFound:
                self.lose(f"run {self.run_id} is gone from the store {self.hello['state_dir']}")
                return
            except StateError as error:
                # A connection the server ended is opened again by the retry: only a second
                # failure in a row means the store cannot tell now, which is no proof of a loss.
                if attempt == 2:
                    if not self.beat_failing:
                        _say(f"pytest-runs: WARNING: heartbeat of run {self.run_id} failed: {error}")
                    self.beat_failing = True

    def lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = True
        self.next_beat = None
        self.notify({"op": "lost", "reason": reason})
        self.arm({"kind": "lost", "reason": reason})

    def let_go_of_lock(self, *, remove_file: bool) -> None:
        if self.let_go or self.lock is None:
            return
        self.let_go = True
        if remove_file:
            self.lock.release()
        else:
            self.lock.drop()

    # -- ends -----------------------------------------------------------------------

    def kill_workers(self) -> None:
        for pidfd in self.workers.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_gone(list(self.workers.values()), _WORKER_WAIT)

    def session_ended(self) -> None:
        """The session is gone: its workers go too, then the lock (the file left for readers to find free)."""
        self.kill_workers()
        self.let_go_of_lock(remove_file=False)

    def kill_session(self) -> None:
        """The session did not end when asked after its grace: stop it and its descendants, record its end, kill them.

        Stopped first, so that nothing of the session runs a test while its end is recorded,
        and the end is on record when the session's exit is seen.
        """
        from .stopper import descendants

        reason = self.stop["reason"] if self.stop else "interrupted"
        _say(
            f"pytest-runs: the session did not stop within {self.grace:g}s ({reason}), nor end when told to; "
            "killing it (SIGKILL)"
        )
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGSTOP)  # it forks no more while we look
        doomed = [pid for pid in descendants(self.session_pid) if pid != os.getpid()]
        for pid in doomed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        recorded = not self.let_go and self.record_forced_end()
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone([self.pidfd], _WORKER_WAIT)
        self.kill_workers()
        self.let_go_of_lock(remove_file=recorded)

    def record_forced_end(self) -> bool:
        """Record the end of a session that was killed; True when it is on record now."""
        from .errors import StateError
        from .model import Status
        from .store import InvalidTransition, RunEnded, RunNotFound

        request = self.stop or {"kind": "interrupted", "reason": "interrupted"}
        if self.run_id is None or request["kind"] == "lost":
            return False
        status = Status.TIMEOUT if request["kind"] == "timeout" else Status.INTERRUPTED
        message = (
            f"{request['reason']}; killed (SIGKILL) after a grace of {self.grace:g}s: the session did not end "
            f"when asked"
        )
        try:
            run = self.store.finish(
                self.run_id,
                status,
                exit_code=KILLED_EXIT_CODE,
                error_code=status.value,
                error_msg=message,
                owner=self.owner,
            )
        except RunEnded:
            return True
        except (RunNotFound, InvalidTransition):
            return False
        except StateError as error:
            _say(f"pytest-runs: could not record the end of run {self.run_id}: {error}")
            return False
        _say(
            f"pytest-runs: run {run.id} on {run.machine}: {run.status.value} "
            f"(the session was killed, exit status {KILLED_EXIT_CODE})"
        )
        return True


def _noted(signum: int, frame: object) -> None:
    """Python's C handler has written ``signum`` to the wakeup pipe; the loop reads it there."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    control = socket.socket(fileno=int(args[0]))
    keeper = Keeper(control)
    keeper.start()
    keeper.loop()
    os._exit(0)  # nothing buffered to flush: no interpreter teardown for the session to wait for


if __name__ == "__main__":
    main()
