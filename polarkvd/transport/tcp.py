"""The peer data path: KV pages (1-6 MB byte blobs) between daemons over plain TCP sockets.

Owns the wire format between daemons (docs/PROTOCOL.md, "Peer data protocol"), the authenticated
handshake, connection pooling and the per-payload checksums. It moves opaque bytes for named ops; it
must not know what a page, a tier or a key is, and never allocates a page: the caller hands in the
buffers to send and the views to receive into.

Why not ZeroMQ here (the design says "TCP over ZeroMQ"): the bar is a remote fetch at >= 0.7-0.8x of
raw TCP on the same link. ZeroMQ copies every received frame into a buffer of its own (and we would
copy it again into the arena), runs its I/O on a background thread that competes for the cores, and
CURVE encrypts every byte. So the data path is plain blocking TCP sockets:
- gather sends: `socket.sendmsg([prefix+header, page, sum, page, sum, ...])`, the page buffers are
  never joined or copied in user space;
- receives go straight into the caller's destination view (`recv_into` loops on memoryview slices),
  no intermediate bytes objects;
- an authenticated handshake on each new connection (BLAKE2b keyed with a key derived from the
  cluster's CURVE secret, both directions, fresh nonces), or an explicit insecure mode on both sides;
- an xxh3_64 checksum trailing every payload, computed by the sender over the buffer it sends (or
  stored with the page: `Reply.sums`) and checked by the receiver over the bytes that landed. A
  corrupt payload is reported per payload; the connection stays framed and usable.
ZeroMQ stays for gossip and control, where messages are small.

What the handshake does not give: the payload bytes are neither encrypted nor MACed after the
handshake (the checksum is not a MAC), so an attacker on the path could read or inject. Cluster
networks that are not trusted need an encrypted link underneath (WireGuard, IPsec).

Threads, not asyncio: a server thread per connection (bounded by `max_connections`) runs handlers
that may block (on the arena, on disk); send and recv release the GIL, so several connections use
both cores. Measured costs and what did not help: docs/BENCHMARKS.md, "bench cluster".
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any

import msgpack
import xxhash

from polarkvd.errors import ErrorCode, PolarKVError, TransportError, error_for_code

log = logging.getLogger("polarkvd.transport")

VERSION = 1

# Handshake records (fixed size, little endian).
HS_MAGIC = b"PKVH"
_HS_SERVER = struct.Struct("<4sBBH32s")  # magic, version, mode, 0, server nonce
_HS_CLIENT = struct.Struct("<4sBBH32s32s")  # magic, version, mode, 0, client nonce, client proof
_HS_RESULT = struct.Struct("<4sBBH32s")  # magic, version, status, 0, server proof
MODE_INSECURE, MODE_KEYED = 0, 1
MODE_BUSY = 0xFF  # in the server's hello: over max_connections, closing; try later
HS_OK, HS_AUTH_FAILED, HS_MODE_MISMATCH, HS_BAD_VERSION = 0, 1, 2, 3
_MODE_NAMES = {MODE_INSECURE: "insecure (no key)", MODE_KEYED: "keyed"}

# Message prefix: magic, version, kind, header length; then the msgpack header, then the payloads.
MSG_MAGIC = b"PK"
_PREFIX = struct.Struct("<2sBBI")
KIND_REQUEST, KIND_REPLY = 1, 2

#: Limits on one message (both directions); the server's are configurable.
MAX_PAYLOADS = 4096
MAX_PAYLOAD_BYTES = 1 << 30
_REPLY_MAX_HEADER_BYTES = 16 << 20

_SOCK_BUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF we ask for; the kernel may give less (rmem_max)
_IOV_MAX = 512  # payload buffers per sendmsg call (Linux allows 1024)
_SCRATCH = 256 << 10  # discard buffer per connection
_LINGER_SECONDS = 0.2  # how long a connection closed for a bad request drains input first
_GATHER_BYTES = 4 << 20  # payload bytes gathered per sendmsg call
_PERSON = b"polarkv-peer-v1"  # BLAKE2b personalization (<= 16 bytes)

_sum = xxhash.xxh3_64_intdigest
_TRAILER = struct.Struct("<Q")  # xxh3_64 of the payload, right after its bytes


def data_key(cluster_secret: bytes) -> bytes:
    """32-byte key for the data-path handshake derived from the cluster's CURVE secret (z85 text
    bytes) with keyed BLAKE2b and a fixed personalization; never the secret itself."""
    if not cluster_secret:
        raise ValueError("data_key: empty cluster secret")
    key = bytes(cluster_secret)
    if len(key) > 64:  # BLAKE2b keys are at most 64 bytes
        key = hashlib.blake2b(key, digest_size=64, person=b"polarkv-dk-long").digest()
    return hashlib.blake2b(
        b"polarkv data path key", digest_size=32, key=key, person=b"polarkv-data-v1"
    ).digest()


def _proof(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hashlib.blake2b(role + first + second, digest_size=32, key=key, person=_PERSON).digest()


def _check_key(key: bytes | None) -> bytes | None:
    if key is None:
        return None
    key = bytes(key)
    if not 16 <= len(key) <= 64:
        raise ValueError(f"data-path key must be 16..64 bytes (use data_key()), got {len(key)}")
    return key


def parse_address(addr: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` (or `HOST:PORT`; IPv6 as `[::1]:PORT`) -> (host, port)."""
    rest = addr[6:] if addr.startswith("tcp://") else addr
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad peer address {addr!r}: expected tcp://HOST:PORT")
    return host.strip("[]"), int(port)


