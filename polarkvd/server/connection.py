"""One request/reply socket server: framing, validation, dispatch, error replies.

Owns the reliability rules of docs/ARCHITECTURE.md for every local socket: a malformed frame, a wrong version, an unknown
op or a handler's error becomes an error reply to that client; nothing a client sends can stop the
daemon or touch another client's connection. The op handlers themselves live in engine.py and
control.py.

`parse_request` and `answer` are those rules, shared by both kinds of server: `RequestServer` here
(asyncio protocol, everything on the event loop: the control socket) and
`engine_thread.EngineThreadServer` (a thread per connection: the engine socket). `answer` runs on the
event loop only.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from polarkvd.errors import ErrorCode, PolarKVError, ProtocolError
from polarkvd.wire import frames as P

log = logging.getLogger(__name__)

Handler = Callable[["Connection", dict[str, Any]], "dict[str, Any] | Awaitable[dict[str, Any]]"]


def only_args(args: dict[str, Any], *allowed: str) -> None:
    """Unknown arguments are an error, not silently ignored: the client is speaking another dialect."""
    for name in args:
        if name not in allowed:
            extra = sorted(f"{a!s:.40}" for a in args if a not in allowed)  # client text: clipped
            more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
            raise ProtocolError(f"unknown arguments {extra[:8]}{more}; expected {list(allowed)}")


def arg_bool(args: dict[str, Any], name: str, default: bool = False) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false")
    return value


def arg_int(args: dict[str, Any], name: str) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer")
    return value


class Request(NamedTuple):
    rid: int
    op: str
    handler: Handler
    args: dict[str, Any]


def parse_request(payload: bytes, name: str, handlers: dict[str, Any]) -> Request | bytes:
    """A frame's payload -> the request to run, or the error reply to send instead. Any thread."""
    try:
        msg = P.unpack(payload)
    except Exception:
        return P.reply_error(0, ErrorCode.BAD_REQUEST, "malformed frame: not a msgpack message")
    if not (
        isinstance(msg, list) and len(msg) == 4 and isinstance(msg[1], int) and not isinstance(msg[1], bool)
    ):
        return P.reply_error(0, ErrorCode.BAD_REQUEST, "a request is [version, request_id, op, {args}]")
    version, rid, op, args = msg
    # `type() is int` first: an unhashable version (a list, a map) must not raise out of here, and
    # True or 1.0 are not version 1.
    if type(version) is not int or version not in P.SUPPORTED_VERSIONS:
        return P.reply_error(
            rid,
            ErrorCode.BAD_VERSION,
            f"protocol version {version!r:.40} is not supported; this daemon speaks {sorted(P.SUPPORTED_VERSIONS)}",
        )
    handler = handlers.get(op) if isinstance(op, str) else None
    if handler is None:
        return P.reply_error(
            rid,
            ErrorCode.UNKNOWN_OP,
            f"unknown op {op!r:.80} on the {name} socket; known: {', '.join(sorted(handlers))}",
        )
    if not isinstance(args, dict):
        return P.reply_error(rid, ErrorCode.BAD_REQUEST, "request args must be a map")
    return Request(rid, op, handler, args)


def error_reply(name: str, rid: int, op: str, e: Exception) -> bytes:
    """The reply to a handler that raised: its code for our errors, bad_request for bad arguments,
    internal (logged with its traceback) for anything else. Any thread."""
    if isinstance(e, PolarKVError):
        return P.reply_error(rid, e.code, str(e))
    if isinstance(e, (TypeError, ValueError, KeyError)):
        return P.reply_error(rid, ErrorCode.BAD_REQUEST, f"bad arguments for {op}: {e}")
    log.exception("internal error in %s %s", name, op)
    return P.reply_error(rid, ErrorCode.INTERNAL, f"internal error in {op}: {e!r}")


def answer(conn: Any, req: Request, reply: Callable[[bytes], None]) -> None:
    """Run `req`'s handler for `conn`; `reply` gets the reply frame, at once or when an async handler
    finishes. Event loop only. `conn` has `server.name`, `session`, `closed` and `tasks` (a set that
    holds the async handlers still running)."""
    rid, op, handler, args = req
    try:
        result = handler(conn, args)
    except Exception as e:
        reply(error_reply(conn.server.name, rid, op, e))
        return
    if type(result) is not dict and inspect.isawaitable(result):
        task = asyncio.ensure_future(_finish(conn.server.name, req, result, reply))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)
    else:
        reply(P.reply_ok(rid, result))


async def _finish(
    name: str, req: Request, pending: Awaitable[dict[str, Any]], reply: Callable[[bytes], None]
) -> None:
    try:
        result = await pending
    except Exception as e:
        reply(error_reply(name, req.rid, req.op, e))
        return
    reply(P.reply_ok(req.rid, result))


