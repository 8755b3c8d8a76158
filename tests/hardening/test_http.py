"""The daemon's HTTP endpoint (/metrics, /where) under clients an outside checker sends: many that
connect and send nothing or never end their body, nested JSON, bodies that cost many times their size
in Python objects. The endpoint answers each a clear JSON error, the daemon's threads and memory stay
bounded, and its engines are served throughout."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time

import pytest

from polarkvd.metrics import HTTP_IO_TIMEOUT, MAX_HTTP_CONNECTIONS
from tests.conftest import TEST_NS, DaemonProc, chain_tokens, store_chain


def address(d: DaemonProc) -> tuple[str, int]:
    m = re.search(r"metrics_url=http://([0-9.]+):([0-9]+)/metrics", d.log())
    assert m is not None, d.log()
    return m.group(1), int(m.group(2))


def status_of(d: DaemonProc, pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def exchange(d: DaemonProc, request: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    """Send raw bytes to the endpoint; (HTTP status, JSON answer)."""
    with socket.create_connection(address(d), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body: bytes) -> bytes:
    return b"POST /where HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_connections_that_send_nothing_cannot_pile_up_threads(daemon) -> None:
    pid = daemon.proc.pid
    base = status_of(daemon, pid, "Threads")
    held = []
    try:
        for _ in range(MAX_HTTP_CONNECTIONS + 100):  # each sends half a request, then nothing
            s = socket.create_connection(address(daemon), timeout=10)
            s.sendall(b"POST /where HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
            held.append(s)
        seen, deadline = -1, time.monotonic() + 5  # until the daemon has accepted them all
        while (n := status_of(daemon, pid, "Threads")) != seen and time.monotonic() < deadline:
            seen = n
            time.sleep(0.5)
        assert n <= base + MAX_HTTP_CONNECTIONS + 2, f"{n - base} threads for idle HTTP clients"
        ready, _, _ = select.select(held, [], [], 1.0)  # those over the cap: told so, and closed
        answers = {s.recv(1 << 12).split(b"\r\n")[0] for s in ready}
        assert b"HTTP/1.0 503 Service Unavailable" in answers, answers
        with daemon.engine() as kv:  # engines are served meanwhile
            keys = store_chain(kv, chain_tokens(5, 2))
            assert len(kv.lookup(keys).tiers) == 2
    finally:
        for s in held:
            s.close()
    # once they are gone, /where answers again
    query = f"GET /where?model={TEST_NS.model}&tokens=1 HTTP/1.0\r\n\r\n".encode()
    deadline = time.monotonic() + 10
    while (got := exchange(daemon, query))[0] == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got[0] == 200, got


def test_a_burst_of_connects_never_waits_for_the_accept_loop(daemon) -> None:
    """The listen backlog holds a burst: a connect completes in the kernel, not after a SYN retry."""
    held = []
    try:
        for _ in range(200):
            held.append(socket.create_connection(address(daemon), timeout=0.5))  # a SYN retry takes 1 s
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "m", "tokens": [' + b"[]," * 100_000 + b"[]]}",
        b'{"model": "m", "tokens": [{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}]}',
    ],
    ids=["deep", "wide", "objects"],
)
def test_nested_json_is_a_bad_request(daemon, body) -> None:
    status, out = exchange(daemon, post(body))
    assert status == 400 and "flat arrays" in out["error"], out
    assert "internal error" not in daemon.log()


@pytest.mark.slow
def test_a_body_that_never_arrives_whole_is_cut_off(daemon) -> None:
    status, out = exchange(
        daemon, b"POST /where HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{", timeout=HTTP_IO_TIMEOUT + 20
    )
    assert status == 400 and "did not arrive whole" in out["error"]


@pytest.mark.slow
def test_concurrent_costly_bodies_stay_within_bounded_memory(daemon) -> None:
    """Each body is 16 MiB of two-digit hex keys: ~200 MB of Python objects once parsed. A dozen at
    once must not cost a dozen times that."""
    body = b'{"model": "m", "keys": [' + b'"ab",' * ((16 << 20) // 5 - 10) + b'"ab"]}'
    pid = daemon.proc.pid
    before = status_of(daemon, pid, "VmHWM")
    answers: list[int] = []

    def one() -> None:
        answers.append(exchange(daemon, post(body), timeout=300)[0])

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [404] * 12  # parsed, checked: no such model
    grown_mib = (status_of(daemon, pid, "VmHWM") - before) / 1024
    assert grown_mib < 1024, f"peak RSS grew {grown_mib:.0f} MiB"