def _tune(sock: socket.socket) -> None:
    """Options for bulk transfers: no Nagle, large buffers (quietly less where the kernel caps them),
    keepalive so a connection to a vanished host does not hold a thread for ever."""
    opts = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for name, val in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), val))
    for level, opt, val in opts:
        try:
            sock.setsockopt(level, opt, val)
        except OSError:
            pass


class _Deadline:
    __slots__ = ("at",)

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left


class _Closed(ConnectionError):
    """The peer closed the connection."""


_TIMEVAL = struct.Struct("@ll")


def _arm(sock: socket.socket, seconds: float | None) -> None:
    """Bound each blocking send/recv in the kernel (SO_RCVTIMEO/SO_SNDTIMEO; None = no bound).

    The sockets stay in blocking mode: Python's own timeouts make every recv a poll() plus a recv(),
    which costs measurable CPU at GB/s. A recv or send that hits the bound fails with EAGAIN, which the
    loops below turn into TimeoutError; the loops also check the call's deadline between syscalls."""
    if seconds is None:
        tv = _TIMEVAL.pack(0, 0)
    else:
        seconds = max(seconds, 0.001)
        tv = _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _recv_into(sock: socket.socket, view: memoryview, deadline: _Deadline) -> None:
    """Fill `view` (a byte view) from the socket, straight into its memory."""
    got, n = 0, len(view)
    _arm(sock, deadline.left())
    while got < n:
        try:
            k = sock.recv_into(view[got:] if got else view)
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        if not k:
            raise _Closed(f"connection closed with {n - got} of {n} bytes outstanding")
        got += k
        if got < n:
            deadline.left()


def _recv_exact(sock: socket.socket, n: int, deadline: _Deadline) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def _discard(sock: socket.socket, n: int, scratch: memoryview, deadline: _Deadline) -> None:
    _arm(sock, deadline.left())
    while n:
        try:
            k = sock.recv_into(scratch, min(n, len(scratch)))
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        if not k:
            raise _Closed(f"connection closed with {n} bytes to discard outstanding")
        n -= k
        if n:
            deadline.left()


def _send_all(sock: socket.socket, bufs: list[memoryview], deadline: _Deadline) -> None:
    """Gather-send byte views with partial-send handling; the buffers are never concatenated."""
    views = [b for b in bufs if len(b)]
    i = 0
    _arm(sock, deadline.left())
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + _IOV_MAX])
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        while sent:
            head = len(views[i])
            if sent >= head:
                sent -= head
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
        if i < len(views):
            deadline.left()


def _byte_view(buf: Any, *, writable: bool = False) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("payload buffers must be C-contiguous")
    if writable and mv.readonly:
        raise ValueError("destination view is read-only")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _pack(kind: int, header: dict[str, Any]) -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return _PREFIX.pack(MSG_MAGIC, VERSION, kind, len(body)) + body


