"""`polarkvd route` under what clients and engines do wrong: a client that leaves while its engine
is still working (the engine's request must be closed, not run on for nobody), and bodies the
router must refuse itself with a 400 instead of failing with a 500."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import REPO_ROOT, clean_env
from tests.route.test_server import FakeEngine, post, router_over, run, serve

pytestmark = pytest.mark.timeout(120)


class SlowEngine:
    """An engine that starts answering (a stream: headers and one chunk) and then works on without
    a byte: it notes when its client, the router, closes the connection."""

    def __init__(self) -> None:
        self.requests = 0
        self.closed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_get("/metrics", self.metrics)
        return app  # no /v1/models: the router runs round-robin without a model

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 0.0\n")

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if body.get("stream"):
            await resp.prepare(request)
            await resp.write(b'data: {"i": 0}\n\n')
        for _ in range(60 * 50):  # a minute of work
            if request.transport is None or request.transport.is_closing():
                self.closed.set()
                return resp
            await asyncio.sleep(0.02)
        return resp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_leaves_closes_the_engines_request(stream: bool) -> None:
    async def go() -> None:
        engine = SlowEngine()
        async with serve(engine.app()) as url:
            port = free_port()
            router = subprocess.Popen(
                [sys.executable, "-m", "polarkvd", "route", "--engine", url, "--policy", "round-robin",
                 "--port", str(port), "--log-level", "warning"],
                cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                base = f"http://127.0.0.1:{port}"
                async with aiohttp.ClientSession() as http:
                    deadline = time.monotonic() + 60
                    while True:
                        assert router.poll() is None, router.stdout.read() if router.stdout else ""
                        try:
                            async with http.get(base + "/health") as h:
                                if h.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        assert time.monotonic() < deadline, "the router did not come up"
                        await asyncio.sleep(0.2)
                    body = {"prompt": "hello", "max_tokens": 1000, "stream": stream}
                    try:
                        async with http.post(
                            base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=2)
                        ) as r:
                            assert r.status == 200
                            await r.content.readany()  # the first chunk, then the client leaves
                    except asyncio.TimeoutError:
                        assert not stream  # a whole answer: the client gave up waiting
                    await asyncio.wait_for(engine.closed.wait(), 30)  # the engine's request was closed
                    async with http.get(base + "/metrics") as m:
                        assert f'polarkv_route_in_flight{{engine="{url}"}} 0.0' in await m.text()
            finally:
                router.terminate()
                router.wait(30)

    run(go)


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "/v1/completions", "nested too deeply"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": "x"},
            "/v1/chat/completions",
            "chat_template_kwargs",
        ),
    ],
    ids=["deep JSON", "chat_template_kwargs not an object"],
)
def test_a_body_the_router_cannot_use_is_a_400(body: Any, path: str, says: str) -> None:
    async def go() -> None:
        a = FakeEngine("a")
        async with serve(a.app()) as ua, router_over([ua]) as r, aiohttp.ClientSession() as http:
            status, out = await post(http, r, body, path)
            assert status == 400 and says in out["error"]["message"], out
            assert a.prompts == []

    run(go)


def test_many_concurrent_requests_are_all_answered() -> None:
    async def go() -> None:
        a, b = FakeEngine("a"), FakeEngine("b")
        async with (
            serve(a.app()) as ua,
            serve(b.app()) as ub,
            router_over([ua, ub]) as r,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):
            prompts = [[u * 1000 + i for i in range(64)] for u in range(300)]
            got = await asyncio.gather(*(post(http, r, {"prompt": p, "stream": False}) for p in prompts))
            assert all(s == 200 for s, _ in got)
            assert len(a.prompts) + len(b.prompts) == 300

    run(go)
