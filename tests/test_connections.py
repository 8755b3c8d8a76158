"""Engine connections at the edge: a connect flood, a full listen backlog, connections that never
send hello. The client waits for room instead of failing, and the daemon's threads stay bounded by
its configuration (daemon.max_sessions + daemon.max_unattached_connections)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from polarkvd.bench.connect import flood
from polarkvd.client import EngineClient
from polarkvd.errors import DaemonUnavailable, ErrorCode, ProtocolError
from polarkvd.wire import frames as P
from polarkvd.wire.channel import Channel
from tests.conftest import TEST_NS, DaemonProc, wait_for


def daemon_threads(d: DaemonProc) -> int:
    """The daemon process's threads, as the kernel counts them."""
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def parting_words(s: socket.socket) -> list[object] | None:
    """The error frame the daemon sent before closing `s`, or None if it is still open (no EOF)."""
    s.settimeout(30)
    data = b""
    while True:
        got = s.recv(1 << 16)
        if not got:
            break
        data += got
    if not data:
        return None
    (n,) = P.LENGTH.unpack_from(data)
    return P.unpack(data[4 : 4 + n])


def test_connect_waits_for_room_in_a_full_listen_backlog(tmp_path: Path) -> None:
    """The client's timeout made connect() non-blocking: with the backlog full it failed at once with
    EAGAIN ('Resource temporarily unavailable') instead of waiting for the daemon to accept."""
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:  # fill the backlog: a non-blocking connect fails once it is full
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        queued.append(s)
    accepted: list[socket.socket] = []
    go = threading.Event()

    def accept_later() -> None:
        go.wait(30)
        for _ in range(len(queued) + 1):
            accepted.append(listener.accept()[0])

    t = threading.Thread(target=accept_later)
    t.start()
    try:
        threading.Timer(0.2, go.set).start()  # the daemon catches up while the client waits
        ch = Channel(path, timeout=30)
        ch.close()
    finally:
        go.set()
        t.join(30)
        for s in queued + accepted:
            s.close()
        listener.close()
    assert len(accepted) == len(queued) + 1


def test_a_backlog_that_stays_full_fails_after_the_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        with pytest.raises(DaemonUnavailable, match="Resource temporarily unavailable"):
            Channel(path, timeout=0.3)
    finally:
        for s in queued:
            s.close()
        listener.close()
    with pytest.raises(DaemonUnavailable, match="is `polarkvd serve` running"):
        Channel(path, timeout=5)  # nobody listens: fails at once, no waiting


def test_connections_without_hello_are_capped_oldest_first(daemon_factory) -> None:
    """800 idle connections cost 800 threads. Now the unattached ones are capped: each new one over
    the cap closes the oldest with a clear error, so the threads stay bounded and a real engine
    still gets in at once."""
    cap = 4
    d = daemon_factory({"daemon.max_unattached_connections": str(cap), "daemon.hello_timeout": "1h"})
    kv = d.engine(engine_id="already-attached")
    base = daemon_threads(d)
    idle = []
    for _ in range(40):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.engine_socket))
        idle.append(s)
    try:
        wait_for(lambda: daemon_threads(d) <= base + cap, what="threads of the dropped connections to end")
        assert daemon_threads(d) <= base + cap
        for s in idle[: len(idle) - cap]:  # the oldest: told why, then closed
            words = parting_words(s)
            assert words is not None and words[2] == P.ERROR, words
            assert words[3]["code"] == ErrorCode.TOO_LARGE.value
            assert "max_unattached_connections" in words[3]["message"]
        with EngineClient(TEST_NS, "late-but-real", d.engine_socket, timeout=30) as late:
            keys = late.page_keys(np.arange(32))
            assert late.store(keys, [np.full(late.page_bytes, 5, np.uint8)] * 2).stored == 2
            assert kv.lookup(keys).hits == 2
        st = d.stats()
        assert st["counters"]["connections_dropped_unattached"] == len(idle) - cap + 1
        assert daemon_threads(d) <= base + cap
    finally:
        for s in idle:
            s.close()
        kv.close()


def test_a_connection_that_never_says_hello_is_closed(daemon_factory) -> None:
    d = daemon_factory({"daemon.hello_timeout": "300ms"})
    with EngineClient(TEST_NS, "attached", d.engine_socket, timeout=30) as kv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.engine_socket))
        try:
            assert parting_words(s) is None  # EOF: closed by the daemon
        finally:
            s.close()
        assert d.stats()["counters"]["connections_hello_timeout"] == 1
        kv.ping()  # an attached engine is never timed out, however long it has been connected
        assert len(d.stats()["sessions"]) == 1
    assert "sent no hello within 0.3s" in d.log()


def test_a_connect_flood_succeeds_with_bounded_threads(daemon_factory) -> None:
    """4 processes constructing EngineClients in a loop: >= 99% succeed within their 2 s timeout, and
    the daemon's threads never exceed what its configuration allows."""
    d = daemon_factory({"daemon.max_unattached_connections": "8", "daemon.max_sessions": "16"})
    base = d.stats()["process"]["threads"]  # the daemon's Python threads, as `peak_threads` counts
    r = flood(d.engine_socket, d.control_socket, procs=4, count=300, seconds=0, timeout=2.0)
    assert r["tried"] == 1200
    assert r["ok"] >= 0.99 * r["tried"], r
    assert r["peak_threads"] <= base + 16 + 8, r


@pytest.mark.parametrize("answer", [["not", "a", "reply"], "a string", [1, 2, 0, "not a dict"], 7])
def test_something_that_is_not_a_daemon_answering_is_a_clear_error(tmp_path: Path, answer: object) -> None:
    """A socket whose other end answers with frames that are not polarkvd replies: ProtocolError
    naming the path, never an unpacking error from inside the client."""
    import msgpack

    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)
            payload = msgpack.packb(answer)
            conn.sendall(len(payload).to_bytes(4, "little") + payload)
            conn.recv(1)  # until the client closes

    t = threading.Thread(target=serve)
    t.start()
    try:
        ch = Channel(path, timeout=5)
        with pytest.raises(ProtocolError, match="not a polarkvd reply"):
            ch.call("ping", {})
        ch.close()
    finally:
        t.join(10)
        listener.close()