class Connection(asyncio.Protocol):
    def __init__(self, server: RequestServer) -> None:
        self.server = server
        self.reader = P.FrameReader(server.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.session: Any = None  # set by the engine API's hello
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.server.on_close is not None:
            try:
                self.server.on_close(self)
            except Exception:  # never let cleanup of one client break the loop
                log.exception("cleanup after a %s client failed", self.server.name)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except P.FrameTooLarge as e:
            self._send(P.reply_error(0, e.code, str(e)))
            if self.transport is not None:
                self.transport.close()  # the stream cannot be resynchronised after a bogus length
            return
        for payload in frames:
            req = parse_request(payload, self.server.name, self.server.handlers)
            if type(req) is bytes:
                self._send(req)
            else:
                answer(self, req, self._send)  # type: ignore[arg-type]

    def _send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    # A client that sends requests and never reads the replies: stop reading its requests while
    # its replies fill the transport's buffer, or they would grow the daemon's memory without end.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


#: Pending connections a listening socket keeps (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class SpareDescriptor:
    """A descriptor held for the moment the daemon runs out of them: freed to accept a waiting
    connection just long enough to tell it why it is refused (else the client waits in vain, or
    sees its connection reset, and never learns the reason)."""

    def __init__(self) -> None:
        self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def refuse_one(self, listener: socket.socket, refuse: Callable[[socket.socket], None]) -> bool:
        """After accept() failed with EMFILE/ENFILE: accept one connection on the spare descriptor
        and `refuse` it (which closes it). False when none was waiting (then `ready` says whether
        to wait for the next one as usual, or to pause accepting: no spare)."""
        if self.fd < 0:
            return False
        os.close(self.fd)
        self.fd = -1
        try:
            sock, _ = listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            refuse(sock)
        try:
            self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # taken meanwhile by another thread: accepting pauses, and tries again
            return False
        return sock is not None

    @property
    def ready(self) -> bool:
        return self.fd >= 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def send_refusal(sock: socket.socket, message: str) -> None:
    """An error frame where the client expects its first reply (if the socket takes it at once),
    then close."""
    try:
        sock.send(P.reply_error(0, ErrorCode.TOO_LARGE, message), socket.MSG_DONTWAIT)
    except OSError:
        pass  # the client is gone already, or not reading: it sees the connection close
    sock.close()


#: What a control client is told when the daemon has no descriptor for its connection.
CONTROL_NO_DESCRIPTORS = (
    "the daemon is out of file descriptors (its RLIMIT_NOFILE: LimitNOFILE= in its systemd unit); "
    "it serves the engines attached, control connections are refused: try again later"
)


class RequestServer:
    """An asyncio server of request/reply connections on a Unix socket (the control socket). It
    accepts itself, not through `loop.create_unix_server`, so that a daemon out of descriptors
    refuses a client with the reason instead of leaving it waiting or reset."""

    def __init__(
        self,
        name: str,
        handlers: dict[str, Handler],
        *,
        max_frame_bytes: int = P.MAX_FRAME,
        on_close: Callable[[Connection], None] | None = None,
    ) -> None:
        self.name = name
        self.handlers = handlers
        self.max_frame_bytes = max_frame_bytes
        self.on_close = on_close
        self.connections: set[Connection] = set()
        self._listener: socket.socket | None = None
        self._spare: SpareDescriptor | None = None
        self._starting: set[asyncio.Task[Any]] = set()
        self.refused = 0  # connections refused for want of a descriptor
        self.path: Path | None = None

    async def start(self, path: Path, mode: int) -> None:
        claim_socket_path(path)
        self._loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, mode)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
            self._spare = SpareDescriptor()
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.path = path
        self._loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        listener, spare = self._listener, self._spare
        for _ in range(16):  # a burst of connects must not hold the loop for long
            if listener is None or spare is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_DESCRIPTORS and spare.refuse_one(listener, self._refuse):
                    continue
                if e.errno in OUT_OF_DESCRIPTORS and spare.ready:
                    return  # none waiting (accept fails first for want of a descriptor)
                self._pause_accept(e)
                return
            task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: Connection(self), sock))
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s socket: a connection could not start: %s", self.name, task.exception())

    def _refuse(self, sock: socket.socket) -> None:
        self.refused += 1
        send_refusal(sock, CONTROL_NO_DESCRIPTORS)
        log.warning(
            "%s socket: refused a connection: out of file descriptors; %d refused so far",
            self.name, self.refused,
        )  # fmt: skip

    def _pause_accept(self, error: OSError) -> None:
        log.warning("%s socket: accept failed (%s); accepting again in 1s", self.name, error)
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._loop.call_later(1.0, self._resume_accept)

    def _resume_accept(self) -> None:
        if self._listener is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    async def stop(self) -> None:
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            for task in list(self._starting):
                task.cancel()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await asyncio.sleep(0)  # the transports' connection_lost callbacks run
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def socket_is_live(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def claim_socket_path(path: Path) -> None:
    """Make `path` free for binding: refuse if a live daemon answers there, remove a stale socket."""
    if path.exists() or path.is_symlink():
        if socket_is_live(path):
            raise PolarKVError(
                f"another polarkvd is already serving on {path}; stop it or configure another socket path"
            )
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