class _BadMessage(Exception):
    """A message that breaks the framing rules; `code` is the error to reply with before closing."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _read_message(
    sock: socket.socket, kind: int, max_header: int, max_payloads: int, max_payload_bytes: int,
    deadline: _Deadline, start: bytes = b"",
) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
    """Read prefix + header (`start`: prefix bytes already read) and validate the framing.
    Returns (header, sizes) with sizes taken out of the header."""
    prefix = bytearray(_PREFIX.size)
    prefix[: len(start)] = start
    _recv_into(sock, memoryview(prefix)[len(start) :], deadline)
    magic, version, got_kind, hlen = _PREFIX.unpack(prefix)
    if magic != MSG_MAGIC:
        raise _BadMessage(ErrorCode.BAD_REQUEST, f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise _BadMessage(ErrorCode.BAD_VERSION, f"protocol version {version}; this side speaks {VERSION}")
    if got_kind != kind:
        raise _BadMessage(ErrorCode.BAD_REQUEST, f"message kind {got_kind}, expected {kind}")
    if hlen > max_header:
        raise _BadMessage(ErrorCode.TOO_LARGE, f"header of {hlen} bytes over the limit of {max_header}")
    raw = _recv_exact(sock, hlen, deadline)
    try:
        header = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise _BadMessage(ErrorCode.BAD_REQUEST, f"undecodable header: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise _BadMessage(ErrorCode.BAD_REQUEST, "header is not a map")
    sizes = header.pop("sizes", [])
    if not isinstance(sizes, list):
        raise _BadMessage(ErrorCode.BAD_REQUEST, "sizes must be a list")
    if len(sizes) > max_payloads:
        raise _BadMessage(ErrorCode.TOO_LARGE, f"{len(sizes)} payloads over the limit of {max_payloads}")
    for s in sizes:
        if type(s) is not int or s < 0:
            raise _BadMessage(ErrorCode.BAD_REQUEST, "sizes must be non-negative integers")
        if s > max_payload_bytes:
            raise _BadMessage(
                ErrorCode.TOO_LARGE, f"payload of {s} bytes over the limit of {max_payload_bytes}"
            )
    return header, sizes


def _send_message(sock: socket.socket, head: bytes, views: list[memoryview], sums: list[int | None] | None,
                  deadline: _Deadline) -> None:  # fmt: skip
    """Header, then each payload followed by its checksum, gathered into few sendmsg calls. Each payload
    is hashed right before it is queued, so its bytes are still in cache when the kernel copies them
    (hashing them all first, or chunk by chunk, measured costlier on a busy host)."""
    pending, queued = [memoryview(head)], 0
    for i, v in enumerate(views):
        c = sums[i] if sums is not None else None
        if c is None:
            c = _sum(v)
            if sums is not None:
                sums[i] = c
        pending += [v, memoryview(_TRAILER.pack(c))]
        queued += len(v)
        if queued >= _GATHER_BYTES or len(pending) >= _IOV_MAX:
            _send_all(sock, pending, deadline)
            pending, queued = [], 0
    if pending:
        _send_all(sock, pending, deadline)


def _recv_payload(
    sock: socket.socket, dst: memoryview, trailer: memoryview, deadline: _Deadline
) -> int | None:
    """Receive one payload straight into `dst`, then its checksum; the checksum when they agree,
    None when they do not."""
    _recv_into(sock, dst, deadline)
    _recv_into(sock, trailer, deadline)
    want = _TRAILER.unpack(trailer)[0]
    return want if _sum(dst) == want else None


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
        dst = _byte_view(view, writable=True)
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
        self._trailer = memoryview(bytearray(_TRAILER.size))
        self.deadline = _Deadline(None)
        self.broken = False  # a payload read failed: the stream is out of sync whatever the handler does
        self.linger = False  # closing after an error reply to a bad request

    def recv_payload(self, dst: memoryview) -> int | None:
        try:
            ok = _recv_payload(self.sock, dst, self._trailer, self.deadline)
        except BaseException:
            self.broken = True
            raise
        self.server._count("bytes_in", len(dst))
        return ok

    def discard(self, n: int) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        try:
            _discard(self.sock, n + _TRAILER.size, self._scratch, self.deadline)
        except BaseException:
            self.broken = True
            raise
        self.server._count("bytes_in", n)

    # ------------------------------------------------------------------------------------------

    def serve(self) -> None:
        srv = self.server
        try:
            self.sock.settimeout(None)  # blocking; `_arm` bounds each syscall
            _tune(self.sock)
            if not self._handshake():
                return
            while not srv._closing.is_set():
                if not self._one_request():
                    return
        except (OSError, _Closed) as e:
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
        deadline = _Deadline(_LINGER_SECONDS)
        try:
            self.sock.shutdown(socket.SHUT_WR)
            scratch = memoryview(bytearray(_SCRATCH))
            for _ in range(16):
                _arm(self.sock, deadline.left())
                if not self.sock.recv_into(scratch):
                    return
        except OSError:
            pass

    def _handshake(self) -> bool:
        srv = self.server
        deadline = _Deadline(srv.handshake_timeout)
        mode = MODE_KEYED if srv.key is not None else MODE_INSECURE
        ns = os.urandom(32)
        try:
            _send_all(self.sock, [memoryview(_HS_SERVER.pack(HS_MAGIC, VERSION, mode, 0, ns))], deadline)
            hello = _recv_exact(self.sock, _HS_CLIENT.size, deadline)
        except (OSError, _Closed) as e:
            srv._count("bad_requests")
            log.info("peer %s: no handshake (%s)", self.peer, e)
            return False
        magic, version, cmode, _, nc, proof = _HS_CLIENT.unpack(hello)
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
                f"peer is {_MODE_NAMES.get(cmode, cmode)}, this daemon {_MODE_NAMES[mode]}",
            )
        elif srv.key is not None and not hmac.compare_digest(proof, _proof(srv.key, b"c", ns, nc)):
            status, why = HS_AUTH_FAILED, "wrong key"
        sproof = _proof(srv.key, b"s", nc, ns) if srv.key is not None and status == HS_OK else bytes(32)
        if status != HS_OK:  # counted before the peer hears the verdict, so it can rely on the count
            srv._count("bad_requests" if status == HS_BAD_VERSION else "auth_failures")
            log.warning("peer %s refused at handshake: %s", self.peer, why)
        verdict = memoryview(_HS_RESULT.pack(HS_MAGIC, VERSION, status, 0, sproof))
        try:
            _send_all(self.sock, [verdict], deadline)
        except OSError:
            return False
        return status == HS_OK

    def _one_request(self) -> bool:
        """Serve one request; False when the connection must close."""
        srv = self.server
        # An idle pooled connection waits for its next request as long as the peer keeps it open
        # (`idle_timeout`); once a request starts, the whole of it must arrive within `io_timeout`.
        first = bytearray(_PREFIX.size)
        _arm(self.sock, srv.idle_timeout)
        try:
            got = self.sock.recv_into(first)
        except BlockingIOError:
            return False
        if not got:
            return False
        self.deadline = _Deadline(srv.io_timeout)
        try:
            header, sizes = _read_message(
                self.sock, KIND_REQUEST, srv.max_header_bytes, srv.max_payloads, srv.max_payload_bytes,
                self.deadline, bytes(first[:got]),
            )  # fmt: skip
        except _BadMessage as e:
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
            except (OSError, _Closed):
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

    def _send_reply(self, reply: Reply, deadline: _Deadline) -> bool:
        srv = self.server
        try:
            try:
                views = [_byte_view(p) for p in reply.payloads]
                sums = reply.sums
                if sums is not None and (
                    len(sums) != len(views)
                    or not all(c is None or (type(c) is int and 0 <= c < 1 << 64) for c in sums)
                ):
                    raise ValueError(
                        f"Reply.sums must be one xxh3_64 int (or None) per payload ({len(views)})"
                    )
                head = _pack(KIND_REPLY, {"reply": reply.header, "sizes": [len(v) for v in views]})
            except Exception as e:
                srv._count("handler_errors")
                log.exception("peer reply to %s cannot be sent", self.peer)
                views, sums = [], None
                head = _pack(
                    KIND_REPLY, {"reply": {"error": ErrorCode.INTERNAL.value, "message": f"bad reply: {e}"}}
                )
            _send_message(self.sock, head, views, sums, deadline)
            srv._count("bytes_out", sum(len(v) for v in views))
            return True
        except (OSError, _Closed) as e:
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
        self.key = _check_key(key)
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
                    sock.send(_HS_SERVER.pack(HS_MAGIC, VERSION, MODE_BUSY, 0, bytes(32)))
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


# --------------------------------------------------------------------------------- client side


class _PeerClosedIdle(Exception):
    """A reused connection turned out closed before any of the reply arrived (PeerClient retries)."""


class _ClientConn:
    __slots__ = ("sock", "addr", "epoch", "scratch", "trailer", "in_sync", "reused")

    def __init__(self, sock: socket.socket, addr: str, epoch: int) -> None:
        self.sock, self.addr, self.epoch = sock, addr, epoch
        self.scratch: memoryview | None = None
        self.trailer = memoryview(bytearray(_TRAILER.size))
        self.in_sync = True  # False from the first byte of a request until its reply is fully read
        self.reused = False  # taken from the idle pool (the peer may have closed it meanwhile)

    def stale(self) -> bool:
        """An idle pooled connection that has something to read is closed (or out of sync): drop it."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _client_handshake(sock: socket.socket, key: bytes | None, deadline: _Deadline) -> None:
    """Authenticate both ways on a fresh connection; raises TransportError with the reason."""
    mode = MODE_KEYED if key is not None else MODE_INSECURE
    magic, version, smode, _, ns = _HS_SERVER.unpack(_recv_exact(sock, _HS_SERVER.size, deadline))
    if magic != HS_MAGIC:
        raise TransportError("not a polarkv peer (bad handshake magic)")
    if version != VERSION:
        raise TransportError(f"peer speaks data protocol version {version}, this side {VERSION}")
    if smode == MODE_BUSY:
        raise TransportError("peer refused the connection: it has too many connections (max_connections)")
    nc = os.urandom(32)
    proof = _proof(key, b"c", ns, nc) if key is not None and smode == mode else bytes(32)
    _send_all(sock, [memoryview(_HS_CLIENT.pack(HS_MAGIC, VERSION, mode, 0, nc, proof))], deadline)
    try:  # the verdict, also on a mismatch: the peer has counted and logged it by then
        _, _, status, _, sproof = _HS_RESULT.unpack(_recv_exact(sock, _HS_RESULT.size, deadline))
    except (OSError, _Closed):
        if smode == mode:
            raise
        status, sproof = HS_MODE_MISMATCH, bytes(32)
    if smode != mode:
        raise TransportError(
            f"handshake refused: peer is {_MODE_NAMES.get(smode, smode)}, this side is {_MODE_NAMES[mode]}"
            " (both sides need the cluster key, or both run insecure)"
        )
    if status == HS_AUTH_FAILED:
        raise TransportError("handshake refused by peer: authentication failed (wrong cluster key?)")
    if status != HS_OK:
        raise TransportError(f"handshake refused by peer (status {status})")
    if key is not None and not hmac.compare_digest(sproof, _proof(key, b"s", nc, ns)):
        raise TransportError("peer failed to prove it holds the cluster key")


