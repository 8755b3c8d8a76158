"""A request/reply connection to a daemon's Unix socket: framed requests (`frames.py`), replies in
order, bounded by the kernel's socket timeouts. The client library's transport (`polarkvd/client.py`)
for the engine and control sockets alike.

What it owns: connecting (waiting for room in a full listen backlog), one call at a time, reading a
reply of any length, turning a broken or silent connection into `DaemonUnavailable` and an error
reply into the error it names. Nothing of sessions, pages or the arena.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
from pathlib import Path
from typing import Any

from polarkvd.errors import DaemonUnavailable, PolarKVError, ProtocolError, error_for_code
from polarkvd.wire import frames as P


def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO. 0 means wait forever, so a positive timeout
    below a microsecond becomes one microsecond."""
    sec, usec = int(seconds), int((seconds % 1) * 1e6)
    if seconds > 0 and not (sec or usec):
        usec = 1
    return struct.pack("ll", sec, usec)


def connect_unix(sock: socket.socket, path: str, timeout: float | None) -> None:
    """Connect a blocking Unix socket, waiting up to `timeout` for room in a full listen backlog.

    Linux waits in connect() for room, bounded by SO_SNDTIMEO (set by the caller), then fails with
    EAGAIN; a kernel that does not wait fails with EAGAIN at once. Either way EAGAIN is retried with
    a short backoff until the deadline: a connect burst (many engines starting together) queues
    instead of failing. Any other error (no daemon there: ECONNREFUSED, ENOENT) fails at once.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)


def _frame(msg: Any) -> list[Any]:
    """A decoded reply as a list (its shape is checked by the caller); anything else is no reply."""
    return msg if isinstance(msg, list) else []


class Channel:
    """One connection: framed request, framed reply, in order."""

    def __init__(self, path: str | Path, timeout: float | None) -> None:
        self.path = str(path)
        self._ids = itertools.count(1)
        self.timeout = timeout
        # The socket blocks, bounded by the kernel (SO_RCVTIMEO/SO_SNDTIMEO): Python's own timeouts
        # poll() before every send and recv, measured +3-4 us on each round trip; and they make
        # connect() non-blocking, which on a Unix socket whose listen backlog is full fails at once
        # (EAGAIN) instead of waiting for the daemon to accept.
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if timeout is not None:
            tv = timeval(timeout)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        try:
            connect_unix(self._sock, self.path, timeout)
        except OSError as e:
            self._sock.close()
            raise DaemonUnavailable(
                f"cannot reach polarkvd at {self.path}: {e.strerror or e} (is `polarkvd serve` running?)"
            ) from None
        self._buf = bytearray(1 << 16)

    def call(self, op: str, args: dict[str, Any], patience: float | None = None) -> dict[str, Any]:
        """`patience`: seconds this call may wait for its reply instead of `timeout`, if longer
        (None: as `timeout`); the first `timeout` seconds cost nothing extra."""
        rid = next(self._ids)
        try:
            self._sock.sendall(P.request(rid, op, args))
            reply = self._read_reply(patience)
        except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
            self.close()
            waited = self.timeout if patience is None or self.timeout is None else max(self.timeout, patience)
            raise DaemonUnavailable(f"polarkvd at {self.path} did not answer {op} within {waited}s") from None
        except (OSError, EOFError) as e:
            refused = self._parting_error()
            self.close()
            if refused is not None:
                raise refused from None
            raise DaemonUnavailable(f"connection to polarkvd at {self.path} broke during {op}: {e}") from None
        if len(reply) != 4 or not isinstance(reply[3], dict):  # not a reply frame: not a daemon
            self.close()
            raise ProtocolError(f"{self.path} answered {op} with something that is not a polarkvd reply")
        body: dict[str, Any] = reply[3]
        if reply[2] == P.OK:
            return body
        raise error_for_code(str(body.get("code", "")), str(body.get("message", "")))

    def _parting_error(self) -> PolarKVError | None:
        """The error frame a daemon sent before closing the connection (it refused it: too many
        connections that have not sent hello), when the request could not even be sent."""
        data = b""
        try:
            while len(data) < 1 << 16:
                got = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
                if not got:
                    break
                data += got
        except OSError:
            pass
        if len(data) < 4 or len(data) < 4 + P.LENGTH.unpack_from(data)[0]:
            return None
        try:
            msg = P.unpack(data[4 : 4 + P.LENGTH.unpack_from(data)[0]])
        except Exception:  # noqa: BLE001 - not a frame: the plain "broke" error says enough
            return None
        if isinstance(msg, list) and len(msg) == 4 and msg[2] == P.ERROR and isinstance(msg[3], dict):
            return error_for_code(str(msg[3].get("code", "")), str(msg[3].get("message", "")))
        return None

    def send_raw(self, data: bytes) -> list[Any]:
        """Testing aid: send arbitrary bytes, read one reply frame."""
        self._sock.sendall(data)
        return self._read_reply()

    def _read_reply(self, patience: float | None = None) -> list[Any]:
        # One recv usually holds the whole reply; read the rest only when it does not.
        buf = self._buf
        try:
            got = self._sock.recv_into(buf)
        except BlockingIOError:
            if self.timeout is None or patience is None or patience <= self.timeout:
                raise
            got = self._recv_longer(buf, patience - self.timeout)
        while got < 4:
            got += self._recv_some(memoryview(buf)[got:])
        (n,) = P.LENGTH.unpack_from(buf)
        if n + 4 <= len(buf):
            while got < n + 4:
                got += self._recv_some(memoryview(buf)[got : n + 4])
            return _frame(P.unpack(memoryview(buf)[4 : n + 4]))
        body = bytearray(n)
        body[: got - 4] = memoryview(buf)[4:got]
        view = memoryview(body)[got - 4 :]
        while len(view):
            view = view[self._recv_some(view) :]
        return _frame(P.unpack(body))

    def _recv_longer(self, buf: bytearray, seconds: float) -> int:
        """The first recv of a reply allowed to take longer than `timeout` (a write-through commit):
        `seconds` more, then the normal timeout again. Only slow replies pay for the setsockopts."""
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
        try:
            return self._sock.recv_into(buf)
        finally:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self.timeout or 0.0))

    def _recv_some(self, view: memoryview) -> int:
        got = self._sock.recv_into(view)
        if not got:
            raise EOFError("the daemon closed the connection")
        return got

    def close(self) -> None:
        self._sock.close()
