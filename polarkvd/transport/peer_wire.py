"""The peer data protocol's wire format (docs/PROTOCOL.md, "Peer data protocol"): the handshake
that authenticates both ends, message framing (a prefix, a msgpack header, payloads each followed by
its xxh3_64), and socket helpers that move bytes with deadlines and without copies. Used by
peer_server.py and peer_client.py; knows nothing of pages or ops."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import time
from typing import Any

import msgpack
import xxhash

from polarkvd.errors import ErrorCode

log = logging.getLogger("polarkvd.transport")

VERSION = 1

# Handshake records (fixed size, little endian).
HS_MAGIC = b"PKVH"
HS_SERVER = struct.Struct("<4sBBH32s")  # magic, version, mode, 0, server nonce
HS_CLIENT = struct.Struct("<4sBBH32s32s")  # magic, version, mode, 0, client nonce, client proof
HS_RESULT = struct.Struct("<4sBBH32s")  # magic, version, status, 0, server proof
MODE_INSECURE, MODE_KEYED = 0, 1
MODE_BUSY = 0xFF  # in the server's hello: over max_connections, closing; try later
HS_OK, HS_AUTH_FAILED, HS_MODE_MISMATCH, HS_BAD_VERSION = 0, 1, 2, 3
MODE_NAMES = {MODE_INSECURE: "insecure (no key)", MODE_KEYED: "keyed"}

# Message prefix: magic, version, kind, header length; then the msgpack header, then the payloads.
MSG_MAGIC = b"PK"
PREFIX = struct.Struct("<2sBBI")
KIND_REQUEST, KIND_REPLY = 1, 2

#: Limits on one message (both directions); the server's are configurable.
MAX_PAYLOADS = 4096
MAX_PAYLOAD_BYTES = 1 << 30
REPLY_MAX_HEADER_BYTES = 16 << 20

SOCK_BUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF we ask for; the kernel may give less (rmem_max)
IOV_MAX = 512  # payload buffers per sendmsg call (Linux allows 1024)
SCRATCH = 256 << 10  # discard buffer per connection
LINGER_SECONDS = 0.2  # how long a connection closed for a bad request drains input first
GATHER_BYTES = 4 << 20  # payload bytes gathered per sendmsg call
PERSON = b"polarkv-peer-v1"  # BLAKE2b personalization (<= 16 bytes)

payload_sum = xxhash.xxh3_64_intdigest
TRAILER = struct.Struct("<Q")  # xxh3_64 of the payload, right after its bytes


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


def handshake_proof(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hashlib.blake2b(role + first + second, digest_size=32, key=key, person=PERSON).digest()


def check_key(key: bytes | None) -> bytes | None:
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


def tune_socket(sock: socket.socket) -> None:
    """Options for bulk transfers: no Nagle, large buffers (quietly less where the kernel caps them),
    keepalive so a connection to a vanished host does not hold a thread for ever."""
    opts = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF),
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


class Deadline:
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


class Closed(ConnectionError):
    """The peer closed the connection."""


TIMEVAL = struct.Struct("@ll")


def arm(sock: socket.socket, seconds: float | None) -> None:
    """Bound each blocking send/recv in the kernel (SO_RCVTIMEO/SO_SNDTIMEO; None = no bound).

    The sockets stay in blocking mode: Python's own timeouts make every recv a poll() plus a recv(),
    which costs measurable CPU at GB/s. A recv or send that hits the bound fails with EAGAIN, which the
    loops below turn into TimeoutError; the loops also check the call's deadline between syscalls."""
    if seconds is None:
        tv = TIMEVAL.pack(0, 0)
    else:
        seconds = max(seconds, 0.001)
        tv = TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def recv_into(sock: socket.socket, view: memoryview, deadline: Deadline) -> None:
    """Fill `view` (a byte view) from the socket, straight into its memory. `MSG_WAITALL`: the kernel
    copies the whole view in one call, waking us once rather than per arriving segment (measured:
    docs/BENCHMARKS.md, "bench cluster"); it returns short only on a timeout, a signal or EOF."""
    got, n = 0, len(view)
    arm(sock, deadline.left())
    while got < n:
        try:
            k = sock.recv_into(view[got:] if got else view, 0, socket.MSG_WAITALL)
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        if not k:
            raise Closed(f"connection closed with {n - got} of {n} bytes outstanding")
        got += k
        if got < n:
            deadline.left()


def recv_exact(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def discard(sock: socket.socket, n: int, scratch: memoryview, deadline: Deadline) -> None:
    arm(sock, deadline.left())
    while n:
        try:
            k = sock.recv_into(scratch, min(n, len(scratch)))
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        if not k:
            raise Closed(f"connection closed with {n} bytes to discard outstanding")
        n -= k
        if n:
            deadline.left()


def send_all(sock: socket.socket, bufs: list[memoryview], deadline: Deadline) -> None:
    """Gather-send byte views with partial-send handling; the buffers are never concatenated."""
    views = [b for b in bufs if len(b)]
    i = 0
    arm(sock, deadline.left())
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + IOV_MAX])
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


def byte_view(buf: Any, *, writable: bool = False) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("payload buffers must be C-contiguous")
    if writable and mv.readonly:
        raise ValueError("destination view is read-only")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def pack_header(kind: int, header: dict[str, Any]) -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(MSG_MAGIC, VERSION, kind, len(body)) + body


