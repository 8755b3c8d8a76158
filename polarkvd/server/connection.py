"""One request/reply socket server: framing, validation, dispatch, error replies.

Owns the rules of DESIGN.md §10 for every local socket: a malformed frame, a wrong version, an unknown
op or a handler's error becomes an error reply to that client; nothing a client sends can stop the
daemon or touch another client's connection. The op handlers themselves live in engine.py and
control.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from polarkvd.errors import ErrorCode, PolarKVError, ProtocolError
from polarkvd.server import protocol as P

log = logging.getLogger(__name__)

Handler = Callable[["Connection", dict[str, Any]], "dict[str, Any] | Awaitable[dict[str, Any]]"]


def only_args(args: dict[str, Any], *allowed: str) -> None:
    """Unknown arguments are an error, not silently ignored: the client is speaking another dialect."""
    for name in args:
        if name not in allowed:
            extra = sorted(str(a) for a in args if a not in allowed)
            raise ProtocolError(f"unknown arguments {extra}; expected {list(allowed)}")


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


class Connection(asyncio.Protocol):
    def __init__(self, server: RequestServer) -> None:
        self.server = server
        self.reader = P.FrameReader(server.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.session: Any = None  # set by the engine API's hello
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()

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
            self._handle(payload)

    def _send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _handle(self, payload: bytes) -> None:
        try:
            msg = P.unpack(payload)
        except Exception:
            self._send(P.reply_error(0, ErrorCode.BAD_REQUEST, "malformed frame: not a msgpack message"))
            return
        if not (
            isinstance(msg, list)
            and len(msg) == 4
            and isinstance(msg[1], int)
            and not isinstance(msg[1], bool)
        ):
            self._send(
                P.reply_error(0, ErrorCode.BAD_REQUEST, "a request is [version, request_id, op, {args}]")
            )
            return
        version, rid, op, args = msg
        # `type() is int` first: an unhashable version (a list, a map) must not raise out of here, and
        # True or 1.0 are not version 1.
        if type(version) is not int or version not in P.SUPPORTED_VERSIONS:
            self._send(
                P.reply_error(
                    rid,
                    ErrorCode.BAD_VERSION,
                    f"protocol version {version!r} is not supported; this daemon speaks {sorted(P.SUPPORTED_VERSIONS)}",
                )
            )
            return
        handler = self.server.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self._send(
                P.reply_error(
                    rid,
                    ErrorCode.UNKNOWN_OP,
                    f"unknown op {op!r} on the {self.server.name} socket; known: {', '.join(sorted(self.server.handlers))}",
                )
            )
            return
        if not isinstance(args, dict):
            self._send(P.reply_error(rid, ErrorCode.BAD_REQUEST, "request args must be a map"))
            return
        try:
            result = handler(self, args)
        except Exception as e:
            self._send(self._error_reply(rid, op, e))
            return
        if type(result) is not dict and inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(rid, op, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._send(P.reply_ok(rid, result))

    async def _finish(self, rid: int, op: str, pending: Awaitable[dict[str, Any]]) -> None:
        try:
            result = await pending
        except Exception as e:
            self._send(self._error_reply(rid, op, e))
            return
        self._send(P.reply_ok(rid, result))

    def _error_reply(self, rid: int, op: str, e: Exception) -> bytes:
        if isinstance(e, PolarKVError):
            return P.reply_error(rid, e.code, str(e))
        if isinstance(e, (TypeError, ValueError, KeyError)):
            return P.reply_error(rid, ErrorCode.BAD_REQUEST, f"bad arguments for {op}: {e}")
        log.exception("internal error in %s %s", self.server.name, op)
        return P.reply_error(rid, ErrorCode.INTERNAL, f"internal error in {op}: {e!r}")


class RequestServer:
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
        self._server: asyncio.AbstractServer | None = None
        self.path: Path | None = None

    async def start(self, path: Path, mode: int) -> None:
        claim_socket_path(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Connection(self), str(path))
        os.chmod(path, mode)
        self.path = path

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            self._server = None
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
