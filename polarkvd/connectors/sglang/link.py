"""The link to the daemon from SGLang's threads: one session per thread, reconnection with backoff,
one warning per outage.

SGLang calls a storage backend from several threads at once (the prefetch thread asks `batch_exists`,
the prefetch I/O thread `batch_get_v1`, the backup thread `batch_set_v1`), and an `EngineClient` is
one connection for one thread. So each thread gets a session of its own, attached lazily on its
first call; the arena is mapped once per process (`client._ArenaMaps`). An outage noticed by one
thread bumps a generation: every other thread's session is closed by that thread at its next call,
and reattached once the backoff allows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from polarkvd.client import EngineClient
from polarkvd.errors import DaemonUnavailable, ErrorCode, PolarKVError
from polarkvd.types import Namespace

log = logging.getLogger("polarkvd.connectors.sglang")

_RETRY_FIRST = 0.5  # seconds before the first reconnection attempt
#: Errors to `hello` that retrying cannot cure (bad namespace, protocol mismatch).
_PERMANENT = frozenset(
    {ErrorCode.NAMESPACE, ErrorCode.BAD_REQUEST, ErrorCode.BAD_VERSION, ErrorCode.UNKNOWN_OP}
)


@dataclass
class Session:
    """One thread's session: the client, the arena's address in this process, and a lock held while
    the thread uses it (so `close()` from another thread waits for a call in flight)."""

    client: EngineClient
    generation: int
    base: int  # address of the arena's first byte in this process
    #: Reentrant: a call that finds the daemon gone closes its own session while holding it.
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: Set under `lock` when closed: the arena may be unmapped, `base` must not be touched again.
    closed: bool = False


class DaemonLink:
    """Sessions of one namespace, one per calling thread, and the shared outage state."""

    def __init__(
        self,
        namespace: Namespace,
        path: str,
        engine_id: str,
        timeout: float,
        commit_timeout: float,
        retry_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.path = path
        self._engine_id = engine_id
        self._timeout = timeout
        self._commit_timeout = commit_timeout
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[int, Session] = {}
        self._generation = 0
        self._down = False
        self._warned = False
        self._retry_at = 0.0
        self._backoff = _RETRY_FIRST
        self._attached = 0  # sessions attached so far (their engine ids are numbered)
        self.closed = False
        #: Why the daemon will never take this namespace (None while it might).
        self.refused: str | None = None

    @property
    def down(self) -> bool:
        return self._down

    def session(self) -> Session | None:
        """This thread's session, attaching one if none is open and the backoff allows; None while
        the daemon is down (or refused the namespace, or the link is closed)."""
        tid = threading.get_ident()
        with self._lock:
            s = self._sessions.get(tid)
            if s is not None and s.generation == self._generation and not self.closed:
                if not s.client.connection_lost():
                    return s
                # The daemon closed it (it restarted while this thread was idle): attach again now,
                # so that this call is served by the daemon that is back instead of failing.
                log.info("polarkvd daemon at %s closed a session (restarted?): attaching again", self.path)
            stale = self._sessions.pop(tid, None)
            others = [(t, o) for t, o in self._sessions.items() if o.generation != self._generation]
            due = not (self.closed or self.refused or (self._down and self._clock() < self._retry_at))
            if due:
                self._attached += 1
            number = self._attached
        if stale is not None:
            _close(stale)
        self._sweep(others)
        if not due:
            return None
        try:
            client = EngineClient(
                self.namespace,
                f"{self._engine_id}-s{number}",
                self.path,
                timeout=self._timeout,
                commit_timeout=self._commit_timeout,
            )
        except DaemonUnavailable as e:
            self.failed(e)
            return None
        except PolarKVError as e:
            if e.code in _PERMANENT:
                self._refuse(f"polarkvd at {self.path} refused namespace {self.namespace.model}: {e}")
            else:  # e.g. too many sessions: like an outage, retried later
                self.failed(e)
            return None
        except OSError as e:  # the arena cannot be mapped (permissions on /dev/shm)
            self.failed(e)
            return None
        if client.page_bytes != self.namespace.page_bytes:
            client.close()
            self._refuse(
                f"polarkvd at {self.path} computes page sizes differently from this backend "
                f"({client.page_bytes} vs {self.namespace.page_bytes} bytes; version skew?)"
            )
            return None
        arena = np.frombuffer(client.arena, dtype=np.uint8)
        base = int(arena.ctypes.data)
        del arena  # no export of the mapping may outlive this line (it must close with the session)
        s = Session(client, 0, base)
        with self._lock:
            if any(o.base != base for o in self._sessions.values()):
                # Another arena: the daemon was restarted while those sessions sat idle (they map
                # the old one, and their sockets are dead). They are stale now.
                self._generation += 1
            s.generation = self._generation
            others = [(t, o) for t, o in self._sessions.items() if o.generation != self._generation]
            if self.closed:
                keep = False
            else:
                keep = True
                self._sessions[tid] = s
                was_down, self._down = self._down, False
                self._backoff = _RETRY_FIRST
                warned, self._warned = self._warned, False
        self._sweep(others)
        if not keep:
            _close(s)
            return None
        if was_down and warned:
            log.info(
                "polarkvd daemon at %s is reachable again: HiCache storage hits and writes resume", self.path
            )
        return s

    def _sweep(self, stale: list[tuple[int, Session]]) -> None:
        """Close other threads' sessions of an earlier generation (a daemon that went away) that are
        not in use: each keeps that daemon's arena mapped until closed, and a thread that stays idle
        would never close its own. One in use is left to its thread (never waited for here: two
        threads sweeping each other would deadlock)."""
        for tid, s in stale:
            if not s.lock.acquire(blocking=False):
                continue
            try:
                with self._lock:
                    if self._sessions.get(tid) is s:
                        del self._sessions[tid]
                _close(s)
            finally:
                s.lock.release()

    def drop_current(self) -> None:
        """Close this thread's session (the thread that attached at start does not call again)."""
        with self._lock:
            s = self._sessions.pop(threading.get_ident(), None)
        if s is not None:
            _close(s)

    def _refuse(self, message: str) -> None:
        with self._lock:
            first = self.refused is None
            self.refused = message
        if first:
            log.error("%s; SGLang's pages of this model are not stored in polarkvd", message)

    def failed(self, exc: BaseException) -> None:
        """The daemon is unreachable: drop this thread's session, count an outage (one warning),
        retry with backoff; other threads drop theirs at their next call."""
        tid = threading.get_ident()
        now = self._clock()
        with self._lock:
            s = self._sessions.pop(tid, None)
            same_outage = self._down and now < self._retry_at
            if not same_outage:
                if self._down:  # a reconnection attempt failed: wait longer
                    self._backoff = min(self._backoff * 2, self._retry_seconds)
                self._down = True
                self._generation += 1
                self._retry_at = now + min(self._backoff, self._retry_seconds)
            warn = not self._warned
            self._warned = True
        if s is not None:
            _close(s)
        if warn:
            log.warning(
                "polarkvd daemon unreachable (%s): SGLang keeps serving without it (HiCache storage "
                "misses, no writes) and reconnects when it is back (retrying at most every %.0f s)",
                exc,
                self._retry_seconds,
            )
        else:
            log.debug("polarkvd still unreachable: %s", exc)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            _close(s)


def _close(s: Session) -> None:
    with s.lock:  # a call in flight on the owning thread finishes first
        s.closed = True
        try:
            s.client.close()
        except Exception as e:  # noqa: BLE001 - closing a broken session: nothing more to do
            log.debug("closing a polarkvd session: %r", e)
