"""The session's side of its keeper (:mod:`pytest_runs.keeper`), and an xdist worker's.

:class:`KeeperClient` starts the keeper process and is, for the session, its
:class:`~pytest_runs.backend.OwnerLock`: ``token``, ``still_held``, ``release`` and
``drop`` are asked of the keeper, which holds the lock. Guarantees:

- The session's process holds no lock descriptor and no lock connection; its only link to
  the keeper is one end of a socket pair, which keeps nothing alive (the keeper follows
  the session's PID, not that socket).
- No thread: the keeper's news (a lost machine, the deadline, the end of the grace) comes
  as ``SIGURG`` and a line on the channel, and the keeper's own death as ``SIGCHLD``; both
  handlers run on the main thread and call back the session (``on_event``). Before each
  test the session also asks :meth:`KeeperClient.events`, in case a test replaced a handler.
- No descriptor is used or closed that is not verifiably the channel still (its
  ``(st_dev, st_ino)`` is checked first): a test that closed every descriptor
  (``os.closerange``) leaves the channel lost, never someone else's file written to or
  closed; the session then connects to the keeper again at its address.
- A forked child of the session (``os.fork`` or C) does nothing through its copy.

:func:`register_worker` ties an xdist worker to its session before it runs any test: the
keeper learns its PID (from the socket's peer credentials) and kills it, and waits until
it is gone, before letting go of the machine when the session dies; and the worker asks the
kernel to SIGKILL it when its parent (the controller) dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import StateError, StoreUnreachable

__all__ = ["WORKER_KEEPER", "KeeperClient", "KeeperGone", "register_worker"]

#: The ``workerinput`` key that tells an xdist worker where the keeper is.
WORKER_KEEPER = "pytest_runs_keeper"
_NOTIFY = signal.SIGURG
_REPLY_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1
#: The folder that holds the ``pytest_runs`` package: the keeper imports this very copy.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class KeeperGone(Exception):
    """The keeper cannot be reached: it has ended (or was killed), and with it the liveness lock."""


class _Channel:
    """A connected socket, used only while its descriptor still names it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        info = os.fstat(sock.fileno())
        self.identity = (info.st_dev, info.st_ino)
        self.buffer = b""

    def intact(self) -> bool:
        try:
            info = os.fstat(self.sock.fileno())
        except (OSError, ValueError):
            return False
        return (info.st_dev, info.st_ino) == self.identity

    def forget(self) -> None:
        """Let go of the socket object without closing a descriptor number that may now be another's."""
        with contextlib.suppress(OSError, ValueError):
            if self.intact():
                self.sock.close()
            else:
                self.sock.detach()


