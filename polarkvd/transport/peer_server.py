"""The peer data path's server: one thread per connection (bounded by `max_connections`), the
handshake, requests dispatched to named handlers, replies sent with their payloads gathered and
checksummed (transport/__init__.py says why plain TCP). Handlers may block (on the arena, on disk):
send and recv release the GIL, so several connections use both cores."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import field
from typing import Any

from polarkvd.errors import ErrorCode, PolarKVError
from polarkvd.transport.peer_wire import (
    HS_AUTH_FAILED,
    HS_BAD_VERSION,
    HS_CLIENT,
    HS_MAGIC,
    HS_MODE_MISMATCH,
    HS_OK,
    HS_RESULT,
    HS_SERVER,
    KIND_REPLY,
    KIND_REQUEST,
    LINGER_SECONDS,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOADS,
    MODE_BUSY,
    MODE_INSECURE,
    MODE_KEYED,
    MODE_NAMES,
    PREFIX,
    SCRATCH,
    TRAILER,
    VERSION,
    BadMessage,
    Closed,
    Deadline,
    arm,
    byte_view,
    check_key,
    discard,
    handshake_proof,
    pack_header,
    read_message,
    recv_exact,
    recv_payload,
    send_all,
    send_message,
    tune_socket,
)

log = logging.getLogger("polarkvd.transport")


# --------------------------------------------------------------------------------- server side


@dataclasses.dataclass
class Reply:
    """What a handler returns. `payloads` are sent zero-copy after the header, in order."""

    header: dict[str, Any]  # msgpack-able; {"error": code, "message": ...} is an error reply
    payloads: list[Any] = field(default_factory=list)  # bytes / memoryview / contiguous arrays
    # Called exactly once after the payloads left or the send failed (the daemon unpins pages here).
    on_sent: Callable[[], None] | None = None
    # xxh3_64 of each payload when the caller already has them (e.g. stored with the page); the server
    # then trusts them instead of hashing the buffers again. A None entry is hashed here and written
    # back into the list, so `on_sent` can keep it for the next time.
    sums: list[int | None] | None = None


def _error_reply(code: str, message: str) -> Reply:
    return Reply({"error": code, "message": message})


class PayloadReader:
    """The request's payloads, read by the handler in order, straight into its own memory."""

    def __init__(self, conn: _ServerConn, sizes: list[int]) -> None:
        self.sizes = sizes
        self._conn = conn
        self._next = 0
        self.last_sum: int | None = None  # xxh3_64 of the payload `recv_into` last verified

    @property
    def pending(self) -> int:
        """Payloads not yet consumed."""
        return len(self.sizes) - self._next

    def _take(self) -> int:
        if self._next >= len(self.sizes):
            raise IndexError("no payload left in this request")
        self._next += 1
        return self._next - 1

    def recv_into(self, view: memoryview) -> bool:
        """Receive the next payload into `view` (its length must equal the payload's size). True when its
        checksum verified; False when the bytes are corrupt (the connection stays in sync)."""
        dst = byte_view(view, writable=True)
        i = self._next
        if i < len(self.sizes) and len(dst) != self.sizes[i]:
            raise ValueError(f"payload {i} is {self.sizes[i]} bytes, view is {len(dst)}")
        self._take()
        self.last_sum = self._conn.recv_payload(dst)
        if self.last_sum is None:
            self._conn.server._count("checksum_failures")
            return False
        return True

    def skip(self) -> None:
        """Discard the next payload."""
        self._conn.discard(self.sizes[self._take()])

    def _skip_rest(self) -> None:
        while self.pending:
            self.skip()


Handler = Callable[[dict[str, Any], PayloadReader], Reply]

_STATS = (
    "connections", "auth_failures", "bad_requests", "requests", "bytes_in", "bytes_out",
    "checksum_failures", "refused", "handler_errors",
)  # fmt: skip


