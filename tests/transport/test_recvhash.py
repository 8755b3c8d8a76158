"""The compiled receive-and-hash (polarkvd/wire/_recvhash.c) against the Python receive it falls back
to, over real TCP sockets: the same bytes land and the same checksum comes out (xxhash's own xxh3,
so the wire's checksums keep their meaning), a corrupted chunk is caught, signals and bad arguments
are handled."""

from __future__ import annotations

import random
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
import xxhash

from polarkvd.transport import peer_wire
from polarkvd.transport.peer_wire import RECV_CHUNK, TRAILER, Closed, Deadline, recv_payload

needs_compiled = pytest.mark.skipif(
    peer_wire._recvhash is None, reason="the compiled receive (polarkvd.wire._recvhash) is not built"
)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as ls:
        tx = socket.create_connection(ls.getsockname()[:2], timeout=10)
        rx, _ = ls.accept()
    rx.settimeout(None)
    yield tx, rx
    tx.close()
    rx.close()


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def receive(
    rx: socket.socket, n: int, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[int | None, bytes]:
    monkeypatch.setattr(peer_wire, "RECV_COMPILED", compiled)
    buf = bytearray(n)
    c = recv_payload(rx, memoryview(buf), memoryview(bytearray(TRAILER.size)), Deadline(10))
    return c, bytes(buf)


def send_later(tx: socket.socket, data: bytes, pieces: int = 1) -> threading.Thread:
    def run() -> None:
        step = -(-len(data) // pieces) if data else 1
        for at in range(0, max(len(data), 1), step):
            tx.sendall(data[at : at + step])

    t = threading.Thread(target=run)
    t.start()
    return t


@needs_compiled
def test_compiled_and_python_receives_agree(
    tcp_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Payloads around the chunk size and a 4 MiB page: both receives land the same bytes and give
    xxhash.xxh3_64 of them, which is what the sender put in the trailer."""
    tx, rx = tcp_pair
    sizes = [0, 1, 4095, RECV_CHUNK - 1, RECV_CHUNK, RECV_CHUNK + 1, 3 * RECV_CHUNK + 17, 4 << 20]
    for i, n in enumerate(sizes):
        body = pattern(n, i)
        want = xxhash.xxh3_64_intdigest(body)
        got = []
        for compiled in (True, False):
            t = send_later(tx, body + TRAILER.pack(want), pieces=3)
            got.append(receive(rx, n, compiled, monkeypatch))
            t.join(10)
        assert got[0] == got[1] == (want, body), n


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_corrupted_chunk_is_caught_and_the_stream_stays_framed(
    tcp_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """One byte flipped in the third chunk of a page (the trailer is the sum of the page as sent):
    the receive reports it (None), and the next payload on the same connection arrives verified."""
    if compiled and peer_wire._recvhash is None:
        pytest.skip("the compiled receive is not built")
    tx, rx = tcp_pair
    good = pattern(1 << 20, 3)
    bad = bytearray(good)
    bad[2 * RECV_CHUNK + 12345] ^= 0x40
    nxt = pattern(70_000, 4)
    data = bytes(bad) + TRAILER.pack(xxhash.xxh3_64_intdigest(good))
    data += nxt + TRAILER.pack(xxhash.xxh3_64_intdigest(nxt))
    t = send_later(tx, data, pieces=5)
    c, landed = receive(rx, len(good), compiled, monkeypatch)
    assert c is None and landed == bytes(bad)
    assert receive(rx, len(nxt), compiled, monkeypatch) == (xxhash.xxh3_64_intdigest(nxt), nxt)
    t.join(10)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_cut_off_payloads_time_out_or_report_the_close(
    tcp_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """Halfway through a chunk, the sender stops: TimeoutError at the deadline; then it closes:
    Closed, naming how much is missing (the page and its trailer)."""
    if compiled and peer_wire._recvhash is None:
        pytest.skip("the compiled receive is not built")
    monkeypatch.setattr(peer_wire, "RECV_COMPILED", compiled)
    tx, rx = tcp_pair
    n = 2 * RECV_CHUNK
    tx.sendall(bytes(RECV_CHUNK + 100))
    with pytest.raises(TimeoutError):
        recv_payload(rx, memoryview(bytearray(n)), memoryview(bytearray(8)), Deadline(0.3))
    tx.sendall(bytes(10))
    tx.close()
    with pytest.raises(Closed, match="outstanding"):
        recv_payload(rx, memoryview(bytearray(n)), memoryview(bytearray(8)), Deadline(5))


@needs_compiled
def test_a_signal_during_the_compiled_receive(
    tcp_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal while the receive waits with the GIL released: a handler that returns lets the receive
    go on to the whole verified page; one that raises (Ctrl-C) ends it with that exception."""
    tx, rx = tcp_pair
    body = pattern(1 << 20, 9)
    want = xxhash.xxh3_64_intdigest(body)
    seen: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *a: seen.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        timer = threading.Timer(0.4, lambda: tx.sendall(body + TRAILER.pack(want)))
        timer.start()
        assert receive(rx, len(body), True, monkeypatch) == (want, body)
        signal.setitimer(signal.ITIMER_REAL, 0)
        timer.join(10)
        assert seen  # the signal did arrive while the receive waited

        def stop(*a: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            receive(rx, len(body), True, monkeypatch)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@needs_compiled
def test_bad_arguments_to_the_compiled_receive_are_errors() -> None:
    """Wrong buffers are refused with an error, never a crash: a trailer that is not 8 bytes, a
    read-only destination, a chunk of 0."""
    rh = peer_wire._recvhash
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="trailer"):
            rh.recv_hash(b.fileno(), bytearray(10), bytearray(7), RECV_CHUNK, 0.0)
        with pytest.raises(ValueError, match="chunk"):
            rh.recv_hash(b.fileno(), bytearray(10), bytearray(8), 0, 0.0)
        with pytest.raises(TypeError):
            rh.recv_hash(b.fileno(), b"read-only", bytearray(8), RECV_CHUNK, 0.0)
        with pytest.raises(OSError):
            rh.recv_hash(-1, bytearray(10), bytearray(8), RECV_CHUNK, 0.0)
