"""The router's HTTP side against small aiohttp engines on real sockets (stand-ins where no real
engine is needed: what is tested is routing, forwarding and failure answers; tests/vllm/test_route.py
runs it in front of real vLLM servers)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from polarkvd.cli import main as cli_main
from polarkvd.route.cost import Policy
from polarkvd.route.engines import Engine, EngineSpec, parse_metrics, poll
from polarkvd.route.prefixes import RouteKeys
from polarkvd.route.server import Router

pytestmark = pytest.mark.timeout(60)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class FakeEngine:
    """An OpenAI-shaped engine: answers with its name; streams `chunks` SSE events, each after the
    test releases it when `gate` is set; with `die_after`, drops the connection after that many."""

    def __init__(self, name: str, chunks: int = 3, die_after: int | None = None) -> None:
        self.name, self.chunks, self.die_after = name, chunks, die_after
        self.prompts: list[Any] = []
        self.running = 0  # what its /metrics reports
        self.gate: asyncio.Queue[None] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "root": "fake"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f'vllm:num_requests_running{{model_name="fake"}} {self.running}.0\n')

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.prompts.append(body.get("prompt", body.get("messages")))
        if not body.get("stream"):
            return web.json_response(
                {"object": "text_completion", "engine": self.name, "choices": [{"text": "x"}]}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.chunks):
            if self.die_after is not None and i == self.die_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if self.gate is not None:
                await self.gate.get()
            await resp.write(f"data: {json.dumps({'engine': self.name, 'i': i})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def router_over(
    urls: list[str], policy: Policy = Policy.AFFINITY, poll_interval: float = 0.2
) -> AsyncIterator[str]:
    keys = RouteKeys("fake")
    router = Router(
        [Engine(EngineSpec(u), keys) for u in urls], None, keys, policy, poll_interval=poll_interval
    )
    async with serve(router.app()) as url:
        yield url


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, path: str = "/v1/completions"
) -> tuple[int, Any]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with http.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


def test_each_users_follow_ups_go_to_the_engine_that_got_its_history() -> None:
    async def go() -> None:
        a, b = FakeEngine("a"), FakeEngine("b")
        async with (
            serve(a.app()) as ua,
            serve(b.app()) as ub,
            router_over([ua, ub]) as r,
            aiohttp.ClientSession() as http,
        ):
            histories = {u: [u * 1000 + i for i in range(64)] for u in range(1, 5)}
            first = {}
            for u, h in histories.items():
                _, out = await post(http, r, {"model": "fake", "prompt": h, "max_tokens": 1})
                first[u] = out["engine"]
            assert set(first.values()) == {"a", "b"}  # cold users spread over both
            async with http.post(r + "/v1/completions", json={"prompt": histories[1]}) as resp:
                assert resp.headers["X-PolarKV-Engine"] == {"a": ua, "b": ub}[first[1]]
            for turn in range(3):
                for u in histories:
                    histories[u] += [u * 1000 + 100 + turn * 40 + i for i in range(40)]
                    _, out = await post(http, r, {"model": "fake", "prompt": histories[u], "max_tokens": 1})
                    assert out["engine"] == first[u], f"user {u}'s turn {turn + 2} went elsewhere"
            async with http.get(r + "/metrics") as m:
                text = await m.text()
            assert f'polarkv_route_decisions_total{{engine="{ua}",reason="affinity"}}' in text

    run(go)


def test_round_robin_alternates_whatever_is_cached() -> None:
    async def go() -> None:
        a, b = FakeEngine("a"), FakeEngine("b")
        async with (
            serve(a.app()) as ua,
            serve(b.app()) as ub,
            router_over([ua, ub], Policy.ROUND_ROBIN) as r,
            aiohttp.ClientSession() as http,
        ):
            got = [(await post(http, r, {"prompt": list(range(64))}))[1]["engine"] for _ in range(4)]
            assert got == ["a", "b", "a", "b"]

    run(go)


def test_no_engine_up_is_a_503_in_openais_shape() -> None:
    async def go() -> None:
        async with router_over([closed_port_url(), closed_port_url()]) as r, aiohttp.ClientSession() as http:
            status, out = await post(http, r, {"prompt": "hello"})
            assert status == 503
            assert out["error"]["code"] == 503 and "no engine is up" in out["error"]["message"]
            async with http.get(r + "/health") as h:
                assert h.status == 503
            async with http.get(r + "/v1/models") as m:
                assert m.status == 503 and "error" in await m.json()

    run(go)


def test_a_refused_connection_is_retried_on_another_engine() -> None:
    async def go() -> None:
        a, b = FakeEngine("a"), FakeEngine("b")
        runner_a = web.AppRunner(a.app())
        await runner_a.setup()
        site = web.TCPSite(runner_a, "127.0.0.1", 0)
        await site.start()
        ua = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        # the router polls each engine at its start (both up), then not for a minute
        async with (
            serve(b.app()) as ub,
            router_over([ua, ub], Policy.ROUND_ROBIN, 60) as r,
            aiohttp.ClientSession() as http,
        ):
            assert (await post(http, r, {"prompt": [1]}))[1]["engine"] == "a"
            await runner_a.cleanup()  # engine a is gone: the router learns it from the refusal
            for _ in range(4):
                status, out = await post(http, r, {"prompt": list(range(40)), "max_tokens": 1})
                assert status == 200 and out["engine"] == "b"
            async with http.get(r + "/metrics") as m:
                text = await m.text()
            assert f'polarkv_route_retries_total{{engine="{ub}"}} 1.0' in text
            async with http.get(r + "/health") as h:
                assert h.status == 200 and (await h.json())["engines"] == {ua: False, ub: True}

    run(go)


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        (b"{not json", "/v1/completions", "not valid JSON"),
        (b"[1, 2]", "/v1/completions", "JSON object"),
        ({"model": "fake"}, "/v1/completions", "prompt"),
        ({"prompt": [1, "a"]}, "/v1/completions", "prompt"),
        ({"prompt": [1, -2, 3]}, "/v1/completions", "token ids"),
        ({"prompt": [[1 << 40], [1, 2]]}, "/v1/completions", "token ids"),
        ({"prompt": [True, False]}, "/v1/completions", "prompt"),
        ({"prompt": "hi", "stream": "yes"}, "/v1/completions", "stream"),
        ({"messages": "hi"}, "/v1/chat/completions", "messages"),
        ({"messages": [{"content": "hi"}]}, "/v1/chat/completions", "role"),
    ],
)
def test_a_bad_request_is_a_400_and_reaches_no_engine(body: Any, path: str, says: str) -> None:
    async def go() -> None:
        a = FakeEngine("a")
        async with serve(a.app()) as ua, router_over([ua]) as r, aiohttp.ClientSession() as http:
            status, out = await post(http, r, body, path)
            assert (
                status == 400
                and out["error"]["type"] == "BadRequestError"
                and says in out["error"]["message"]
            )
            assert a.prompts == []
            status, _ = await post(http, r, {"prompt": [1, 2, 3]})  # and it keeps serving
            assert status == 200

    run(go)


def test_an_unknown_path_or_method_is_answered_in_openais_shape() -> None:
    async def go() -> None:
        a = FakeEngine("a")
        async with serve(a.app()) as ua, router_over([ua]) as r, aiohttp.ClientSession() as http:
            async with http.get(r + "/v1/nope") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["type"] == "NotFoundError"
            async with http.get(r + "/v1/completions") as resp:
                assert resp.status == 405 and (await resp.json())["error"]["code"] == 405
            status, _ = await post(http, r, {"prompt": [1, 2, 3]})
            assert status == 200

    run(go)


def test_a_stream_is_passed_through_as_each_chunk_arrives() -> None:
    async def go() -> None:
        a = FakeEngine("a", chunks=3)
        a.gate = asyncio.Queue()
        async with serve(a.app()) as ua, router_over([ua]) as r, aiohttp.ClientSession() as http:
            a.gate.put_nowait(None)  # the engine may write chunk 0 (the router answers at its first byte)
            async with http.post(r + "/v1/completions", json={"prompt": [1, 2], "stream": True}) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                for i in range(3):
                    if i:
                        a.gate.put_nowait(None)  # the engine may write chunk i, and not the next
                    line = await asyncio.wait_for(resp.content.readline(), 5)
                    assert json.loads(line.removeprefix(b"data: ")) == {"engine": "a", "i": i}
                    assert await resp.content.readline() == b"\n"
                assert (await resp.content.read()).strip() == b"data: [DONE]"

    run(go)


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_and_the_router_serves_on() -> None:
    async def go() -> None:
        dying, ok = FakeEngine("dying", chunks=5, die_after=2), FakeEngine("ok")
        async with (
            serve(dying.app()) as ud,
            serve(ok.app()) as uo,
            router_over([ud, uo], Policy.ROUND_ROBIN) as r,
            aiohttp.ClientSession() as http,
        ):
            async with http.post(r + "/v1/completions", json={"prompt": [1, 2], "stream": True}) as resp:
                text = (await resp.content.read()).decode()
            events = [e.removeprefix("data: ") for e in text.strip().split("\n\n")]
            assert [json.loads(e)["i"] for e in events[:2]] == [0, 1]
            assert "failed mid-stream" in json.loads(events[2])["error"]["message"]
            assert events[3] == "[DONE]"
            status, out = await post(http, r, {"prompt": [1, 2]})
            assert status == 200 and out["engine"] == "ok"
            async with http.get(r + "/metrics") as m:
                assert 'polarkv_route_errors_total{kind="midstream"} 1.0' in await m.text()

    run(go)


def test_engine_specs_and_metrics_are_read_strictly() -> None:
    s = EngineSpec.parse(["http://h:8001/", "events=tcp://*:5557", "replay=tcp://*:5558", "topic=kv"])
    assert s == EngineSpec("http://h:8001", "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "kv")
    for bad, says in [
        (["ftp://h"], "http://HOST:PORT"),
        (["http://h:1", "events"], "events=ENDPOINT"),
        (["http://h:1", "replay=tcp://h:2"], "need events="),
        (["http://h:1", "events=udp://h:2"], "tcp:// or ipc://"),
    ]:
        with pytest.raises(ValueError, match=says):
            EngineSpec.parse(bad)
    text = 'vllm:num_requests_running{a="1"} 2.0\nvllm:num_requests_waiting{a="1"} 3.0\n# HELP x\nvllm:num_requests_waiting{a="2"} 1\n'
    assert parse_metrics(text) == (2, 4, None, None)
    info = 'vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0",num_gpu_blocks="28"} 1.0\n'
    assert parse_metrics(text + info) == (2, 4, 128, 28)


def test_queued_prefill_follows_the_engines_own_report_when_fresh() -> None:
    e = Engine(EngineSpec("http://127.0.0.1:1"), RouteKeys("fake"))
    first = e.queue(600, at=100.0)  # a cold prompt sent at t=100
    assert e.queued(None, 101.0) == 600  # no report: what the router sent and saw no token of
    e.queue(50, at=100.8)  # a follow-up sent after the engine's report below
    report = {"running": 1, "waiting": 1, "queued_prefill_tokens": 200, "age_s": 0.5, "stale": False}
    # the engine says 200 tokens are left at t=100.5 (its prefill progressed); the follow-up is new
    assert e.queued(report, 101.0) == 250
    assert e.queued({**report, "age_s": 5.0}, 101.0) == 650  # too old while busy: the router's count
    assert e.queued({**report, "stale": True}, 101.0) == 650
    idle = {"running": 0, "waiting": 0, "queued_prefill_tokens": 0, "age_s": 30.0, "stale": False}
    assert e.queued(idle, 101.0) == 650  # idle since long before both were sent
    e.unqueue(first)
    e.unqueue(first)  # twice is harmless (a stream's first token, then its end)
    assert e.queued(None, 101.0) == 50


def test_the_command_line_refuses_bad_options_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["route", "--engine", "ftp://nowhere"]) == 2
    assert "http://HOST:PORT" in capsys.readouterr().err
    u = closed_port_url()
    assert cli_main(["route", "--engine", u]) == 2  # affinity needs the model; no engine names it
    assert "--model" in capsys.readouterr().err
    assert cli_main(["route", "--engine", u, "--engine", u, "--policy", "round-robin"]) == 2
    assert "twice" in capsys.readouterr().err
    assert cli_main(["route"]) == 2  # no engine, and no daemon to find them from
    assert "--daemon SOCKET" in capsys.readouterr().err
    assert cli_main(["route", "--daemon", "/nonexistent/control.sock", "--discover-interval", "0"]) == 2
    assert "--discover-interval" in capsys.readouterr().err


def test_a_split_router_prefills_on_a_prefill_engine_then_answers_from_a_decode_engine() -> None:
    async def go() -> None:
        pre, dec = FakeEngine("prefill"), FakeEngine("decode")
        bodies: list[tuple[str, dict[str, Any]]] = []
        for e in (pre, dec):
            orig = e.complete

            async def spy(request: web.Request, e: FakeEngine = e, orig: Any = orig) -> web.StreamResponse:
                bodies.append((e.name, await request.json()))
                return await orig(request)

            e.complete = spy  # type: ignore[method-assign]
        async with serve(pre.app()) as up, serve(dec.app()) as ud:
            keys = RouteKeys("fake")
            router = Router(
                [Engine(EngineSpec(ud), keys)], None, keys, prefill=[Engine(EngineSpec(up), keys)]
            )
            async with serve(router.app()) as r, aiohttp.ClientSession() as http:
                req = {
                    "prompt": [5] * 40,
                    "max_tokens": 30,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                async with http.post(r + "/v1/completions", json=req) as resp:
                    text = await resp.text()
                    assert resp.headers["X-PolarKV-Engine"] == ud
                async with http.get(r + "/metrics") as resp:  # the prefill's time, by prefill engine
                    assert f'polarkv_route_prefill_seconds_count{{engine="{up}"}} 1.0' in await resp.text()
        assert [name for name, _ in bodies] == ["prefill", "decode"]
        assert bodies[0][1] == {"prompt": [5] * 40, "max_tokens": 1, "stream": False}
        assert bodies[1][1] == req and '"engine": "decode"' in text

    run(go)


def test_an_engines_load_is_the_routers_in_flight_plus_other_clients_requests() -> None:
    async def go() -> None:
        a = FakeEngine("a")
        async with serve(a.app()) as ua, aiohttp.ClientSession() as http:
            e = Engine(EngineSpec(ua), RouteKeys("fake"))
            a.running, e.in_flight = 3, 1  # the router's one, and two of other clients
            task = asyncio.create_task(poll(http, lambda: [e], 60))
            for _ in range(100):
                if e.metrics_at:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            assert e.up and e.others == 2 and e.requests() == 3
            e.in_flight = 0  # the router's request ended after the poll: not counted still
            assert e.requests() == 2

    run(go)


def test_a_hit_counts_in_whole_engine_blocks() -> None:
    keys = RouteKeys("fake")
    e = Engine(EngineSpec("http://127.0.0.1:1"), keys)
    prompt = keys.keys(list(range(300)))  # 18 pages of 16
    e.sent.sent(prompt)
    assert e.cached_tokens(prompt) == 288
    e.block_tokens = 128  # vLLM's CPU build: a shorter shared prefix (a chat template's) hits nothing
    assert e.cached_tokens(prompt) == 256
    assert e.cached_tokens(prompt[:7]) == 0