class _ServerConn:
    """One accepted connection, served by its own thread."""

    def __init__(self, server: PeerServer, sock: socket.socket, peer: str) -> None:
        self.server, self.sock, self.peer = server, sock, peer
        self._scratch: memoryview | None = None
        self._trailer = memoryview(bytearray(TRAILER.size))
        self.deadline = Deadline(None)
        self.broken = False  # a payload read failed: the stream is out of sync whatever the handler does
        self.linger = False  # closing after an error reply to a bad request

    def recv_payload(self, dst: memoryview) -> int | None:
        try:
            ok = recv_payload(self.sock, dst, self._trailer, self.deadline)
        except BaseException:
            self.broken = True
            raise
        self.server._count("bytes_in", len(dst))
        return ok

    def discard(self, n: int) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH))
        try:
            discard(self.sock, n + TRAILER.size, self._scratch, self.deadline)
        except BaseException:
            self.broken = True
            raise
        self.server._count("bytes_in", n)

    # ------------------------------------------------------------------------------------------

    def serve(self) -> None:
        srv = self.server
        try:
            self.sock.settimeout(None)  # blocking; `arm` bounds each syscall
            tune_socket(self.sock)
            if not self._handshake():
                return
            while not srv._closing.is_set():
                if not self._one_request():
                    return
        except (OSError, Closed) as e:
            if not srv._closing.is_set():
                log.debug("peer connection %s ended: %s", self.peer, e)
        except Exception:  # a bug: log it, lose this connection, keep the server
            log.exception("peer connection %s: unexpected error", self.peer)
        finally:
            srv._forget(self)
            if self.linger and not srv._closing.is_set():
                self._lingering_close()
            try:
                self.sock.close()
            except OSError:
                pass

    def _lingering_close(self) -> None:
        """After an error reply to a bad request: stop sending, read and drop what the peer still sends
        for a moment. Closing with unread input makes the kernel send a reset, and a reset can destroy
        the error reply before the peer reads it."""
        deadline = Deadline(LINGER_SECONDS)
        try:
            self.sock.shutdown(socket.SHUT_WR)
            scratch = memoryview(bytearray(SCRATCH))
            for _ in range(16):
                arm(self.sock, deadline.left())
                if not self.sock.recv_into(scratch):
                    return
        except OSError:
            pass

    def _handshake(self) -> bool:
        srv = self.server
        deadline = Deadline(srv.handshake_timeout)
        mode = MODE_KEYED if srv.key is not None else MODE_INSECURE
        ns = os.urandom(32)
        try:
            send_all(self.sock, [memoryview(HS_SERVER.pack(HS_MAGIC, VERSION, mode, 0, ns))], deadline)
            hello = recv_exact(self.sock, HS_CLIENT.size, deadline)
        except (OSError, Closed) as e:
            srv._count("bad_requests")
            log.info("peer %s: no handshake (%s)", self.peer, e)
            return False
        magic, version, cmode, _, nc, proof = HS_CLIENT.unpack(hello)
        status, why = HS_OK, ""
        if magic != HS_MAGIC:
            srv._count("bad_requests")
            log.warning("peer %s: not a polarkv peer (bad handshake magic); closed", self.peer)
            return False
        if version != VERSION:
            status, why = HS_BAD_VERSION, f"version {version}, this daemon speaks {VERSION}"
        elif cmode != mode:
            status, why = (
                HS_MODE_MISMATCH,
                f"peer is {MODE_NAMES.get(cmode, cmode)}, this daemon {MODE_NAMES[mode]}",
            )
        elif srv.key is not None and not hmac.compare_digest(proof, handshake_proof(srv.key, b"c", ns, nc)):
            status, why = HS_AUTH_FAILED, "wrong key"
        sproof = (
            handshake_proof(srv.key, b"s", nc, ns) if srv.key is not None and status == HS_OK else bytes(32)
        )
        if status != HS_OK:  # counted before the peer hears the verdict, so it can rely on the count
            srv._count("bad_requests" if status == HS_BAD_VERSION else "auth_failures")
            log.warning("peer %s refused at handshake: %s", self.peer, why)
        verdict = memoryview(HS_RESULT.pack(HS_MAGIC, VERSION, status, 0, sproof))
        try:
            send_all(self.sock, [verdict], deadline)
        except OSError:
            return False
        return status == HS_OK

    def _one_request(self) -> bool:
        """Serve one request; False when the connection must close."""
        srv = self.server
        # An idle pooled connection waits for its next request as long as the peer keeps it open
        # (`idle_timeout`); once a request starts, the whole of it must arrive within `io_timeout`.
        first = bytearray(PREFIX.size)
        arm(self.sock, srv.idle_timeout)
        try:
            got = self.sock.recv_into(first)
        except BlockingIOError:
            return False
        if not got:
            return False
        self.deadline = Deadline(srv.io_timeout)
        try:
            header, sizes = read_message(
                self.sock, KIND_REQUEST, srv.max_header_bytes, srv.max_payloads, srv.max_payload_bytes,
                self.deadline, bytes(first[:got]),
            )  # fmt: skip
        except BadMessage as e:
            srv._count("bad_requests")
            log.warning("peer %s: bad request, closing: %s", self.peer, e)
            self.linger = self._send_reply(_error_reply(e.code.value, str(e)), self.deadline)
            return False
        op, args = header.get("op"), header.get("args", {})
        reader = PayloadReader(self, sizes)
        srv._count("requests")
        handler = srv.handlers.get(op) if isinstance(op, str) else None
        if not isinstance(args, dict):
            reply = _error_reply(ErrorCode.BAD_REQUEST.value, "args must be a map")
        elif handler is None:
            reply = _error_reply(
                ErrorCode.UNKNOWN_OP.value, f"unknown op {op!r}; known: {sorted(srv.handlers)}"
            )
        else:
            try:
                reply = handler(args, reader)
                if not isinstance(reply, Reply):
                    raise TypeError(f"handler for {op!r} returned {type(reply).__name__}, not Reply")
            except PolarKVError as e:
                reply = _error_reply(e.code.value, str(e))
            except (OSError, Closed):
                raise  # the connection broke under the handler's recv_into: nothing to answer
            except Exception as e:
                srv._count("handler_errors")
                log.exception("peer op %s from %s failed", op, self.peer)
                reply = _error_reply(ErrorCode.INTERNAL.value, f"{type(e).__name__}: {e}")
        try:
            # Unconsumed request payloads go before the reply, so the stream stays framed and a
            # client still sending a large request never deadlocks against our reply.
            if not self.broken:
                reader._skip_rest()
        except BaseException:
            _call_on_sent(reply)
            raise
        if self.broken:  # the handler swallowed a broken read: nothing can be answered in sync
            _call_on_sent(reply)
            return False
        return self._send_reply(reply, self.deadline)

    def _send_reply(self, reply: Reply, deadline: Deadline) -> bool:
        srv = self.server
        try:
            try:
                views = [byte_view(p) for p in reply.payloads]
                sums = reply.sums
                if sums is not None and (
                    len(sums) != len(views)
                    or not all(c is None or (type(c) is int and 0 <= c < 1 << 64) for c in sums)
                ):
                    raise ValueError(
                        f"Reply.sums must be one xxh3_64 int (or None) per payload ({len(views)})"
                    )
                head = pack_header(KIND_REPLY, {"reply": reply.header, "sizes": [len(v) for v in views]})
            except Exception as e:
                srv._count("handler_errors")
                log.exception("peer reply to %s cannot be sent", self.peer)
                views, sums = [], None
                head = pack_header(
                    KIND_REPLY, {"reply": {"error": ErrorCode.INTERNAL.value, "message": f"bad reply: {e}"}}
                )
            send_message(self.sock, head, views, sums, deadline)
            srv._count("bytes_out", sum(len(v) for v in views))
            return True
        except (OSError, Closed) as e:
            log.info("peer %s: reply not sent: %s", self.peer, e)
            return False
        finally:
            _call_on_sent(reply)


