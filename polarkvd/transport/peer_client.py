"""The peer data path's client: pooled connections per peer, each authenticated at connect,
calls whose reply payloads land straight in the caller's views and are checked against their
checksums (transport/__init__.py says why plain TCP)."""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from polarkvd.errors import ErrorCode, PolarKVError, TransportError, error_for_code
from polarkvd.transport.peer_wire import (
    HS_AUTH_FAILED,
    HS_CLIENT,
    HS_MAGIC,
    HS_MODE_MISMATCH,
    HS_OK,
    HS_RESULT,
    HS_SERVER,
    KIND_REPLY,
    KIND_REQUEST,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOADS,
    MODE_BUSY,
    MODE_INSECURE,
    MODE_KEYED,
    MODE_NAMES,
    REPLY_MAX_HEADER_BYTES,
    SCRATCH,
    TRAILER,
    VERSION,
    BadMessage,
    Closed,
    Deadline,
    byte_view,
    check_key,
    discard,
    handshake_proof,
    pack_header,
    parse_address,
    read_message,
    recv_exact,
    recv_payload,
    send_all,
    send_message,
    tune_socket,
)

log = logging.getLogger("polarkvd.transport")


# --------------------------------------------------------------------------------- client side


class _PeerClosedIdle(Exception):
    """A reused connection turned out closed before any of the reply arrived (PeerClient retries)."""


class _ClientConn:
    __slots__ = ("sock", "addr", "epoch", "scratch", "trailer", "in_sync", "reused")

    def __init__(self, sock: socket.socket, addr: str, epoch: int) -> None:
        self.sock, self.addr, self.epoch = sock, addr, epoch
        self.scratch: memoryview | None = None
        self.trailer = memoryview(bytearray(TRAILER.size))
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


def _client_handshake(sock: socket.socket, key: bytes | None, deadline: Deadline) -> None:
    """Authenticate both ways on a fresh connection; raises TransportError with the reason."""
    mode = MODE_KEYED if key is not None else MODE_INSECURE
    magic, version, smode, _, ns = HS_SERVER.unpack(recv_exact(sock, HS_SERVER.size, deadline))
    if magic != HS_MAGIC:
        raise TransportError("not a polarkv peer (bad handshake magic)")
    if version != VERSION:
        raise TransportError(f"peer speaks data protocol version {version}, this side {VERSION}")
    if smode == MODE_BUSY:
        raise TransportError("peer refused the connection: it has too many connections (max_connections)")
    nc = os.urandom(32)
    proof = handshake_proof(key, b"c", ns, nc) if key is not None and smode == mode else bytes(32)
    send_all(sock, [memoryview(HS_CLIENT.pack(HS_MAGIC, VERSION, mode, 0, nc, proof))], deadline)
    try:  # the verdict, also on a mismatch: the peer has counted and logged it by then
        _, _, status, _, sproof = HS_RESULT.unpack(recv_exact(sock, HS_RESULT.size, deadline))
    except (OSError, Closed):
        if smode == mode:
            raise
        status, sproof = HS_MODE_MISMATCH, bytes(32)
    if smode != mode:
        raise TransportError(
            f"handshake refused: peer is {MODE_NAMES.get(smode, smode)}, this side is {MODE_NAMES[mode]}"
            " (both sides need the cluster key, or both run insecure)"
        )
    if status == HS_AUTH_FAILED:
        raise TransportError("handshake refused by peer: authentication failed (wrong cluster key?)")
    if status != HS_OK:
        raise TransportError(f"handshake refused by peer (status {status})")
    if key is not None and not hmac.compare_digest(sproof, handshake_proof(key, b"s", nc, ns)):
        raise TransportError("peer failed to prove it holds the cluster key")


def _connect(addr: str, key: bytes | None, deadline: Deadline) -> socket.socket:
    host, port = parse_address(addr)
    sock = socket.create_connection((host, port), timeout=deadline.left())
    try:
        sock.settimeout(None)  # blocking from here on; `arm` bounds each syscall
        tune_socket(sock)
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
        self.key = check_key(key)
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

    def _acquire(self, addr: str, deadline: Deadline) -> _ClientConn:
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
            if isinstance(e, (OSError, Closed)):
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

    def _wait(self, deadline: Deadline, what: str) -> None:
        try:
            left = deadline.left()
        except TimeoutError:
            raise TransportError(f"timed out waiting for {what}") from None
        self._cond.wait(left)

    def _reserve(self, n: int, deadline: Deadline) -> None:
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
        deadline = Deadline(self.timeout if timeout is None else timeout)
        views = [byte_view(p) for p in payloads]
        sizes = [len(v) for v in views]
        head = pack_header(KIND_REQUEST, {"op": op, "args": args, "sizes": sizes})
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
        into: Callable[[dict[str, Any]], Sequence[memoryview | None]] | None, deadline: Deadline,
        sums_out: list[int | None] | None,
    ) -> tuple[dict[str, Any], list[bool]]:  # fmt: skip
        conn = self._acquire(addr, deadline)
        replied = False
        try:
            sent = sum(sizes)
            self._reserve(sent, deadline)
            try:
                conn.in_sync = False
                send_message(conn.sock, head, views, None, deadline)
            finally:
                self._unreserve(sent)
            envelope, rsizes = read_message(
                conn.sock, KIND_REPLY, REPLY_MAX_HEADER_BYTES, MAX_PAYLOADS, MAX_PAYLOAD_BYTES, deadline
            )
            replied = True
            reply = envelope.get("reply")
            if not isinstance(reply, dict):
                raise BadMessage(ErrorCode.BAD_REQUEST, "reply without a header map")
            if "error" in reply:
                self._drain(conn, rsizes, deadline)
                conn.in_sync = True
                raise error_for_code(str(reply["error"]), str(reply.get("message", "")))
            return reply, self._receive(conn, reply, rsizes, into, deadline, sums_out)
        except (OSError, Closed, BadMessage) as e:
            if conn.reused and not replied and isinstance(e, (Closed, ConnectionError)):
                raise _PeerClosedIdle from e
            why = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            raise TransportError(f"{addr} {op}: {why}") from e
        finally:
            self._release(conn)

    def _receive(
        self, conn: _ClientConn, reply: dict[str, Any], sizes: list[int],
        into: Callable[[dict[str, Any]], Sequence[memoryview | None]] | None, deadline: Deadline,
        sums_out: list[int | None] | None = None,
    ) -> list[bool]:  # fmt: skip
        dests: list[memoryview | None] = [None] * len(sizes)
        if into is not None and sizes:
            try:
                got = list(into(reply))
                if len(got) != len(sizes):
                    raise ValueError(f"into() gave {len(got)} views for {len(sizes)} payloads")
                dests = [None if d is None else byte_view(d, writable=True) for d in got]
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
                    c = recv_payload(conn.sock, dst, conn.trailer, deadline)
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

    def _drain(self, conn: _ClientConn, sizes: list[int], deadline: Deadline) -> None:
        if not sizes:
            return
        if conn.scratch is None:
            conn.scratch = memoryview(bytearray(SCRATCH))
        for n in sizes:
            discard(conn.sock, n + TRAILER.size, conn.scratch, deadline)

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
