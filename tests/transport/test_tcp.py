"""The peer data path over real TCP sockets on 127.0.0.1: pages arrive byte-exact in the caller's
buffers, corruption is reported per page, bad peers are refused and never take the server down."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from polarkvd.errors import ErrorCode, PageNotFound, PolarKVError, TransportError
from polarkvd.transport import peer_wire
from polarkvd.transport.peer_client import PeerClient, _ClientConn, _connect
from polarkvd.transport.peer_server import PayloadReader, PeerServer, Reply
from polarkvd.transport.peer_wire import (
    KIND_REQUEST,
    MSG_MAGIC,
    PREFIX,
    TRAILER,
    VERSION,
    Closed,
    Deadline,
    data_key,
    parse_address,
    payload_sum,
    read_message,
    recv_payload,
)

KEY = data_key(b"rq}Vn!v=fJ5kZ3#Z&tNQ0m.wcG4*V9pY]uE8%Hx)")  # a z85-looking cluster secret
OTHER_KEY = data_key(b"another cluster's secret, forty bytes !!")


@pytest.fixture(autouse=True, params=["compiled", "python"])
def receive_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each receive of `recv_payload`: the compiled receive-and-hash
    (polarkvd/wire/_recvhash.c) and the Python one it falls back to."""
    if request.param == "compiled" and peer_wire._recvhash is None:
        pytest.skip("the compiled receive (polarkvd.wire._recvhash) is not built")
    monkeypatch.setattr(peer_wire, "RECV_COMPILED", request.param == "compiled")
    return str(request.param)