class BadMessage(Exception):
    """A message that breaks the framing rules; `code` is the error to reply with before closing."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_message(
    sock: socket.socket, kind: int, max_header: int, max_payloads: int, max_payload_bytes: int,
    deadline: Deadline, start: bytes = b"",
) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
    """Read prefix + header (`start`: prefix bytes already read) and validate the framing.
    Returns (header, sizes) with sizes taken out of the header."""
    prefix = bytearray(PREFIX.size)
    prefix[: len(start)] = start
    recv_into(sock, memoryview(prefix)[len(start) :], deadline)
    magic, version, got_kind, hlen = PREFIX.unpack(prefix)
    if magic != MSG_MAGIC:
        raise BadMessage(ErrorCode.BAD_REQUEST, f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise BadMessage(ErrorCode.BAD_VERSION, f"protocol version {version}; this side speaks {VERSION}")
    if got_kind != kind:
        raise BadMessage(ErrorCode.BAD_REQUEST, f"message kind {got_kind}, expected {kind}")
    if hlen > max_header:
        raise BadMessage(ErrorCode.TOO_LARGE, f"header of {hlen} bytes over the limit of {max_header}")
    raw = recv_exact(sock, hlen, deadline)
    try:
        header = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise BadMessage(ErrorCode.BAD_REQUEST, f"undecodable header: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise BadMessage(ErrorCode.BAD_REQUEST, "header is not a map")
    sizes = header.pop("sizes", [])
    if not isinstance(sizes, list):
        raise BadMessage(ErrorCode.BAD_REQUEST, "sizes must be a list")
    if len(sizes) > max_payloads:
        raise BadMessage(ErrorCode.TOO_LARGE, f"{len(sizes)} payloads over the limit of {max_payloads}")
    for s in sizes:
        if type(s) is not int or s < 0:
            raise BadMessage(ErrorCode.BAD_REQUEST, "sizes must be non-negative integers")
        if s > max_payload_bytes:
            raise BadMessage(
                ErrorCode.TOO_LARGE, f"payload of {s} bytes over the limit of {max_payload_bytes}"
            )
    return header, sizes


def send_message(sock: socket.socket, head: bytes, views: list[memoryview], sums: list[int | None] | None,
                  deadline: Deadline) -> None:  # fmt: skip
    """Header, then each payload followed by its checksum, gathered into few sendmsg calls. Each payload
    is hashed right before it is queued, so its bytes are still in cache when the kernel copies them
    (hashing them all first, or chunk by chunk, measured costlier on a busy host). The header of a
    message with payloads goes in a call of its own, so it reaches the receiver at once."""
    pending, queued = [memoryview(head)], 0
    if views:  # the header on its own first: the receiver wakes and readies its views while the
        send_all(sock, pending, deadline)  # first page is still being copied (measured faster)
        pending = []
    for i, v in enumerate(views):
        c = sums[i] if sums is not None else None
        if c is None:
            c = payload_sum(v)
            if sums is not None:
                sums[i] = c
        pending += [v, memoryview(TRAILER.pack(c))]
        queued += len(v)
        if queued >= GATHER_BYTES or len(pending) >= IOV_MAX:
            send_all(sock, pending, deadline)
            pending, queued = [], 0
    if pending:
        send_all(sock, pending, deadline)


#: Bytes received per step of the compiled receive, each hashed at once while it is in cache (L2).
RECV_CHUNK = 256 << 10


def _bind_recvhash() -> Any:
    """The compiled receive-and-hash (polarkvd/wire/_recvhash.c) bound to xxhash's own xxh3, or None
    (not built, or that xxhash does not export the streaming API): then `recv_payload` is Python's."""
    try:
        from xxhash import _xxhash  # type: ignore[attr-defined]

        from polarkvd.wire import _recvhash

        _recvhash.bind(_xxhash.__file__)
        probe = bytes(range(256)) * 1031  # several stripes and a tail: the same function, checked
        if _recvhash.hash(probe) != payload_sum(probe):
            raise ImportError("the bound xxh3 disagrees with xxhash.xxh3_64")
        return _recvhash
    except (ImportError, AttributeError, OSError) as e:
        log.debug("peer data path: receive and hash in Python (%s)", e)
        return None


_recvhash = _bind_recvhash()
#: Whether payloads are received by the compiled path (tests switch it off to run the fallback).
RECV_COMPILED = _recvhash is not None and os.environ.get("POLARKVD_PURE_PYTHON", "") in ("", "0")


def recv_payload(sock: socket.socket, dst: memoryview, trailer: memoryview, deadline: Deadline) -> int | None:
    """Receive one payload straight into `dst`, then its checksum; the checksum when they agree,
    None when they do not. Compiled (`RECV_COMPILED`): a chunk at a time, each hashed as it lands,
    the GIL released; else in Python, the payload then its hash. (One `recvmsg_into` of both with
    MSG_WAITALL measured slower than two `recv_into`s.)"""
    if RECV_COMPILED and _recvhash is not None:
        return _recv_payload_compiled(sock, dst, trailer, deadline)
    recv_into(sock, dst, deadline)
    recv_into(sock, trailer, deadline)
    want = TRAILER.unpack(trailer)[0]
    return want if payload_sum(dst) == want else None


def _recv_payload_compiled(
    sock: socket.socket, dst: memoryview, trailer: memoryview, deadline: Deadline
) -> int | None:
    arm(sock, deadline.left())
    status, got, c, want = _recvhash.recv_hash(sock.fileno(), dst, trailer, RECV_CHUNK, deadline.at or 0.0)
    if status == _recvhash.CLOSED:
        n = len(dst) + TRAILER.size
        raise Closed(f"connection closed with {n - got} of {n} bytes outstanding")
    if status == _recvhash.TIMEOUT:
        raise TimeoutError("timed out")
    return int(want) if c == want else None
