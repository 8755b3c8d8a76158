"""The router's read timeout: an engine that accepts the connection and never answers (a real
listening socket nobody reads) is given up after `read_timeout`, its request answered by another
engine when nothing reached the client yet, else the stream ends with an OpenAI-style error."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
import pytest

from polarkvd.cli import main as cli_main
from polarkvd.route.cost import Policy
from polarkvd.route.engines import Engine, EngineSpec
from polarkvd.route.prefixes import RouteKeys
from polarkvd.route.server import Router
from tests.route.test_server import FakeEngine, serve

pytestmark = pytest.mark.timeout(60)


@contextmanager
def silent_engine() -> Iterator[str]:
    """A socket that listens (the kernel accepts connections into its backlog) and never reads or
    writes a byte: an engine hung after accepting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@asynccontextmanager
async def router_over(urls: list[str], read_timeout: float) -> AsyncIterator[str]:
    keys = RouteKeys("fake")
    # round-robin: the first request goes to the first engine listed (the silent one); a long poll
    # interval, so that only the request itself finds the engine silent
    router = Router(
        [Engine(EngineSpec(u), keys) for u in urls], None, keys, Policy.ROUND_ROBIN,
        poll_interval=30, read_timeout=read_timeout,
    )  # fmt: skip
    async with serve(router.app()) as url:
        yield url


async def metric(http: aiohttp.ClientSession, url: str, line: str) -> bool:
    async with http.get(url + "/metrics") as m:
        return line in await m.text()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_to_a_silent_engine_is_answered_by_another(stream: bool) -> None:
    async def go() -> None:
        ok = FakeEngine("ok")
        with silent_engine() as hung:
            async with (
                serve(ok.app()) as good,
                router_over([hung, good], read_timeout=0.5) as r,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
            ):
                body = {"model": "fake", "prompt": [1, 2, 3], "stream": stream}
                async with http.post(r + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    assert resp.headers["X-PolarKV-Engine"] == good
                    text = await resp.text()
                assert '"engine": "ok"' in text or '"engine":"ok"' in text
                assert len(ok.prompts) == 1
                assert await metric(http, r, f'polarkv_route_retries_total{{engine="{good}"}} 1.0')
                # the silent engine is marked down: the next request goes straight to the other
                async with http.post(r + "/v1/completions", json=body) as resp:
                    assert resp.status == 200 and resp.headers["X-PolarKV-Engine"] == good
                async with http.get(r + "/health") as h:
                    assert (await h.json())["engines"] == {hung: False, good: True}

    asyncio.run(go())


def test_an_engine_silent_mid_stream_ends_the_stream_with_an_error() -> None:
    async def go() -> None:
        stalls = FakeEngine("stalls", chunks=3)
        stalls.gate = asyncio.Queue()
        stalls.gate.put_nowait(None)  # one chunk, then silence
        async with (
            serve(stalls.app()) as u,
            router_over([u], read_timeout=0.5) as r,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
        ):
            body = {"model": "fake", "prompt": [1, 2, 3], "stream": True}
            async with http.post(r + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                events = [e for e in (await resp.text()).split("\n\n") if e]
            assert json.loads(events[0].removeprefix("data: "))["i"] == 0
            err = json.loads(events[1].removeprefix("data: "))["error"]
            assert "stopped answering" in err["message"] and err["code"] == 502
            assert events[2] == "data: [DONE]"
            assert await metric(http, r, 'polarkv_route_errors_total{kind="midstream"} 1.0')
            # the router serves on
            async with http.get(r + "/health") as h:
                assert h.status == 200
            for _ in range(stalls.chunks):  # the engine's handler ends, so its server can stop
                stalls.gate.put_nowait(None)

    asyncio.run(go())


def test_a_bad_read_timeout_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("-1", "nan", "inf"):
        assert cli_main(["route", "--engine", "http://127.0.0.1:1", "--read-timeout", bad]) == 2
        assert "--read-timeout" in capsys.readouterr().err