def page(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Store:
    """Handlers over a dict of pages, as the daemon will register them."""

    def __init__(self) -> None:
        self.pages: dict[bytes, bytes] = {}
        self.sent = 0
        self.sent_lock = threading.Lock()

    def on_sent(self) -> None:
        with self.sent_lock:
            self.sent += 1

    def get(self, args: dict[str, Any], reader: PayloadReader) -> Reply:
        try:
            pages = [self.pages[k] for k in args["keys"]]
        except KeyError:
            raise PageNotFound("no such page") from None
        return Reply({"n": len(pages)}, pages, on_sent=self.on_sent)

    def put(self, args: dict[str, Any], reader: PayloadReader) -> Reply:
        oks = []
        for k, n in zip(args["keys"], reader.sizes):
            buf = bytearray(n)
            oks.append(reader.recv_into(memoryview(buf)))
            if oks[-1]:
                self.pages[k] = bytes(buf)
        return Reply({"oks": oks})


@pytest.fixture
def serve() -> Iterator[Callable[..., PeerServer]]:
    servers: list[PeerServer] = []

    def start(handlers: dict[str, Any], key: bytes | None = KEY, port: int = 0, **kw: Any) -> PeerServer:
        srv = PeerServer("127.0.0.1", port, key=key, handlers=handlers, **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture
def client() -> Iterator[PeerClient]:
    c = PeerClient(key=KEY, timeout=10)
    yield c
    c.close()


@pytest.fixture
def store_server(serve: Callable[..., PeerServer]) -> tuple[Store, PeerServer]:
    store = Store()
    return store, serve({"get": store.get, "put": store.put})


def raw_request(
    sock: socket.socket, op: str, args: dict[str, Any], payloads: list[tuple[bytes, int]]
) -> None:
    """A request written by hand: payloads with the checksum we choose."""
    head = msgpack.packb({"op": op, "args": args, "sizes": [len(p) for p, _ in payloads]}, use_bin_type=True)
    data = PREFIX.pack(MSG_MAGIC, VERSION, KIND_REQUEST, len(head)) + head
    for p, s in payloads:
        data += p + struct.pack("<Q", s)
    sock.sendall(data)


def read_reply(sock: socket.socket) -> tuple[dict[str, Any], list[tuple[bytes, bool]]]:
    header, sizes = read_message(sock, 2, 1 << 20, 100, 1 << 30, Deadline(10))
    out = []
    for n in sizes:
        buf = bytearray(n)
        ok = recv_payload(sock, memoryview(buf), memoryview(bytearray(8)), Deadline(10)) is not None
        out.append((bytes(buf), ok))
    return header["reply"], out


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    sock.settimeout(10)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass  # closed with our unread garbage in its buffer: a reset instead of an orderly close
    return got


# ------------------------------------------------------------------------------------- basics


def test_data_key_is_derived_never_the_secret() -> None:
    secret = b"rq}Vn!v=fJ5kZ3#Z&tNQ0m.wcG4*V9pY]uE8%Hx)"
    assert data_key(secret) == KEY and len(KEY) == 32
    assert KEY not in secret and secret[:32] != KEY
    assert data_key(secret + b"x") != KEY
    with pytest.raises(ValueError):
        data_key(b"")


def test_parse_address() -> None:
    assert parse_address("tcp://10.0.0.7:7100") == ("10.0.0.7", 7100)
    assert parse_address("[::1]:9") == ("::1", 9)
    with pytest.raises(ValueError):
        parse_address("tcp://nohost")


def test_pages_of_every_size_land_in_the_callers_buffer(
    store_server: tuple[Store, PeerServer], client: PeerClient
) -> None:
    store, srv = store_server
    sizes = [0, 1, 4096, 1 << 20, 6_000_000]
    keys = [bytes([i]) * 16 for i in range(len(sizes))]
    pages = [page(i, n) for i, n in enumerate(sizes)]
    header, oks = client.call(srv.address, "put", {"keys": keys}, pages)
    assert header == {"oks": [True] * len(sizes)} and oks == []
    arena = bytearray(sum(sizes) + 100)  # one caller-owned buffer, pages at offsets in it
    offsets = [sum(sizes[:i]) + 7 for i in range(len(sizes))]
    views = [memoryview(arena)[o : o + n] for o, n in zip(offsets, sizes)]
    seen: list[dict[str, Any]] = []

    def into(h: dict[str, Any]) -> list[memoryview | None]:
        seen.append(h)
        return list(views)

    header, oks = client.call(srv.address, "get", {"keys": keys}, into=into)
    assert header == {"n": len(sizes)} and seen == [header]
    assert oks == [True] * len(sizes)
    for o, n, p in zip(offsets, sizes, pages):
        assert arena[o : o + n] == p  # the bytes are in the caller's memory, not in a returned copy
    assert arena[:7] == bytes(7)
    client.call(srv.address, "get", {"keys": []})  # the server thread counted the previous reply by now
    assert srv.stats["bytes_out"] == srv.stats["bytes_in"] == sum(sizes)


def test_skipped_payloads_and_into_none(store_server: tuple[Store, PeerServer], client: PeerClient) -> None:
    store, srv = store_server
    store.pages = {b"a": page(1, 1000), b"b": page(2, 3000)}
    dst = bytearray(3000)
    header, oks = client.call(
        srv.address, "get", {"keys": [b"a", b"b"]}, into=lambda h: [None, memoryview(dst)]
    )
    assert oks == [False, True] and dst == store.pages[b"b"]
    header, oks = client.call(srv.address, "get", {"keys": [b"a", b"b"]})  # no into: all skipped
    assert oks == [False, False]
    with pytest.raises(ValueError, match="view"):  # a wrong-sized view is the caller's bug...
        client.call(srv.address, "get", {"keys": [b"a"]}, into=lambda h: [memoryview(bytearray(999))])
    _, oks = client.call(srv.address, "get", {"keys": [b"a"]}, into=lambda h: [memoryview(dst)[:1000]])
    assert oks == [True] and dst[:1000] == store.pages[b"a"]  # ...and the connection stayed in sync
    assert srv.stats["connections"] == 1


def test_handler_reads_skips_and_leaves_payloads(
    serve: Callable[..., PeerServer], client: PeerClient
) -> None:
    got: dict[str, Any] = {}

    def put(args: dict[str, Any], reader: PayloadReader) -> Reply:
        first = bytearray(reader.sizes[0])
        got["ok"] = reader.recv_into(memoryview(first))
        got["first"] = bytes(first)
        reader.skip()
        got["pending"] = reader.pending
        return Reply({"stored": 1})  # the last two payloads are never read by the handler

    def echo(args: dict[str, Any], reader: PayloadReader) -> Reply:
        buf = bytearray(reader.sizes[0])
        reader.recv_into(memoryview(buf))
        return Reply({}, [buf])

    srv = serve({"put": put, "echo": echo})
    pages = [page(i, 200_000 + i) for i in range(4)]
    header, _ = client.call(srv.address, "put", {}, pages)
    assert header == {"stored": 1}
    assert got == {"ok": True, "first": pages[0], "pending": 2}
    out = bytearray(5)
    _, oks = client.call(srv.address, "echo", {}, [b"hello"], into=lambda h: [memoryview(out)])
    assert oks == [True] and out == b"hello"  # same connection, still framed
    assert srv.stats["connections"] == 1 and srv.stats["bytes_in"] == sum(map(len, pages)) + 5


# ---------------------------------------------------------------------------------- corruption


def test_corrupt_reply_payload_is_flagged_and_the_connection_survives(
    serve: Callable[..., PeerServer], client: PeerClient
) -> None:
    good, bad = page(1, 100_000), page(2, 100_000)

    def get(args: dict[str, Any], reader: PayloadReader) -> Reply:
        # A page that changed after its checksum was taken (the sum is of other bytes).
        return Reply({}, [good, bad], sums=[__import__("xxhash").xxh3_64_intdigest(good)] * 2)

    srv = serve({"get": get})
    a, b = bytearray(100_000), bytearray(100_000)
    _, oks = client.call(srv.address, "get", {}, into=lambda h: [memoryview(a), memoryview(b)])
    assert oks == [True, False] and a == good and b == bad
    _, oks = client.call(srv.address, "get", {}, into=lambda h: [memoryview(a), memoryview(b)])
    assert oks == [True, False] and srv.stats["connections"] == 1


def test_corrupt_request_payload_is_flagged_and_counted(store_server: tuple[Store, PeerServer]) -> None:
    store, srv = store_server
    sock = _connect(srv.address, KEY, Deadline(5))
    with sock:
        p = page(3, 50_000)
        raw_request(
            sock, "put", {"keys": [b"x", b"y"]}, [(p, 12345), (p, __import__("xxhash").xxh3_64_intdigest(p))]
        )
        header, _ = read_reply(sock)
        assert header == {"oks": [False, True]}
        assert srv.stats["checksum_failures"] == 1 and list(store.pages) == [b"y"]
        raw_request(sock, "get", {"keys": [b"y"]}, [])  # the same connection goes on
        header, payloads = read_reply(sock)
        assert header == {"n": 1} and payloads == [(p, True)]


# ---------------------------------------------------------------------------- authentication


def test_wrong_key_is_refused_and_counted(store_server: tuple[Store, PeerServer]) -> None:
    _, srv = store_server
    with PeerClient(key=OTHER_KEY, timeout=5) as bad:
        with pytest.raises(TransportError, match="authentication failed"):
            bad.call(srv.address, "get", {"keys": []})
    assert srv.stats["auth_failures"] == 1 and srv.stats["requests"] == 0


def test_client_refuses_a_server_without_the_key(serve: Callable[..., PeerServer]) -> None:
    # The server must prove it holds the key too: a server with another key cannot impersonate.
    srv = serve({"get": Store().get}, key=OTHER_KEY)
    with PeerClient(key=KEY, timeout=5) as c:
        with pytest.raises(TransportError):
            c.call(srv.address, "get", {"keys": []})


@pytest.mark.parametrize(("server_key", "client_key"), [(KEY, None), (None, KEY)])
def test_keyed_and_insecure_sides_refuse_each_other(
    serve: Callable[..., PeerServer], server_key: bytes | None, client_key: bytes | None
) -> None:
    srv = serve({"get": Store().get}, key=server_key)
    with PeerClient(key=client_key, timeout=5) as c:
        with pytest.raises(TransportError, match="insecure") as e:
            c.call(srv.address, "get", {"keys": []})
    assert "keyed" in str(e.value)
    assert srv.stats["auth_failures"] == 1


def test_insecure_on_both_sides_works(serve: Callable[..., PeerServer]) -> None:
    store = Store()
    store.pages[b"k"] = b"bytes"
    srv = serve({"get": store.get}, key=None)
    with PeerClient(key=None) as c:
        out = bytearray(5)
        assert c.call(srv.address, "get", {"keys": [b"k"]}, into=lambda h: [memoryview(out)])[1] == [True]
        assert out == b"bytes"


def test_bad_peers_never_stop_the_server(store_server: tuple[Store, PeerServer], client: PeerClient) -> None:
    store, srv = store_server
    srv.handshake_timeout = 0.5
    store.pages[b"k"] = page(9, 4096)
    host, port = parse_address(srv.address)
    silent = socket.create_connection((host, port))  # connects and says nothing
    garbage = socket.create_connection((host, port))
    garbage.sendall(os.urandom(200))  # not a handshake at all
    authed = [_connect(srv.address, KEY, Deadline(5)) for _ in range(5)]
    authed[0].sendall(PREFIX.pack(MSG_MAGIC, VERSION, KIND_REQUEST, 1 << 31))  # huge header length
    authed[1].sendall(b"GET / HTTP/1.1\r\n\r\n")  # garbage after a good handshake
    head = msgpack.packb({"op": "get", "args": {}, "sizes": [1 << 40]})  # absurd payload size
    authed[2].sendall(PREFIX.pack(MSG_MAGIC, VERSION, KIND_REQUEST, len(head)) + head)
    head = b"\xc1" * 10  # undecodable msgpack
    authed[3].sendall(PREFIX.pack(MSG_MAGIC, VERSION, KIND_REQUEST, len(head)) + head)
    authed[4].sendall(PREFIX.pack(MSG_MAGIC, VERSION + 1, KIND_REQUEST, 0))  # a future version
    # A good client is served while those connections are open.
    out = bytearray(4096)
    assert client.call(srv.address, "get", {"keys": [b"k"]}, into=lambda h: [memoryview(out)])[1] == [True]
    assert out == store.pages[b"k"]
    replies = []
    for s in authed:
        with s:
            replies.append(until_closed(s))  # each gets an error reply, then the server closes it
    for data, code in zip(replies, ["too_large", "bad_request", "too_large", "bad_request", "bad_version"]):
        assert code.encode() in data
    assert len(until_closed(garbage)) in (0, 40)  # the server's hello (unless reset), then closed
    assert len(until_closed(silent)) == 40  # closed after the handshake timeout
    silent.close()
    garbage.close()
    assert srv.stats["bad_requests"] == 7
    assert client.call(srv.address, "get", {"keys": [b"k"]}, into=lambda h: [memoryview(out)])[1] == [True]


def test_connections_over_the_limit_are_refused(store_server: tuple[Store, PeerServer]) -> None:
    _, srv = store_server
    srv.max_connections = 1
    with PeerClient(key=KEY, timeout=5) as a, PeerClient(key=KEY, timeout=5) as b:
        a.call(srv.address, "get", {"keys": []})  # holds the one connection (pooled)
        with pytest.raises(TransportError, match="too many connections"):
            b.call(srv.address, "get", {"keys": []})
        assert srv.stats["refused"] == 1
        a.call(srv.address, "get", {"keys": []})  # the connection it has still works


# ------------------------------------------------------------------------------------ errors


def test_error_replies_carry_the_remote_code(serve: Callable[..., PeerServer], client: PeerClient) -> None:
    def boom(args: dict[str, Any], reader: PayloadReader) -> Reply:
        raise RuntimeError("a bug in a handler")

    def bad_reply(args: dict[str, Any], reader: PayloadReader) -> Reply:
        return Reply({"x": object()})  # not msgpack-able

    store = Store()
    srv = serve({"get": store.get, "boom": boom, "bad_reply": bad_reply})
    with pytest.raises(PageNotFound) as e:
        client.call(srv.address, "get", {"keys": [b"missing"]})
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(PolarKVError) as e:
        client.call(srv.address, "boom", {}, [b"unread payload"])
    assert e.value.code is ErrorCode.INTERNAL and "a bug in a handler" in str(e.value)
    with pytest.raises(PolarKVError) as e:
        client.call(srv.address, "bad_reply", {})
    assert e.value.code is ErrorCode.INTERNAL
    with pytest.raises(PolarKVError) as e:
        client.call(srv.address, "nope", {})
    assert e.value.code is ErrorCode.UNKNOWN_OP and "get" in str(e.value)
    store.pages[b"k"] = b"v"
    assert client.call(srv.address, "get", {"keys": [b"k"]})[0] == {"n": 1}  # the server lives on
    assert srv.stats["connections"] == 1 and srv.stats["handler_errors"] == 2


def test_unreachable_peer(client: PeerClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    with pytest.raises(TransportError, match="cannot connect"):
        client.call(f"tcp://127.0.0.1:{port}", "get", {})


def test_slow_server_times_out_and_the_connection_is_dropped(serve: Callable[..., PeerServer]) -> None:
    release = threading.Event()

    def slow(args: dict[str, Any], reader: PayloadReader) -> Reply:
        release.wait(10)
        return Reply({"late": True})

    srv = serve({"slow": slow, "get": Store().get})
    with PeerClient(key=KEY, timeout=5) as c:
        with pytest.raises(TransportError, match="timed out"):
            c.call(srv.address, "slow", {}, timeout=0.3)
        release.set()
        assert c.call(srv.address, "get", {"keys": []})[0] == {
            "n": 0
        }  # a new connection, never the late reply
    assert srv.stats["connections"] == 2


def test_server_closed_mid_call_raises_instead_of_hanging(serve: Callable[..., PeerServer]) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(args: dict[str, Any], reader: PayloadReader) -> Reply:
        entered.set()
        release.wait(10)
        return Reply({})

    srv = serve({"slow": slow})
    errors: list[BaseException] = []

    def call() -> None:
        with PeerClient(key=KEY, timeout=20) as c:
            try:
                c.call(srv.address, "slow", {})
            except BaseException as e:
                errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    assert entered.wait(10)
    srv.close(timeout=0.5)  # shuts the connection down under the blocked handler
    t.join(10)
    release.set()
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], TransportError)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of real TCP sockets on 127.0.0.1 (sender, receiver)."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        tx = socket.create_connection(ls.getsockname()[:2], timeout=10)
        rx, _ = ls.accept()
    rx.settimeout(None)  # blocking, as the transport's sockets
    yield tx, rx
    tx.close()
    rx.close()


def test_a_payload_that_trickles_in_lands_whole_and_checked(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Each payload is received with MSG_WAITALL (one call per payload): bytes that arrive in pieces,
    with pauses between them, still land whole; a corrupt one among them is flagged, the next is fine."""
    tx, rx = tcp_pair
    pages = [page(i, 300_000 + i) for i in range(3)]
    sums = [payload_sum(p) for p in pages]
    sums[1] ^= 1  # the middle one's checksum is wrong

    def dribble() -> None:
        data = b"".join(p + TRAILER.pack(c) for p, c in zip(pages, sums))
        for at in range(0, len(data), 77_777):
            tx.sendall(data[at : at + 77_777])
            threading.Event().wait(0.01)

    t = threading.Thread(target=dribble)
    t.start()
    got = []
    for p in pages:
        buf = bytearray(len(p))
        got.append(
            (recv_payload(rx, memoryview(buf), memoryview(bytearray(8)), Deadline(10)), bytes(buf) == p)
        )
    t.join(10)
    assert got == [(sums[0], True), (None, True), (sums[2], True)]


def test_a_payload_cut_off_midway_times_out_or_reports_the_close(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A peer that stops halfway through a payload: the receive ends at the call's deadline (never
    waits for bytes that do not come); a peer that closes halfway: Closed, naming what is missing."""
    tx, rx = tcp_pair
    body = page(7, 1 << 20)
    tx.sendall(body[: len(body) // 2])
    with pytest.raises(TimeoutError):
        recv_payload(rx, memoryview(bytearray(len(body))), memoryview(bytearray(8)), Deadline(0.3))
    tx.close()
    with pytest.raises(Closed, match="outstanding"):
        recv_payload(rx, memoryview(bytearray(len(body))), memoryview(bytearray(8)), Deadline(5))


# ------------------------------------------------------------------------------- concurrency


class RecordingClient(PeerClient):
    """Records the largest number of payload bytes ever in flight."""

    peak = 0

    def _reserve(self, n: int, deadline: Any) -> None:
        super()._reserve(n, deadline)
        with self._cond:
            self.peak = max(self.peak, self._inflight)


def test_many_threads_share_a_bounded_pool(store_server: tuple[Store, PeerServer]) -> None:
    store, srv = store_server
    size = 1 << 20
    keys = [bytes([i]) * 16 for i in range(8)]
    store.pages = {k: page(i, size) for i, k in enumerate(keys)}
    c = RecordingClient(key=KEY, timeout=20, connections_per_peer=3, max_inflight_bytes=3 * size)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for r in range(6):
                ks = [keys[(t + r) % 8], keys[(t + r + 1) % 8]]
                bufs = [bytearray(size), bytearray(size)]
                _, oks = c.call(
                    srv.address, "get", {"keys": ks}, into=lambda h, bufs=bufs: [memoryview(b) for b in bufs]
                )
                assert oks == [True, True] and [bytes(b) for b in bufs] == [store.pages[k] for k in ks]
                payload = page(t * 100 + r, size)
                header, _ = c.call(srv.address, "put", {"keys": [b"t%d" % t]}, [payload])
                assert header == {"oks": [True]}
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    c.close()
    assert not errors, errors
    assert srv.stats["connections"] <= 3
    assert 0 < c.peak <= 3 * size
    assert c.inflight_bytes == 0
    assert store.sent == 8 * 6  # on_sent exactly once per get reply


def test_a_call_larger_than_the_inflight_bound_still_goes(store_server: tuple[Store, PeerServer]) -> None:
    store, srv = store_server
    store.pages[b"big"] = page(5, 3 << 20)
    with PeerClient(key=KEY, max_inflight_bytes=1 << 20) as c:
        out = bytearray(3 << 20)
        assert c.call(srv.address, "get", {"keys": [b"big"]}, into=lambda h: [memoryview(out)])[1] == [True]
        assert c.call(srv.address, "put", {"keys": [b"b2"]}, [out])[0] == {"oks": [True]}


def test_on_sent_runs_once_when_the_client_goes_away_mid_reply(serve: Callable[..., PeerServer]) -> None:
    done = threading.Event()
    calls: list[int] = []
    big = bytes(64 << 20)  # more than both sockets' buffers hold

    def get(args: dict[str, Any], reader: PayloadReader) -> Reply:
        def sent() -> None:
            calls.append(1)
            done.set()

        return Reply({}, [big], on_sent=sent)

    srv = serve({"get": get}, io_timeout=10)
    sock = _connect(srv.address, KEY, Deadline(5))
    raw_request(sock, "get", {}, [])
    sock.recv(1000)  # the reply has started
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset with most of the reply unread
    assert done.wait(10)
    srv.close()
    assert calls == [1]


def test_forget_closes_pooled_connections(store_server: tuple[Store, PeerServer], client: PeerClient) -> None:
    _, srv = store_server
    client.call(srv.address, "get", {"keys": []})
    client.call(srv.address, "get", {"keys": []})
    assert srv.stats["connections"] == 1
    client.forget(srv.address)
    client.call(srv.address, "get", {"keys": []})
    assert srv.stats["connections"] == 2


def test_a_restarted_peer_is_reached_through_a_fresh_connection(
    serve: Callable[..., PeerServer], client: PeerClient
) -> None:
    store = Store()
    store.pages[b"k"] = b"v1"
    srv = serve({"get": store.get})
    assert client.call(srv.address, "get", {"keys": [b"k"]})[0] == {"n": 1}  # now pooled
    _, port = parse_address(srv.address)
    srv.close()  # the peer restarts on the same port; the pooled connection is dead
    again = serve({"get": store.get}, port=port)
    out = bytearray(2)
    assert client.call(again.address, "get", {"keys": [b"k"]}, into=lambda h: [memoryview(out)])[1] == [True]
    assert out == b"v1" and again.stats["connections"] == 1


def test_a_pooled_connection_closed_after_its_check_is_retried_once(
    serve: Callable[..., PeerServer], client: PeerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer closes an idle pooled connection in the instant between the client's staleness check
    and its request (a fault no real part produces on demand: the check is skipped to open the
    window). The call goes through on a new connection instead of failing the fetch."""
    store = Store()
    store.pages[b"k"] = b"v1"
    srv = serve({"get": store.get})
    assert client.call(srv.address, "get", {"keys": [b"k"]})[0] == {"n": 1}  # now pooled
    _, port = parse_address(srv.address)
    srv.close()
    again = serve({"get": store.get}, port=port)
    monkeypatch.setattr(_ClientConn, "stale", lambda self: False)
    out = bytearray(2)
    assert client.call(again.address, "get", {"keys": [b"k"]}, into=lambda h: [memoryview(out)])[1] == [True]
    assert out == b"v1"
    # a failure on a new connection is not retried: a peer that is gone is reported
    again.close()
    with pytest.raises(TransportError):
        client.call(again.address, "get", {"keys": [b"k"]})


# -------------------------------------------------------------------- a server in another process


def _page_server_process(key: bytes, conn: Any) -> None:
    pages = {bytes([i]) * 16: page(i, 4 << 20) for i in range(8)}

    def get(args: dict[str, Any], reader: PayloadReader) -> Reply:
        return Reply({"n": len(args["keys"])}, [pages[k] for k in args["keys"]])

    srv = PeerServer("127.0.0.1", 0, key=key, handlers={"get": get})
    srv.start()
    conn.send(srv.address)
    conn.recv()  # until the test says stop (or goes away)
    srv.close()


def test_pages_from_a_server_in_another_process() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_page_server_process, args=(KEY, child), daemon=True)
    proc.start()
    try:
        assert parent.poll(60), "server process did not start"
        addr = parent.recv()
        keys = [bytes([i]) * 16 for i in range(8)]
        dest = bytearray(8 << 22)
        views = [memoryview(dest)[i << 22 : (i + 1) << 22] for i in range(8)]
        with PeerClient(key=KEY, timeout=20) as c:
            header, oks = c.call(addr, "get", {"keys": keys}, into=lambda h: views)
            assert header == {"n": 8} and oks == [True] * 8
            for i in range(8):
                assert views[i] == page(i, 4 << 20)
            proc.kill()
            proc.join(10)
            with pytest.raises(TransportError):
                c.call(addr, "get", {"keys": keys[:1]}, into=lambda h: views[:1])
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
