"""`polarkvd route`'s HTTP side: an OpenAI-compatible front for several engines.

Owns the aiohttp application (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
`/metrics`), the per-request flow (check, tokenize, ask the daemon's `where`, choose with
`route.cost`, forward, retry another engine on a connection error or a read timeout before any byte
reached the client, pass a stream through chunk by chunk) and the router's Prometheus counters.
Every failure is answered in OpenAI's error shape; an engine that fails or hangs never stops the router.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from polarkvd.route.cost import EngineView, Policy, Reason, Weights, choose, prefill_cost
from polarkvd.route.daemon import LOCAL, Found, host_tiers
from polarkvd.route.engines import Engine, EngineSpec, follow_events, poll
from polarkvd.route.prefixes import RouteKeys
from polarkvd.route.requests import BadRequest, Tokenizer, error_body, parse_body

log = logging.getLogger(__name__)

#: (token ids) -> the daemon's `where` answer, or None (no daemon); called in a worker thread. With a
#: `discover()` method (route/daemon.py's DaemonWhere), the engines' hosts come from the cluster.
Where = Callable[[list[int]], "dict[str, Any] | None"]

#: Response header naming the engine that served the request.
ENGINE_HEADER = "X-PolarKV-Engine"
#: Default seconds an engine may stay silent (no byte of its answer) before the router gives up on it:
#: longer than the slowest first token or non-streamed answer a healthy engine gives.
READ_TIMEOUT = 300.0
_CONNECT_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError)
#: Request headers passed to the engine (the rest are hop-by-hop or aiohttp's own to set).
_PASS_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "openai-organization")


def _reader(engine: Engine, attr: str) -> Callable[[], float]:
    return lambda: float(getattr(engine, attr))


#: histogram buckets of the router's latencies, seconds
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)


class RouterMetrics:
    """The router's own series (docs/ROUTING.md lists them), in a registry of its own."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "polarkv_route_decisions",
            "Requests routed, by engine and reason.",
            ["engine", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "polarkv_route_retries",
            "Requests sent to another engine after a connection error.",
            ["engine"],
            registry=r,
        )
        self.errors = Counter(
            "polarkv_route_errors",
            "Errors, by kind (bad_request, no_engine, midstream, internal; where and prefill: the request went on without).",
            ["kind"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "polarkv_route_prompt_tokens", "Prompt tokens routed, by engine.", ["engine"], registry=r
        )
        self.cached_tokens = Counter(
            "polarkv_route_expected_cached_tokens",
            "Prompt tokens the router expected the chosen engine to find cached (its GPU, the host's tiers, the pool).",
            ["engine"],
            registry=r,
        )
        self.prefill = Histogram(
            "polarkv_route_prefill_seconds",
            "Prefill/decode split: from sending a prompt to a prefill engine to its answer (one token), by engine.",
            ["engine"],
            registry=r,
            buckets=SECONDS_BUCKETS,
        )
        self.ttft = Histogram(
            "polarkv_route_first_byte_seconds",
            "From the request's arrival to the engine's first byte, by engine.",
            ["engine"],
            registry=r,
            buckets=SECONDS_BUCKETS,
        )
        self.gauges = (
            (Gauge("polarkv_route_engine_up", "1 while the engine answers.", ["engine"], registry=r), "up"),
            (Gauge("polarkv_route_in_flight", "Requests in flight to the engine.", ["engine"], registry=r), "in_flight"),
            (Gauge(
                "polarkv_route_queued_tokens",
                "Prefill work in flight to the engine, not past the first token: prompt tokens it was expected to compute.",
                ["engine"], registry=r,
            ), "queued_tokens"),
        )  # fmt: skip
        for e in engines:
            self.add(e)

    def add(self, e: Engine) -> None:
        for gauge, attr in self.gauges:
            gauge.labels(e.url).set_function(_reader(e, attr))

    def remove(self, e: Engine) -> None:
        for gauge, _ in self.gauges:
            gauge.remove(e.url)


class Router:
    """The engines, the policy and the HTTP application in front of them."""

    def __init__(
        self,
        engines: Sequence[Engine],
        tokenizer: Tokenizer | None,
        keys: RouteKeys,
        policy: Policy = Policy.AFFINITY,
        weights: Weights | None = None,
        where: Where | None = None,
        poll_interval: float = 1.0,
        prefill: Sequence[Engine] = (),
        discover: bool = False,
        discover_interval: float = 2.0,
        read_timeout: float | None = READ_TIMEOUT,
    ) -> None:
        if not engines and not discover:
            raise ValueError("the router needs at least one engine")
        self.engines = list(engines)  # the engines that answer (with `prefill`: the decode engines)
        self.prefill = list(prefill)  # engines that only prefill, before a decode engine answers
        self.all = self.engines + self.prefill
        self.tokenizer, self.keys, self.policy = tokenizer, keys, policy
        self.weights = weights or Weights()
        self.where = where
        self.poll_interval = poll_interval
        self.metrics = RouterMetrics(self.all)
        self.discover, self.discover_interval = discover, discover_interval
        self.read_timeout = read_timeout  # None: wait for an engine's answer forever
        self.turn = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._discover_failed = False

    # ------------------------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20, middlewares=[self._openai_errors])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout),
            auto_decompress=False,
        )
        self._tasks = [
            asyncio.create_task(poll(self._session, lambda: self.all, self.poll_interval)),
            asyncio.create_task(follow_events(self.all)),
        ]
        if hasattr(self.where, "discover"):
            await self.refresh()  # the engines a daemon already reports serve the first request
            self._tasks.append(asyncio.create_task(self._discovering()))

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        for e in self.all:
            e.close()

    # ------------------------------------------------------------------------------------ discovery

    async def _discovering(self) -> None:
        while True:
            await asyncio.sleep(self.discover_interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Ask the daemon which engines the cluster reports: each known engine's host from it, and
        with discovery the engines added and dropped (listed ones are never dropped). The daemon
        down or refusing: the engines stay as they are, and the failure is logged once."""
        assert self.where is not None
        try:
            found: list[Found] = await asyncio.get_running_loop().run_in_executor(
                None,
                self.where.discover,  # type: ignore[attr-defined]
            )
        except Exception as exc:
            if not self._discover_failed:
                log.warning("cannot ask the daemon for its engines (keeping the ones known): %s", exc)
            self._discover_failed = True
            return
        if self._discover_failed:
            log.info("the daemon answers again: engines found from the cluster")
        self._discover_failed = False
        hosts = {f.url: f.node for f in found}
        for e in self.all:
            if e.url in hosts:
                e.node = hosts[e.url]
        if not self.discover:
            return
        known = {e.url for e in self.all}
        for f in found:
            if f.url not in known:
                e = Engine(EngineSpec(f.url), self.keys)
                e.node, e.discovered = f.node, True
                self.engines.append(e)
                self.metrics.add(e)
                log.info("engine %s found (%s)", f.url, f"on member {f.node}" if f.node else "on this host")
        for e in [e for e in self.engines if e.discovered and e.url not in hosts]:
            self.engines.remove(e)
            self.metrics.remove(e)
            e.close()
            log.info("engine %s no longer reported: not routed to", e.url)
        self.all = self.engines + self.prefill

    @web.middleware
    async def _openai_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Whatever goes wrong in a handler is answered in OpenAI's shape, never as aiohttp's plain
        text page: a route the router lacks (404, 405) as the client's error, anything else as a 500
        that is logged with its traceback."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return web.json_response(error_body(e.reason, e.status), status=e.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("router: %s %s failed", request.method, request.path)
            return self._error(500, "the router failed on this request (see its log)", "internal")

    # ------------------------------------------------------------------------------------- handlers

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        for e in sorted(self.engines, key=lambda e: not e.up):
            try:
                async with self._session.get(
                    e.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)
                ) as r:
                    body = await r.read()
                    return web.Response(body=body, status=r.status, content_type="application/json")
            except _CONNECT_ERRORS:
                e.up = False
        return self._error(503, "no engine is up", "no_engine")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        up = [e.url for e in self.engines if e.up]
        body = {"status": "ok" if up else "no engine up", "engines": {e.url: e.up for e in self.all}}
        return web.json_response(body, status=200 if up else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    def _error(self, status: int, message: str, kind: str, param: str | None = None) -> web.Response:
        self.metrics.errors.labels(kind).inc()
        return web.json_response(error_body(message, status, param=param), status=status)

    # -------------------------------------------------------------------------------- the decision

    async def views(self, tokens: list[int], engines: Sequence[Engine]) -> list[EngineView]:
        """Each engine's view of this prompt: its own cache, the host's tiers (`where`), its load."""
        pt = self.keys.page_tokens
        keys = self.keys.keys(tokens)
        for e in engines:
            if e.events is not None:
                e.events.tick()  # what arrived since the last tick, before judging
        ans = None
        if self.where is not None and len(tokens) >= pt:
            try:
                ans = await asyncio.get_running_loop().run_in_executor(None, self.where, tokens)
            except Exception as exc:  # the daemon down or refusing: route on the engines' caches alone
                log.warning("where failed: %s", exc)
                self.metrics.errors.labels("where").inc()
        # the GPU caches the daemon follows (engines attached to it with their KV events), by URL
        ids = {v.get("url"): k for k, v in (ans or {}).get("engine_load", {}).items() if isinstance(v, dict)}
        followed = (ans or {}).get("engines", {})
        loads = (ans or {}).get("engine_load", {})
        now = time.monotonic()
        views = []
        for e in engines:
            gpu = e.cached_tokens(keys)
            local = e.node == LOCAL and e.url in ids
            held = followed.get(ids[e.url]) if local and e.events is None else None
            if isinstance(held, int):
                gpu = held - held % e.block_tokens
            report = loads.get(ids[e.url]) if local else None
            queued = e.queued(report, now)
            blocks = report.get("gpu_blocks") if isinstance(report, dict) else None
            views.append(
                EngineView(
                    e.url,
                    gpu=gpu,
                    queued_tokens=queued,
                    requests=e.requests(),
                    held=e.held(blocks if isinstance(blocks, int) else None),
                    capacity=e.capacity(),
                    stored=local or e.node != LOCAL,
                    **host_tiers(ans, e.node),
                )  # fmt: skip
            )
        return views

    async def decide(
        self, tokens: list[int], exclude: set[str], among: Sequence[Engine] | None = None
    ) -> tuple[Engine, EngineView, Reason] | None:
        """The engine for this prompt among `among` (default: the answering engines) not in
        `exclude`, up ones first; None when none is left."""
        left = [e for e in (self.engines if among is None else among) if e.url not in exclude]
        up = [e for e in left if e.up]
        pool = up or left  # all marked down: try them anyway (one may be back before the next poll)
        if not pool:
            return None
        views = await self.views(tokens, pool)
        i, reason = choose(self.policy, len(tokens), views, self.weights, self.turn)
        self.turn += 1
        return pool[i], views[i], reason

    # ------------------------------------------------------------------------------------- forward

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        t0 = time.monotonic()
        raw = await request.read()
        try:
            body = parse_body(raw, kind)
            tokens = await self._tokens(body, kind)
        except BadRequest as e:
            return self._error(400, str(e), "bad_request", e.param)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}
        headers["Content-Type"] = "application/json"
        keys = self.keys.keys(tokens)
        if self.prefill:
            await self._prefill(body, tokens, keys, path, headers)
        tried: set[str] = set()
        retry = False
        while True:
            picked = await self.decide(tokens, tried)
            if picked is None:
                return self._error(503, f"no engine is up (tried {', '.join(sorted(tried))})", "no_engine")
            engine, view, reason = picked
            tried.add(engine.url)
            if retry:
                self.metrics.retries.labels(engine.url).inc()
            self.metrics.decisions.labels(engine.url, (Reason.RETRY if retry else reason).value).inc()
            engine.sent.sent(keys)
            engine.in_flight += 1
            work = round(prefill_cost(len(tokens), view, self.weights))  # what it must compute
            queued = engine.queue(work)
            try:
                assert self._session is not None
                try:
                    upstream = await self._session.post(engine.url + path, data=raw, headers=headers)
                except _CONNECT_ERRORS as exc:
                    log.warning("engine %s: %s; trying another", engine.url, exc or type(exc).__name__)
                    engine.up = False
                    retry = True
                    continue
                self.metrics.prompt_tokens.labels(engine.url).inc(len(tokens))
                self.metrics.cached_tokens.labels(engine.url).inc(
                    min(len(tokens), max(view.gpu, view.dram + view.disk, view.pool))
                )
                async with upstream:
                    if not body.get("stream") or upstream.status != 200:
                        data = await self._read_whole(upstream)
                        if data is None:  # nothing reached the client yet: another engine
                            self._gave_up(engine, "closed the connection or stopped answering")
                            retry = True
                            continue
                        self.metrics.ttft.labels(engine.url).observe(time.monotonic() - t0)
                        ctype = upstream.headers.get("Content-Type", "application/json")
                        return web.Response(
                            body=data,
                            status=upstream.status,
                            headers={"Content-Type": ctype, ENGINE_HEADER: engine.url},
                        )
                    # the client's headers wait for the engine's first byte: an engine that fails
                    # or stays silent before it is replaced by another, unseen by the client
                    resp: web.StreamResponse | None = None
                    try:
                        async for chunk in upstream.content.iter_any():
                            if resp is None:
                                self.metrics.ttft.labels(engine.url).observe(time.monotonic() - t0)
                                engine.unqueue(queued)
                                resp = await self._open_stream(request, engine)
                            await resp.write(chunk)
                    except (aiohttp.ClientPayloadError, *_CONNECT_ERRORS) as exc:
                        if resp is None:
                            self._gave_up(
                                engine, f"failed before its first byte ({exc or type(exc).__name__})"
                            )
                            retry = True
                            continue
                        if request.transport is None or request.transport.is_closing():
                            return resp  # the client left: nothing to tell it
                        what = "stopped answering" if isinstance(exc, asyncio.TimeoutError) else "failed"
                        log.warning(
                            "engine %s %s mid-stream: %s", engine.url, what, exc or type(exc).__name__
                        )
                        self.metrics.errors.labels("midstream").inc()
                        err = error_body(f"engine {engine.url} {what} mid-stream", 502)
                        await resp.write(b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
                    if resp is None:  # an empty stream: passed on as it came
                        resp = await self._open_stream(request, engine)
                    await resp.write_eof()
                    return resp
            finally:
                engine.in_flight -= 1
                engine.unqueue(queued)

    async def _prefill(
        self, body: dict[str, Any], tokens: list[int], keys: list[bytes], path: str, headers: dict[str, str]
    ) -> None:
        """The prompt computed on a prefill engine (one token generated, its KV stored through
        polarkvd's connector) before a decode engine answers it. A prefill that fails is logged and
        counted; the decode engine then computes the prompt itself."""
        assert self._session is not None
        one = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n", "best_of")}
        one.update(max_tokens=1, stream=False)
        if "max_completion_tokens" in body:
            one["max_completion_tokens"] = 1
        data = json.dumps(one).encode()
        tried: set[str] = set()
        while True:
            picked = await self.decide(tokens, tried, self.prefill)
            if picked is None:
                self.metrics.errors.labels("prefill").inc()
                log.warning(
                    "no prefill engine answered (tried %s): decoding without", ", ".join(sorted(tried))
                )
                return
            engine, view, _ = picked
            tried.add(engine.url)
            self.metrics.decisions.labels(engine.url, "prefill").inc()
            engine.sent.sent(keys)
            engine.in_flight += 1
            queued = engine.queue(round(prefill_cost(len(tokens), view, self.weights)))
            t0 = time.monotonic()
            try:
                async with self._session.post(engine.url + path, data=data, headers=headers) as r:
                    await r.read()
                    self.metrics.prefill.labels(engine.url).observe(time.monotonic() - t0)
                    if r.status != 200:
                        self.metrics.errors.labels("prefill").inc()
                        log.warning("prefill engine %s answered %d: decoding without", engine.url, r.status)
                    self.metrics.prompt_tokens.labels(engine.url).inc(len(tokens))
                    return
            except (aiohttp.ClientPayloadError, *_CONNECT_ERRORS) as exc:
                log.warning("prefill engine %s: %s; trying another", engine.url, exc or type(exc).__name__)
                engine.up = False
            finally:
                engine.in_flight -= 1
                engine.unqueue(queued)

    def _gave_up(self, engine: Engine, what: str) -> None:
        """An engine that failed a request before the client saw a byte: marked down (until its
        /metrics answers again), the request to go to another."""
        log.warning("engine %s %s; trying another", engine.url, what)
        engine.up = False

    @staticmethod
    async def _open_stream(request: web.Request, engine: Engine) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                ENGINE_HEADER: engine.url,
            },
        )
        await resp.prepare(request)
        return resp

    @staticmethod
    async def _read_whole(upstream: aiohttp.ClientResponse) -> bytes | None:
        try:
            return await upstream.read()
        except (aiohttp.ClientPayloadError, *_CONNECT_ERRORS):
            return None

    async def _tokens(self, body: dict[str, Any], kind: str) -> list[int]:
        p = body.get("prompt") if kind == "completions" else None
        if isinstance(p, list) and p and isinstance(p[0], (int, list)):  # token ids: nothing to tokenize
            return [int(t) for t in (p[0] if isinstance(p[0], list) else p)]
        if self.tokenizer is None:  # round-robin / least-loaded without a model: no tokens needed
            return []
        fn = self.tokenizer.chat if kind == "chat" else self.tokenizer.completion
        return await asyncio.get_running_loop().run_in_executor(None, fn, body)
