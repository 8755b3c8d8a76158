"""The HTTP endpoint against clients that trickle a request a byte at a time, and /where answers the
endpoint gives up on: a request has one deadline for its headers and body together, so tricklers
in every slot lock /metrics and /where out for that long at most, each told so; a /where that
times out is cancelled on the daemon's loop, not finished for nobody."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from polarkvd.metrics import HTTP_REQUEST_DEADLINE, MAX_HTTP_CONNECTIONS
from polarkvd.server.where import http_route
from tests.hardening.test_http import address


@pytest.mark.slow
def test_tricklers_in_every_slot_lock_the_endpoint_out_for_one_deadline_at_most(daemon) -> None:
    held = [socket.create_connection(address(daemon), timeout=5) for _ in range(MAX_HTTP_CONNECTIONS)]
    stop = threading.Event()
    told: list[bytes] = []

    def trickle(s: socket.socket) -> None:
        """A byte of a never-ending header line every second, until the daemon closes the socket."""
        s.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
        try:
            while not stop.wait(1.0):
                s.sendall(b"a")
        except OSError:
            pass
        try:
            s.settimeout(5)
            told.append(s.recv(1 << 12))
        except OSError:
            told.append(b"")

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in held]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        query = b"GET /metrics HTTP/1.0\r\n\r\n"
        with socket.create_connection(address(daemon), timeout=10) as s:  # every slot is taken
            s.sendall(query)
            assert s.recv(1 << 12).startswith(b"HTTP/1.0 503"), "the tricklers did not take every slot"
        began = time.monotonic()
        while True:
            with socket.create_connection(address(daemon), timeout=10) as s:
                s.sendall(query)
                first = s.recv(1 << 12)
            if first.startswith(b"HTTP/1.0 200"):
                break
            assert time.monotonic() - began < HTTP_REQUEST_DEADLINE + 5, "locked out past the deadline"
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for s in held:
            s.close()
    answered = [t for t in told if t.startswith(b"HTTP/1.0 408")]
    assert len(answered) == MAX_HTTP_CONNECTIONS, told[:3]
    assert b"did not arrive whole" in answered[0]


@pytest.mark.slow
def test_a_body_trickled_past_the_deadline_is_a_clear_error(daemon) -> None:
    """Each byte within the per-read timeout, the body as a whole too late."""
    with socket.create_connection(address(daemon), timeout=HTTP_REQUEST_DEADLINE + 20) as s:
        body = b'{"model": "m", "tokens": [' + b"1," * 100 + b"1]}"
        s.sendall(b"POST /where HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body))
        began = time.monotonic()
        try:
            for i in range(len(body)):
                s.sendall(body[i : i + 1])
                time.sleep(1.0)
        except OSError:  # the daemon answered and closed
            pass
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
    assert time.monotonic() - began < HTTP_REQUEST_DEADLINE + 5
    head, _, text = got.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and "did not arrive whole" in json.loads(text)["error"], got


def test_a_where_the_endpoint_gives_up_on_is_cancelled_on_the_loop() -> None:
    """The daemon's loop (a real one, on its thread) is too busy to answer within the timeout: the
    client gets 503, and the query never runs later for nobody."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    ran: list[str] = []
    ended = threading.Event()

    async def where(conn: object, args: dict) -> dict:
        try:
            ran.append("started")
            await asyncio.sleep(3600)  # an owner that never answers
            ran.append("finished")
            return {}
        finally:
            ended.set()

    try:
        route = http_route(loop, where, timeout=0.2)
        status, out = route("GET", "model=m&tokens=1", b"")
        assert status == 503 and "no answer within" in out["error"], out
        assert ended.wait(5), "the abandoned /where still runs on the loop"
        assert ran == ["started"]

        # a loop blocked past the timeout: the query must not run once the loop is free again
        ran.clear()
        ended.clear()
        blocked = threading.Event()
        loop.call_soon_threadsafe(lambda: blocked.wait(1.0))
        status, _ = route("GET", "model=m&tokens=1", b"")
        assert status == 503
        time.sleep(1.5)
        assert ran == [], "an abandoned /where ran after its client was told 503"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
