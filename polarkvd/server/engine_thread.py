"""The engine socket's server: a thread per engine connection, blocking I/O, lookups answered there.

Why: a lookup sits on the request path of every prefill. Answered on the connection's own thread it
skips the event loop's wakeup and callbacks, and above all it no longer waits behind whatever the
loop is doing (stores, evictions, disk completions, `status`, `top`): with a short GIL switch
interval (daemon.py) a lookup waits at most about that long for the loop. A lookup without `pin`
only reads, so it needs nothing from the loop. Measured numbers: docs/BENCHMARKS.md, "bench datapath".

Who owns what:
- The event loop owns the listening socket (it accepts in a reader callback), the set of
  connections, and the Manager: every op except a read-only lookup runs there, exactly as on
  `connection.RequestServer`, through the same `parse_request` / `answer`, and the loop sends its
  reply itself when the socket takes it at once (the engine does not wait for the thread to wake).
- A connection's thread owns its socket. It reads frames, validates them (`parse_request`: the same
  error replies as everywhere), answers the ops in `thread_handlers` itself, and hands every other
  request to the loop; before it answers the next request, the one on the loop is finished: replies
  go out in request order. A thread handler returns `ON_LOOP` to hand its request over after all
  (a lookup with `pin`, or a local miss that asks the cluster). Handing over is a queue plus an
  eventfd the loop watches (`submit`): 7-10 us a round trip under uvloop where
  `call_soon_threadsafe` took 15-40 us (its wakeup costs uvloop an extra iteration, and more the
  shorter the GIL switch interval). Every wakeup and every GIL handoff between the two threads costs
  several microseconds of CPU here, so the thread does not wait for the loop's answer: it waits for
  the engine's next request (see ThreadConnection).
- A thread handler must not change shared state: it may read (single dict gets and attribute reads
  are atomic under the GIL) and append to a thread-safe queue (Manager.lookup_in_thread).
- When a connection ends (EOF, reset, a frame too large, daemon stop) its thread closes the socket
  and submits `on_close` (session detach) through the same queue, so detach runs after every
  request the thread handed over. A killed engine is noticed at once even while its last request is
  still on the loop (a load waiting for the disk): the thread waits in `poll` on the socket.
- Threads are bounded by configuration: attached connections by `daemon.max_sessions` (hello
  refuses more), connections that have not attached by `max_unattached`: a new connection over it
  closes the oldest unattached one (a `too_large` error frame, then close), so idle or leaked
  connections cannot lock engines out, and one that has not attached within `hello_timeout` is
  closed. Past `max_connections` in all (threads still ending included) new connections are refused
  at accept, without a thread. The listen backlog is large, and clients wait for room in it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polarkvd.errors import ErrorCode
from polarkvd.server.connection import (
    LISTEN_BACKLOG,
    OUT_OF_DESCRIPTORS,
    Request,
    SpareDescriptor,
    answer,
    claim_socket_path,
    error_reply,
    parse_request,
    send_refusal,
)
from polarkvd.wire import frames as P

log = logging.getLogger(__name__)

#: Returned by a thread handler: "answer this request on the event loop instead".
ON_LOOP: Any = object()
#: How long `stop` waits for connection threads to end after shutting their sockets.
STOP_SECONDS = 2.0
RECV_BYTES = 1 << 16
#: Connections the kernel queues before the loop accepts them (capped by net.core.somaxconn): a
#: burst of engines connecting at once waits there instead of being refused.
#: At most one warning per this many seconds about refused or timed-out connections (a flood must
#: not flood the log too); the counters have every one.
WARN_SECONDS = 10.0

ThreadHandler = Callable[[Any, dict[str, Any]], Any]  # (connection, args) -> result dict or ON_LOOP


_NO_DESCRIPTORS = (
    "the daemon is out of file descriptors (its RLIMIT_NOFILE: LimitNOFILE= in its systemd unit); "
    "attached engines go on, new ones are refused: try again later"
)


class _ConnectionEnded(Exception):
    """The engine went away (or the daemon is stopping) while a request was in flight."""


class _Pending:
    """A request handed to the loop. The loop sends the reply itself when the socket takes it at once;
    `unsent` is what it could not send (the thread sends that). `finished` is released by the loop
    when it is done with the request: a lock used as a one-shot event (cheaper than a Future)."""

    __slots__ = ("finished", "unsent")

    def __init__(self) -> None:
        self.finished = threading.Lock()
        self.finished.acquire()
        self.unsent = b""


class ThreadConnection:
    """One engine connection and its thread. Engine handlers read `session` and `closed` (as on
    `connection.Connection`); `session` is set on the loop by hello before the thread reads the next
    request, `closed` by this thread when the connection ends.

    After handing a request to the loop the thread does not wait for it to be answered: it waits for
    the engine's next request (the loop sends the reply), so each side wakes once per request. Only
    before it answers the next request does it make sure the previous one is finished (replies go
    out in request order), and it sends whatever the loop could not.
    """

    _names = itertools.count(1)

    def __init__(self, server: EngineThreadServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.session: Any = None
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()  # this connection's async handlers running on the loop
        self._pending: _Pending | None = None  # the request the loop is on, if any (this thread's)
        # The loop wakes this thread through `_wake` when it hands back bytes it could not send.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._poll.register(self._wake, select.POLLIN)
        # Held around closing the socket and `_wake` (this thread) and around what the loop does with
        # them (`shutdown` at stop, `_finish_on_loop`): a closed descriptor's number is reused at once.
        self._close_lock = threading.Lock()
        self._open = True
        self.hello_deadline: asyncio.TimerHandle | None = None  # the loop's: closes it unless attached
        self.thread = threading.Thread(
            target=self._run, name=f"polarkv-engine-{next(self._names)}", daemon=True
        )

    def close_unstarted(self) -> None:
        """Release the socket and eventfd of a connection whose thread could not start."""
        self._open = False
        self.sock.close()
        os.close(self._wake)

    def send_now(self, data: bytes) -> None:
        """On the loop: send `data` if the socket takes it without blocking (else it is dropped)."""
        with self._close_lock:
            if self._open:
                try:
                    self.sock.send(data, socket.MSG_DONTWAIT)
                except OSError:
                    pass

    def shutdown(self) -> None:
        """Wake the thread from a blocking recv or poll (it reads EOF) and fail any send: daemon stop."""
        with self._close_lock:
            if self._open:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the engine reset it already

    def _run(self) -> None:
        try:
            self._serve()
        except (_ConnectionEnded, OSError):
            pass  # reset, broken pipe, shut down at stop: the engine is gone either way
        except Exception:
            log.exception("engine connection thread failed")
        finally:
            self.closed = True
            with self._close_lock:
                self._open = False
                self.sock.close()
                os.close(self._wake)
            self.server._ended(self)

    def _serve(self) -> None:
        sock = self.sock
        recv, sendall, reply = sock.recv, sock.sendall, self._reply
        reader = P.FrameReader(self.server.max_frame_bytes)
        while True:
            if self._pending is not None:
                self._await_next()
            data = recv(RECV_BYTES)
            if not data:
                return
            try:
                frames = reader.feed(data)
            except P.FrameTooLarge as e:
                sendall(P.reply_error(0, e.code, str(e)))
                return  # and close: the stream cannot be resynchronised after a bogus length
            for payload in frames:
                out = reply(payload)
                if out:
                    sendall(out)

    def _reply(self, payload: bytes) -> bytes:
        """Answer one request; returns what to send (nothing when the request went to the loop)."""
        server = self.server
        if self._pending is not None:
            self._settle()  # a request that came with the one before: answer in order
        req = parse_request(payload, server.name, server.handlers)
        if type(req) is bytes:
            return req
        assert isinstance(req, Request)
        here = server.thread_handlers.get(req.op)
        if here is not None:
            try:
                result = here(self, req.args)
            except Exception as e:
                return error_reply(server.name, req.rid, req.op, e)
            if result is not ON_LOOP:
                return P.reply_ok(req.rid, result)
        self._to_loop(req)
        return b""

    def _to_loop(self, req: Request) -> None:
        server = self.server
        pending = self._pending = _Pending()

        def finish(data: bytes) -> None:
            self._finish_on_loop(pending, data)

        def run() -> None:
            try:
                if server.before_loop_op is not None:
                    server.before_loop_op(self)
                answer(self, req, finish)
            except Exception as e:  # never leave the thread waiting
                finish(error_reply(server.name, req.rid, req.op, e))

        server.submit(run)

    def _finish_on_loop(self, pending: _Pending, data: bytes) -> None:
        """On the loop: send the reply if the socket takes it without blocking (it fits the buffer
        unless the engine stopped reading); hand the rest to the thread, and wake it for that."""
        with self._close_lock:
            if self._open:
                try:
                    sent = self.sock.send(data, socket.MSG_DONTWAIT)
                except OSError:  # would block, or reset: the thread sends it, or finds out
                    sent = 0
                if sent < len(data):
                    pending.unsent = data[sent:]
                    os.eventfd_write(self._wake, 1)
            pending.finished.release()

    def _await_next(self) -> None:
        """With a request on the loop: wait for the engine's next request (or its leaving), or for the
        loop to hand back what it could not send."""
        pending = self._pending
        assert pending is not None
        if not pending.finished.acquire(blocking=False):
            ready = dict(self._poll.poll())
            if self._wake not in ready and ready.get(self.sock.fileno(), 0) and self._peer_gone():
                raise _ConnectionEnded  # the engine left while the loop works: detach now, not after
            pending.finished.acquire()  # normally done already; a pipelined request waits here
        self._send_unsent(pending)

    def _settle(self) -> None:
        """Wait until the request on the loop is finished and its reply sent (answers stay in order)."""
        pending = self._pending
        assert pending is not None
        pending.finished.acquire()
        self._send_unsent(pending)

    def _send_unsent(self, pending: _Pending) -> None:
        self._pending = None
        if pending.unsent:
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
            self.sock.sendall(pending.unsent)

    def _peer_gone(self) -> bool:
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


class EngineThreadServer:
    """The engine socket: accepts on the event loop, serves each connection on its own thread.

    `handlers` run on the loop (as on `RequestServer`); `thread_handlers` (a subset of the same ops)
    run on the connection's thread first. `before_loop_op(conn)` runs on the loop before every
    handed-over request (the manager applies the LRU touches of thread-side lookups and of the
    connection's lookups from the shared table there, so the policy sees requests in order). `on_close(conn)` runs on the loop once per connection, after its last request.
    """

    def __init__(
        self,
        name: str,
        handlers: dict[str, Any],
        thread_handlers: dict[str, ThreadHandler],
        *,
        max_frame_bytes: int = P.MAX_FRAME,
        on_close: Callable[[Any], None] | None = None,
        before_loop_op: Callable[[Any], None] | None = None,
        max_unattached: int = 64,
        max_connections: int = 1024 + 64,
        hello_timeout: float = 10.0,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.name = name
        self.handlers = handlers
        self.thread_handlers = thread_handlers
        self.max_frame_bytes = max_frame_bytes
        self.on_close = on_close
        self.before_loop_op = before_loop_op
        self.max_unattached = max_unattached
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self.counters: dict[str, int] = counters if counters is not None else collections.Counter()
        self.connections: set[ThreadConnection] = set()
        # Connections accepted and not known to have attached, oldest first: pruned of attached ones
        # (a session set by hello) only when full, so that hello needs no hook here.
        self._unattached: dict[ThreadConnection, None] = {}
        self._warned_at = -WARN_SECONDS
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start
        self.path: Path | None = None
        self._listener: socket.socket | None = None
        # Work handed to the loop by connection threads, run in order by `_run_work`, which the
        # eventfd wakes. The eventfd is closed only once no thread can write to it any more.
        self._work: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_fd = -1
        #: held for the moment the daemon runs out of descriptors: freed to accept a connection
        #: just long enough to tell it why it is refused (else it would wait for hello in vain)
        self._spare: SpareDescriptor | None = None

    async def start(self, path: Path, mode: int) -> None:
        claim_socket_path(path)
        self.loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, mode)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.path = path
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._spare = SpareDescriptor()
        self.loop.add_reader(self._wake_fd, self._run_work)
        self.loop.add_reader(listener.fileno(), self._accept)

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop, after everything submitted before it. Any thread."""
        self._work.append(fn)
        os.eventfd_write(self._wake_fd, 1)

    def _run_work(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass  # another wakeup's read took it; the queue is what counts
        work = self._work
        while work:  # only the loop pops
            fn = work.popleft()
            try:
                fn()
            except Exception:
                log.exception("%s socket: work handed to the loop failed", self.name)

    def _accept(self) -> None:
        listener = self._listener
        for _ in range(64):  # a burst of connects must not hold the loop for long
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors and the like: pause instead of spinning
                if e.errno in OUT_OF_DESCRIPTORS and self._refuse_without_descriptors(listener):
                    continue
                if e.errno in OUT_OF_DESCRIPTORS and self._spare is not None and self._spare.ready:
                    return  # none waiting (accept fails first for want of a descriptor)
                self._pause_accept(e)
                return
            if len(self.connections) >= self.max_connections:
                self._refuse(sock)
                continue
            if len(self._unattached) >= self.max_unattached:
                self._unattached = {c: None for c in self._unattached if c.session is None}
                if len(self._unattached) >= self.max_unattached:
                    oldest = next(iter(self._unattached))
                    del self._unattached[oldest]
                    self._drop_oldest(oldest)
            sock.setblocking(True)
            try:
                conn = ThreadConnection(self, sock)
            except OSError as e:  # no descriptor for its eventfd
                self._refuse(sock, _NO_DESCRIPTORS)
                self._pause_accept(e)
                return
            try:
                conn.thread.start()
            except RuntimeError as e:  # no more threads: refuse this connection, keep the daemon
                log.error(
                    "%s socket: cannot start a connection thread (%s); connection refused", self.name, e
                )
                conn.close_unstarted()
                continue
            self.connections.add(conn)
            self._unattached[conn] = None
            conn.hello_deadline = self.loop.call_later(self.hello_timeout, self._hello_deadline, conn)

    def _refuse_without_descriptors(self, listener: socket.socket) -> bool:
        """Out of file descriptors: the spare one takes the next waiting connection, long enough
        to refuse it with the reason. False when none was waiting or there is no spare."""
        return self._spare is not None and self._spare.refuse_one(
            listener, lambda sock: self._refuse(sock, _NO_DESCRIPTORS)
        )

    def _refuse(self, sock: socket.socket, message: str = "") -> None:
        """Over max_connections (or out of descriptors): an error frame (if the socket takes it at
        once) and close, no thread. The client reads the reason where it expected hello's reply."""
        self.counters["connections_refused"] += 1
        message = message or (
            f"too many engine connections ({self.max_connections}: daemon.max_sessions + "
            "daemon.max_unattached_connections); try again"
        )
        send_refusal(sock, message)
        self._warn(
            "%s socket: refused a connection: %d connections open; %d refused so far",
            self.name,
            len(self.connections),
            self.counters["connections_refused"],
        )

    def _drop_oldest(self, conn: ThreadConnection) -> None:
        """A new connection found `max_unattached` connections without hello: the oldest of them
        goes (error frame, then close; its thread ends and detaches it as usual)."""
        self.counters["connections_dropped_unattached"] += 1
        conn.send_now(
            P.reply_error(
                0,
                ErrorCode.TOO_LARGE,
                f"closed: {self.max_unattached} newer connections have not sent hello either "
                "(daemon.max_unattached_connections); send hello right after connecting",
            )
        )
        conn.shutdown()
        self._warn(
            "%s socket: closed the oldest of %d connections that have not sent hello "
            "(daemon.max_unattached_connections); %d closed so far",
            self.name,
            self.max_unattached,
            self.counters["connections_dropped_unattached"],
        )

    def _hello_deadline(self, conn: ThreadConnection) -> None:
        """On the loop, `hello_timeout` after accept: close the connection unless it attached."""
        conn.hello_deadline = None
        self._unattached.pop(conn, None)
        if conn.session is not None or conn not in self.connections:
            return
        self.counters["connections_hello_timeout"] += 1
        self._warn(
            "%s socket: closed a connection that sent no hello within %.1fs (daemon.hello_timeout); "
            "%d so far",
            self.name,
            self.hello_timeout,
            self.counters["connections_hello_timeout"],
        )
        conn.shutdown()  # its thread reads EOF, ends, and detaches it like any other

    def _warn(self, msg: str, *args: Any) -> None:
        now = self.loop.time()
        if now - self._warned_at >= WARN_SECONDS:
            self._warned_at = now
            log.warning(msg, *args)

    def _pause_accept(self, error: OSError) -> None:
        log.warning("%s socket: accept failed (%s); accepting again in 1s", self.name, error)
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self.loop.call_later(1.0, self._resume_accept)

    def _resume_accept(self) -> None:
        if self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def _ended(self, conn: ThreadConnection) -> None:
        """From a connection's thread, as it ends: detach on the loop, after its last request."""
        self.submit(lambda: self._detach(conn))

    def _detach(self, conn: ThreadConnection) -> None:
        self.connections.discard(conn)
        self._unattached.pop(conn, None)
        if conn.hello_deadline is not None:
            conn.hello_deadline.cancel()
            conn.hello_deadline = None
        if self.on_close is not None:
            try:
                self.on_close(conn)
            except Exception:  # never let cleanup of one client break the loop
                log.exception("cleanup after a %s client failed", self.name)

    async def stop(self) -> None:
        """Stop accepting, end every connection (their sessions detach), remove the socket file."""
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        conns = list(self.connections)
        for conn in conns:
            conn.shutdown()
        deadline = self.loop.time() + STOP_SECONDS
        while any(c.thread.is_alive() for c in conns) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)  # meanwhile the loop runs their last requests and detaches
        if self._wake_fd >= 0:  # else start() failed before it had any work to run
            self._run_work()
        stuck = sum(c.thread.is_alive() for c in conns)
        if stuck:  # daemon threads: they cannot keep the process alive
            log.warning("%d %s connection threads did not end within %.0fs", stuck, self.name, STOP_SECONDS)
        elif self._wake_fd >= 0:
            self.loop.remove_reader(self._wake_fd)
            os.close(self._wake_fd)
            self._wake_fd = -1
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