def _call_on_sent(reply: Reply) -> None:
    cb, reply.on_sent = reply.on_sent, None  # exactly once, even if called from two paths
    if cb is not None:
        try:
            cb()
        except Exception:
            log.exception("on_sent callback failed")


class PeerServer:
    """Serves named ops to peers: a thread accepts, a thread per connection runs handlers.

    `handlers[op](args, reader)` gets the request's args map and a `PayloadReader` over its payloads and
    returns a `Reply`. Raising `PolarKVError` answers {"error": code, "message"}; any other exception
    answers "internal" (logged); an unknown op answers "unknown_op". Malformed frames get an error reply
    and the connection is closed; no input closes anything but its own connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        key: bytes | None,
        handlers: dict[str, Handler],
        max_connections: int = 64,
        io_timeout: float = 30.0,
        max_header_bytes: int = 1 << 20,
        handshake_timeout: float = 5.0,
        idle_timeout: float | None = None,
        max_payloads: int = MAX_PAYLOADS,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        self.host, self.port = host, port
        self.key = check_key(key)
        self.handlers = dict(handlers)
        self.max_connections = max_connections
        self.io_timeout = io_timeout
        self.max_header_bytes = max_header_bytes
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_payloads = max_payloads
        self.max_payload_bytes = max_payload_bytes
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)
        self._lock = threading.Lock()
        self._conns: dict[_ServerConn, threading.Thread] = {}
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._bound: tuple[str, int] | None = None

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def start(self) -> None:
        """Bind and listen (port 0 = an ephemeral port), then accept in a thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        ls = socket.create_server((self.host, self.port), family=family, backlog=128)
        self._listener = ls
        self._bound = ls.getsockname()[:2]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="polarkv-peer-accept", daemon=True
        )
        self._accept_thread.start()

    @property
    def address(self) -> str:
        """`tcp://HOST:PORT` actually bound."""
        if self._bound is None:
            raise RuntimeError("PeerServer.start() first")
        host, port = self._bound
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: do not spin
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    conn = _ServerConn(self, sock, f"{peer[0]}:{peer[1]}")
                    t = threading.Thread(target=conn.serve, name=f"polarkv-peer-{peer[1]}", daemon=True)
                    self._conns[conn] = t
                    self.stats["connections"] += 1
                else:
                    self.stats["refused"] += 1
            if full:
                log.warning("peer %s refused: %d connections already", peer, self.max_connections)
                try:  # 40 bytes always fit the new socket's buffer: this cannot block the accept loop
                    sock.setblocking(False)
                    sock.send(HS_SERVER.pack(HS_MAGIC, VERSION, MODE_BUSY, 0, bytes(32)))
                except OSError:
                    pass
                sock.close()
            else:
                t.start()

    def _forget(self, conn: _ServerConn) -> None:
        with self._lock:
            self._conns.pop(conn, None)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join the threads (bounded: a handler stuck in its
        own code is left behind as a daemon thread)."""
        self._closing.set()
        if self._listener is not None:
            for fn in (lambda s: s.shutdown(socket.SHUT_RDWR), lambda s: s.close()):
                try:
                    fn(self._listener)
                except OSError:
                    pass
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for _, t in conns:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> PeerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