class KeeperClient:
    """The session's keeper; see the module docs."""

    def __init__(self, process: subprocess.Popen[bytes], channel: _Channel, token: str, address: str) -> None:
        self.process = process
        self.token = token
        self.address = address
        self._channel: _Channel | None = channel
        self._pid = os.getpid()
        self._events: list[dict[str, Any]] = []
        self._busy = False
        self._pending = False
        self._finished = False
        self._on_event: Callable[[dict[str, Any]], None] | None = None
        self._previous: dict[int, Any] = {}

    # -- start and end --------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        state_dir: Path,
        store_url: str | None,
        lock_timeout: float,
        keep: int | None,
        grace: float,
        ignored: Collection[int] = (),
    ) -> KeeperClient:
        """Start the keeper and wait until it holds the liveness lock (``ignored``: signals the session ignores).

        :class:`StoreUnreachable` or :class:`StateError` (in the keeper's words) if it cannot take it.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
        try:
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", "pytest_runs.keeper", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=env,
            )
        except OSError as error:
            ours.close()
            raise StateError(f"cannot start the keeper process ({sys.executable}): {error}") from None
        finally:
            theirs.close()
        channel = _Channel(ours)
        hello = {
            "op": "hello",
            "pid": os.getpid(),
            "state_dir": str(state_dir),
            "store_url": store_url,
            "lock_timeout": lock_timeout,
            "keep": keep,
            "grace": grace,
            "ignored": [int(signum) for signum in ignored],
        }
        client = cls(process, channel, token="", address="")
        try:
            client._send(hello)
            answer = client._reply()
        except KeeperGone:
            client._reap()
            raise StateError(f"the keeper process ended as it started (exit status {process.returncode})") from None
        if answer.get("op") == "error":
            client._reap()
            message = str(answer.get("message"))
            raise StoreUnreachable(message) if answer.get("unreachable") else StateError(message)
        client.token, client.address = str(answer["token"]), str(answer["address"])
        return client

    def done(self) -> None:
        """The session ends: the keeper lets go (if it still holds the lock) and exits; wait for it."""
        if os.getpid() != self._pid or self._finished:
            return
        with contextlib.suppress(KeeperGone):
            self._send({"op": "done"})
        self._reap()

    def _reap(self) -> None:
        self._finished = True
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._channel is not None:
            self._channel.forget()
            self._channel = None

    # -- the owner lock -------------------------------------------------------------

    def still_held(self) -> bool:
        """Whether the keeper still holds the liveness lock (False if the keeper is gone)."""
        if os.getpid() != self._pid:
            return False
        try:
            return bool(self._request({"op": "held"}).get("value"))
        except KeeperGone:
            return False

    def release(self) -> None:
        """The run is recorded as ended: the keeper removes the lock file and lets go."""
        self._let_go("release")

    def drop(self) -> None:
        """The keeper lets go but leaves the file, so that a run naming the token is stale at once."""
        self._let_go("drop")

    def _let_go(self, op: str) -> None:
        if os.getpid() != self._pid or self._finished:
            return
        with contextlib.suppress(KeeperGone):
            self._request({"op": op})

    # -- while the session runs -----------------------------------------------------

    def begin(self, run_id: str, owner: dict[str, Any], heartbeat: float, timeout: float | None) -> None:
        """The run is claimed: the keeper beats for it and keeps its deadline."""
        self._tell({"op": "begin", "run_id": run_id, "owner": owner, "heartbeat": heartbeat, "timeout": timeout})

    def ask_to_stop(self, kind: str, reason: str) -> bool:
        """A stop was asked for: the keeper starts the grace. False if it cannot be told."""
        return self._tell({"op": "stop", "kind": kind, "reason": reason})

    def ending(self) -> None:
        """The session records its end: no more heartbeats, no deadline (the grace stays armed)."""
        self._tell({"op": "ending"})

    def alive(self) -> bool:
        """Whether the keeper process is still running."""
        if self._finished:
            return True  # ended because we said so
        return self.process.poll() is None

    def events(self) -> list[dict[str, Any]]:
        """The keeper's news not yet handled (``lost``, ``timeout``, ``force``; ``gone`` if it died)."""
        if os.getpid() != self._pid:
            return []
        with contextlib.suppress(KeeperGone):
            self._drain(0.0)
        if not self._finished and self.process.poll() is not None:
            self._finished = True
            self._events.append({"op": "gone", "status": self.process.returncode})
        events, self._events = self._events, []
        return events

    def worker_input(self) -> dict[str, Any]:
        """What an xdist worker needs to register with the keeper."""
        return {"address": self.address, "controller": self._pid}

    def install(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Hand the keeper's news to ``on_event`` as it comes (main thread only; elsewhere nothing happens)."""
        self._on_event = on_event
        with contextlib.suppress(ValueError):  # not the main thread: events() before each test only
            for signum in (_NOTIFY, signal.SIGCHLD):
                if signum == signal.SIGCHLD and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # children reaped by the kernel, as the user chose: asked before each test only
                self._previous[signum] = signal.signal(signum, self._on_signal)
                signal.siginterrupt(signum, False)  # a test's system calls are restarted, as without us

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous.clear()
        self._on_event = None

    def dispatch(self) -> None:
        """Hand every event waiting to ``on_event``.

        A stop that ``on_event`` asks for may interrupt the main thread right there (a
        ``KeyboardInterrupt``): the events after it do not matter any more, the first stop wins.
        """
        __tracebackhide__ = True
        if self._on_event is None:
            return
        for event in self.events():
            self._on_event(event)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True  # pytest shows where the test was interrupted, not this handler
        if os.getpid() != self._pid:
            return
        previous = self._previous.get(signum)
        if signum == signal.SIGCHLD and callable(previous):
            previous(signum, frame)
        if self._busy:
            self._pending = True  # the request under way reads the channel; it dispatches after
            return
        self.dispatch()

    # -- the channel ----------------------------------------------------------------

    def _fd_channel(self) -> _Channel:
        """The channel, connected again if a test closed it under us; :class:`KeeperGone` if that fails."""
        if self._finished:
            raise KeeperGone("the keeper has ended")
        channel = self._channel
        if channel is not None and channel.intact():
            return channel
        if channel is not None:
            channel.forget()
            self._channel = None
        if not self.address:
            raise KeeperGone("the channel to the keeper was closed")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise KeeperGone("the keeper does not answer at its address") from None
        self._channel = channel = _Channel(sock)
        # A round trip: the news the keeper kept while the channel was gone comes before its answer.
        self._send({"op": "ping"})
        if self._drain(_REPLY_TIMEOUT) is None:
            raise KeeperGone("the keeper does not answer at its address")
        return channel

    def _send(self, message: dict[str, Any]) -> None:
        channel = self._fd_channel()
        try:
            channel.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            raise KeeperGone("the keeper closed its channel") from None

    def _tell(self, message: dict[str, Any]) -> bool:
        if os.getpid() != self._pid:
            return False
        try:
            self._send(message)
        except KeeperGone:
            return False
        return True

    def _drain(self, timeout: float) -> dict[str, Any] | None:
        """Read what the keeper sent (waiting up to ``timeout`` for something); return a reply, keep events."""
        channel = self._fd_channel()
        reply: dict[str, Any] | None = None
        fd = channel.sock.fileno()
        wait = timeout
        while True:
            lines = channel.buffer.split(b"\n")
            channel.buffer = lines.pop()
            for line in lines:
                with contextlib.suppress(ValueError):
                    message: dict[str, Any] = json.loads(line)
                    if message.get("op") in ("lost", "timeout", "force"):
                        self._events.append(message)
                    else:
                        reply = message
            if reply is not None:
                return reply
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise KeeperGone("the keeper closed its channel")
            channel.buffer += chunk
            wait = 0.0 if timeout == 0.0 else wait

    def _reply(self) -> dict[str, Any]:
        reply = self._drain(_REPLY_TIMEOUT)
        if reply is None:
            raise KeeperGone(f"the keeper did not answer within {_REPLY_TIMEOUT:g}s")
        return reply

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        self._busy = True
        try:
            self._send(message)
            return self._reply()
        finally:
            self._busy = False
            if self._pending:
                self._pending = False
                self.dispatch()


def register_worker(info: dict[str, Any]) -> str | None:
    """In an xdist worker: register with the session's keeper; the reason it could not, else ``None``.

    Also asks the kernel to SIGKILL this worker when its parent (the controller) dies.
    """
    if os.getppid() == info.get("controller"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != info.get("controller"):
            os._exit(76)  # the controller died before the parent-death signal was set
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(_REPLY_TIMEOUT)
        sock.connect(str(info["address"]))
        answer = b""
        while b"\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError as error:
        return f"cannot reach the session's keeper: {error}"
    finally:
        sock.close()
    if b'"registered"' not in answer:
        return "the session's keeper refused this worker (it is not a process of the session)"
    return None