def _connect(addr: str, key: bytes | None, deadline: _Deadline) -> socket.socket:
    host, port = parse_address(addr)
    sock = socket.create_connection((host, port), timeout=deadline.left())
    try:
        sock.settimeout(None)  # blocking from here on; `_arm` bounds each syscall
        _tune(sock)
        _client_handshake(sock, key, deadline)
    except BaseException:
        sock.close()
        raise
    return sock


class PeerClient:
    """Calls ops on peers over pooled, authenticated connections. Thread-safe.

    At most `connections_per_peer` connections per address (callers beyond that wait); payload bytes in
    flight across all calls (request bytes while sending, reply bytes while receiving) stay under
    `max_inflight_bytes`, except that one call larger than the bound goes when nothing else is in flight.
    A connection that broke, timed out or lost sync is closed, never reused.
    """

    def __init__(
        self,
        *,
        key: bytes | None,
        timeout: float = 5.0,
        connections_per_peer: int = 4,
        max_inflight_bytes: int = 256 << 20,
    ) -> None:
        if connections_per_peer < 1:
            raise ValueError("connections_per_peer must be >= 1")
        self.key = _check_key(key)
        self.timeout = timeout
        self.connections_per_peer = connections_per_peer
        self.max_inflight_bytes = max_inflight_bytes
        self._cond = threading.Condition()
        self._idle: dict[str, list[_ClientConn]] = {}
        self._open: dict[str, int] = {}
        self._epoch: dict[str, int] = {}
        self._inflight = 0
        self._closed = False

    # ------------------------------------------------------------------ pool and in-flight bound

    def _acquire(self, addr: str, deadline: _Deadline) -> _ClientConn:
        stale: list[_ClientConn] = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise TransportError("PeerClient is closed")
                    idle = self._idle.get(addr)
                    while idle:
                        conn = idle.pop()
                        if not conn.stale():
                            conn.reused = True
                            return conn
                        stale.append(conn)
                        self._open[addr] -= 1
                    if self._open.get(addr, 0) < self.connections_per_peer:
                        self._open[addr] = self._open.get(addr, 0) + 1
                        epoch = self._epoch.get(addr, 0)
                        break
                    self._wait(deadline, f"a connection to {addr}")
        finally:
            for conn in stale:
                conn.close()
        try:
            return _ClientConn(_connect(addr, self.key, deadline), addr, epoch)
        except BaseException as e:
            with self._cond:
                self._open[addr] = self._open.get(addr, 0) - 1
                self._cond.notify_all()
            if isinstance(e, PolarKVError):
                raise TransportError(f"{addr}: {e}") from None
            if isinstance(e, (OSError, _Closed)):
                raise TransportError(f"{addr}: cannot connect: {e}") from e
            raise

    def _release(self, conn: _ClientConn) -> None:
        with self._cond:
            keep = conn.in_sync and not self._closed and conn.epoch == self._epoch.get(conn.addr, 0)
            if keep:
                self._idle.setdefault(conn.addr, []).append(conn)
            else:
                self._open[conn.addr] = self._open.get(conn.addr, 0) - 1
            self._cond.notify_all()
        if not keep:
            conn.close()

    def _wait(self, deadline: _Deadline, what: str) -> None:
        try:
            left = deadline.left()
        except TimeoutError:
            raise TransportError(f"timed out waiting for {what}") from None
        self._cond.wait(left)

    def _reserve(self, n: int, deadline: _Deadline) -> None:
        if n <= 0:
            return
        with self._cond:
            while self._inflight and self._inflight + n > self.max_inflight_bytes:
                self._wait(deadline, "in-flight bytes")
            self._inflight += n

    def _unreserve(self, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self._inflight -= n
            self._cond.notify_all()

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------------------------ calls

    def call(
        self,
        addr: str,
        op: str,
        args: dict[str, Any],
        payloads: Sequence[Any] = (),
        into: Callable[[dict[str, Any]], Sequence[memoryview | None]] | None = None,
        timeout: float | None = None,
        sums_out: list[int | None] | None = None,
    ) -> tuple[dict[str, Any], list[bool]]:
        """Send one request (header + payloads), wait for its reply. `into(reply_header)` returns one
        destination view per reply payload (None = skip it); each is received straight into its view
        and its checksum verified. Returns (reply header, ok-per-payload: True verified, False corrupt
        or skipped); with `sums_out`, the verified checksum of each reply payload (None where it failed
        or was skipped) is appended there. Raises TransportError on connect/auth failure, timeout, or a broken connection
        (that connection is discarded, never reused out of sync); raises PolarKVError with the remote
        code when the reply header is {"error": code, "message": ...}."""
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        views = [_byte_view(p) for p in payloads]
        sizes = [len(v) for v in views]
        head = _pack(KIND_REQUEST, {"op": op, "args": args, "sizes": sizes})
        try:
            return self._call_once(addr, op, head, views, sizes, into, deadline, sums_out)
        except _PeerClosedIdle:
            # A pooled connection the peer had closed (a restart, its idle timeout) between the
            # staleness check and our request: nothing of the reply was read, so once more on a new one.
            self._drop_idle(addr)
            return self._call_once(addr, op, head, views, sizes, into, deadline, sums_out)

    def _drop_idle(self, addr: str) -> None:
        with self._cond:
            idle = self._idle.pop(addr, [])
            self._open[addr] = self._open.get(addr, 0) - len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def _call_once(
        self, addr: str, op: str, head: bytes, views: list[memoryview], sizes: list[int],
        into: Callable[[dict[str, Any]], Sequence[memoryview | None]] | None, deadline: _Deadline,
        sums_out: list[int | None] | None,
    ) -> tuple[dict[str, Any], list[bool]]:  # fmt: skip
        conn = self._acquire(addr, deadline)
        replied = False
        try:
            sent = sum(sizes)
            self._reserve(sent, deadline)
            try:
                conn.in_sync = False
                _send_message(conn.sock, head, views, None, deadline)
            finally:
                self._unreserve(sent)
            envelope, rsizes = _read_message(
                conn.sock, KIND_REPLY, _REPLY_MAX_HEADER_BYTES, MAX_PAYLOADS, MAX_PAYLOAD_BYTES, deadline
            )
            replied = True
            reply = envelope.get("reply")
            if not isinstance(reply, dict):
                raise _BadMessage(ErrorCode.BAD_REQUEST, "reply without a header map")
            if "error" in reply:
                self._drain(conn, rsizes, deadline)
                conn.in_sync = True
                raise error_for_code(str(reply["error"]), str(reply.get("message", "")))
            return reply, self._receive(conn, reply, rsizes, into, deadline, sums_out)
        except (OSError, _Closed, _BadMessage) as e:
            if conn.reused and not replied and isinstance(e, (_Closed, ConnectionError)):
                raise _PeerClosedIdle from e
            why = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            raise TransportError(f"{addr} {op}: {why}") from e
        finally:
            self._release(conn)

    def _receive(
        self, conn: _ClientConn, reply: dict[str, Any], sizes: list[int],
        into: Callable[[dict[str, Any]], Sequence[memoryview | None]] | None, deadline: _Deadline,
        sums_out: list[int | None] | None = None,
    ) -> list[bool]:  # fmt: skip
        dests: list[memoryview | None] = [None] * len(sizes)
        if into is not None and sizes:
            try:
                got = list(into(reply))
                if len(got) != len(sizes):
                    raise ValueError(f"into() gave {len(got)} views for {len(sizes)} payloads")
                dests = [None if d is None else _byte_view(d, writable=True) for d in got]
                for i, (d, n) in enumerate(zip(dests, sizes)):
                    if d is not None and len(d) != n:
                        raise ValueError(f"reply payload {i} is {n} bytes, its view {len(d)}")
            except BaseException:
                self._drain(conn, sizes, deadline)  # keep the connection framed, then report the bug
                conn.in_sync = True
                raise
        total = sum(sizes)
        self._reserve(total, deadline)
        try:
            oks = []
            for n, dst in zip(sizes, dests):
                if dst is None:
                    self._drain(conn, [n], deadline)
                    oks.append(False)
                else:
                    c = _recv_payload(conn.sock, dst, conn.trailer, deadline)
                    oks.append(c is not None)
                    if sums_out is not None:
                        sums_out.append(c)
                    continue
                if sums_out is not None:
                    sums_out.append(None)
            conn.in_sync = True
            return oks
        finally:
            self._unreserve(total)

    def _drain(self, conn: _ClientConn, sizes: list[int], deadline: _Deadline) -> None:
        if not sizes:
            return
        if conn.scratch is None:
            conn.scratch = memoryview(bytearray(_SCRATCH))
        for n in sizes:
            _discard(conn.sock, n + _TRAILER.size, conn.scratch, deadline)

    def forget(self, addr: str) -> None:
        """Close pooled connections to a peer that is gone (busy ones close when their call ends)."""
        with self._cond:
            self._epoch[addr] = self._epoch.get(addr, 0) + 1
            idle = self._idle.pop(addr, [])
            self._open[addr] = self._open.get(addr, 0) - len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle = [c for cs in self._idle.values() for c in cs]
            for c in idle:
                self._open[c.addr] -= 1
            self._idle.clear()
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
