"""The link to the daemon: one session per namespace, reconnection with backoff after an outage, and
`call_daemon`, which turns a daemon problem into a logged miss instead of an exception into vLLM."""

from __future__ import annotations

import collections
import os
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from polarkvd.client import EngineClient
from polarkvd.connectors.vllm.options import Options
from polarkvd.errors import DaemonUnavailable, ErrorCode, PolarKVError
from polarkvd.types import Namespace

if TYPE_CHECKING:
    pass


# Under "vllm." so vLLM's logging config (format, VLLM_LOGGING_LEVEL) applies to our lines too.
logger = init_logger("vllm.polarkvd.connector")


_RETRY_FIRST = 0.5  # seconds before the first reconnection attempt
#: Errors to `hello` that retrying cannot cure (bad namespace, protocol mismatch).
_PERMANENT = frozenset(
    {ErrorCode.NAMESPACE, ErrorCode.BAD_REQUEST, ErrorCode.BAD_VERSION, ErrorCode.UNKNOWN_OP}
)


class _Outages:
    """One warning per outage and process, however many connector sides notice it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: set[str] = set()

    def down(self, path: str, message: str, *args: object) -> None:
        with self._lock:
            first = path not in self._down
            self._down.add(path)
        if first:
            logger.warning(message, *args)
        else:
            logger.debug(message, *args)

    def up(self, path: str) -> None:
        with self._lock:
            was_down = path in self._down
            self._down.discard(path)
        if was_down:
            logger.info("polarkvd daemon at %s is reachable again: KV cache hits and stores resume", path)


_OUTAGES = _Outages()


class DaemonLink:
    """This side's sessions with the daemon, one per namespace (salt, TP rank), and its reconnect backoff.

    Not thread-safe: every socket call happens on the thread vLLM calls the connector on.
    """

    def __init__(self, opts: Options, role: str, clock: Callable[[], float] = time.monotonic) -> None:
        from polarkvd.config.machine import default_engine_socket

        self.path = str(opts.socket or default_engine_socket())
        self.role = role
        self._opts = opts
        self._clock = clock
        self._engine_id = opts.engine_id or f"vllm-{_socket.gethostname()}-{os.getpid()}-{role}"
        self._sessions: collections.OrderedDict[Namespace, EngineClient] = collections.OrderedDict()
        self._refused: set[Namespace] = set()
        self._paused: dict[Namespace, float] = {}  # namespace -> when to try attaching it again
        self._down = False
        self._retry_at = 0.0
        self._backoff = _RETRY_FIRST
        #: Attach with `vram=True` (a CUDA worker with `Options.vram`): the daemon's L1 pool is mapped.
        self.vram = False
        #: Called before sessions close: copies in flight into their L1 pool must finish first.
        self.before_close: Callable[[], None] | None = None
        #: The engine's KV event publisher (kv_events.py), passed at hello with the default namespace
        #: of TP rank 0 (one engine, one block table: one subscription).
        self.kv_events: dict[str, str] | None = None

    def _closing(self) -> None:
        if self.before_close is not None:
            try:
                self.before_close()
            except Exception as e:  # noqa: BLE001 - a broken device: closing must still happen
                logger.warning("polarkvd: waiting for copies in flight failed: %r", e)

    @property
    def available(self) -> bool:
        """False while the daemon is down and the next reconnection attempt is not due yet."""
        return not self._down or self._clock() >= self._retry_at

    def session(self, ns: Namespace) -> EngineClient | None:
        """The session for `ns`, connecting if needed; None when the daemon is down or refused it.
        Its `ns_digest` (keyed with the daemon's secret seed) is what this side's keys chain from."""
        client = self._sessions.get(ns)
        if client is not None:
            if not client.connection_lost():
                self._sessions.move_to_end(ns)
                return client
            # The daemon closed it (it exited or restarted): attach again now, so that the request at
            # hand is served by a daemon that is back, rather than failing on the dead connection.
            del self._sessions[ns]
            self._closing()
            client.close()
            logger.info("polarkvd daemon at %s closed a session (restarted?): attaching again", self.path)
        if ns in self._refused or not self.available or self._paused.get(ns, 0.0) > self._clock():
            return None
        try:
            # The scheduler only looks pages up: it never maps the arena (costly for a large one).
            client = EngineClient(
                ns,
                self._engine_id,
                self.path,
                timeout=self._opts.timeout,
                commit_timeout=self._opts.commit_timeout,
                map_arena=self.role != "scheduler",
                vram=self.vram,
                kv_events=self.kv_events if not ns.cache_salt and ns.tp_rank == 0 else None,
            )
        except DaemonUnavailable as e:
            self.failed(e)
            return None
        except PolarKVError as e:
            if e.code in _PERMANENT:  # the daemon will never take this namespace from this connector
                self._refused.add(ns)
                logger.error(
                    "polarkvd refused namespace %s (%s): %s; its requests are not cached",
                    ns.model,
                    ns.layout,
                    e,
                )
            else:  # e.g. too many sessions: try this namespace again later
                self._paused[ns] = self._clock() + self._opts.retry_seconds
                logger.warning("polarkvd did not attach namespace %s: %s; retrying later", ns.model, e)
            return None
        except OSError as e:  # e.g. the arena cannot be mapped (permissions on /dev/shm)
            self.failed(e)
            return None
        if client.page_bytes != ns.page_bytes:
            self._refused.add(ns)
            client.close()
            logger.error(
                "polarkvd at %s computes page sizes differently from this connector "
                "(version skew between polarkvd packages?); requests in namespace %s are not cached",
                self.path,
                ns.model,
            )
            return None
        if self._down:
            self._down = False
            self._backoff = _RETRY_FIRST
        _OUTAGES.up(self.path)
        self._sessions[ns] = client
        while len(self._sessions) > self._opts.max_sessions:
            _, old = self._sessions.popitem(last=False)
            self._closing()
            old.close()
        return client

    def failed(self, exc: BaseException) -> None:
        """The daemon is unreachable: drop every session, serve without it, retry with backoff."""
        if self._sessions:
            self._closing()
        for client in self._sessions.values():
            client.close()
        self._sessions.clear()
        now = self._clock()
        if self._down and now < self._retry_at:
            return  # another call meeting the same outage
        if self._down:  # a reconnection attempt failed: wait longer
            self._backoff = min(self._backoff * 2, self._opts.retry_seconds)
        self._down = True
        self._retry_at = now + min(self._backoff, self._opts.retry_seconds)
        _OUTAGES.down(
            self.path,
            "polarkvd daemon unreachable (%s): vLLM keeps serving without the shared KV cache "
            "(no hits, no stores) and reconnects when it is back (retrying at most every %g s)",
            exc,
            self._opts.retry_seconds,
        )

    def close(self) -> None:
        if self._sessions:
            self._closing()
        for client in self._sessions.values():
            client.close()
        self._sessions.clear()


def call_daemon(
    link: DaemonLink,
    what: str,
    fn: Callable[[], Any],
    seconds: collections.defaultdict[str, float] | None = None,
) -> Any:
    """Run one daemon call; None (logged) instead of an exception, marking the daemon down if it is."""
    t0 = time.perf_counter()
    try:
        return fn()
    except DaemonUnavailable as e:
        link.failed(e)
    except PolarKVError as e:
        if e.code is ErrorCode.DRAINING:
            logger.debug("polarkvd is draining: %s skipped", what)
        else:
            logger.warning("polarkvd %s failed: %s", what, e)
    finally:
        if seconds is not None:
            seconds[f"daemon_{what}"] += time.perf_counter() - t0
    return None
