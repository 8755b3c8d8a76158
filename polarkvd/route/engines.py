"""The engines behind the router: how each is named on the command line, and what the router tracks
of it (up or down, work in flight, its own load, its prefix cache).

Owns `EngineSpec` (`URL [events=ENDPOINT] [replay=ENDPOINT] [topic=TOPIC]`), `Engine` (state the
server updates around each request) and the background poll of each engine's `/metrics`. An engine's
KV events are followed with the daemon's own subscriber (`server/engine_events.py`), ticked on the
router's loop; must not block the loop (every call here is non-blocking or awaited).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp

from polarkvd.errors import ProtocolError
from polarkvd.route.daemon import LOCAL
from polarkvd.route.prefixes import RouteKeys, SentPrefixes
from polarkvd.server.engine_events import EngineEventsSubscriber, GpuPrefixes, parse_spec

log = logging.getLogger(__name__)

#: A busy engine's load report younger than this stands for its queued prefill (the vLLM connector
#: reports every 0.25 s while its load changes, and once more when it runs out of work).
REPORT_FRESH_SECONDS = 1.0
_METRIC = re.compile(r"^(vllm:num_requests_(?:running|waiting))(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$")
_BLOCK_SIZE = re.compile(r'^vllm:cache_config_info\{.*\bblock_size="(\d+)"')
_NUM_BLOCKS = re.compile(r'^vllm:cache_config_info\{.*\bnum_gpu_blocks="(\d+)"')


class EngineMetrics(NamedTuple):
    """What the router reads from an engine's /metrics."""

    running: int
    waiting: int
    block_tokens: int | None  # its KV block size (None: not named)
    blocks: int | None  # KV blocks its cache has (vLLM's `num_gpu_blocks`; None: not named)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    url: str
    events: str | None = None
    replay: str | None = None
    topic: str = ""

    @classmethod
    def parse(cls, words: Sequence[str]) -> EngineSpec:
        """`["http://host:8000", "events=tcp://host:5557", "replay=tcp://host:5558", "topic=kv"]`;
        raises ValueError with what is wrong."""
        if not words:
            raise ValueError("--engine needs a URL")
        url = words[0].rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"engine URL must be http://HOST:PORT (the engine's OpenAI server), got {words[0]!r}"
            )
        opts: dict[str, str] = {}
        for w in words[1:]:
            name, sep, value = w.partition("=")
            if not sep or name not in ("events", "replay", "topic") or name in opts:
                raise ValueError(
                    f"after the engine URL {url}: events=ENDPOINT, replay=ENDPOINT, topic=TOPIC (each once), got {w!r}"
                )
            opts[name] = value
        if "events" not in opts and ("replay" in opts or "topic" in opts):
            raise ValueError(f"engine {url}: replay= and topic= need events=")
        if "events" not in opts:
            return cls(url)
        spec: dict[str, Any] = {"endpoint": opts["events"], "topic": opts.get("topic", "")}
        if "replay" in opts:
            spec["replay_endpoint"] = opts["replay"]
        try:
            endpoint, replay, topic = parse_spec(spec)
        except ProtocolError as e:
            raise ValueError(f"engine {url}: {e}") from None
        return cls(url, endpoint, replay, topic)


class Engine:
    """One engine as the router sees it."""

    def __init__(self, spec: EngineSpec, keys: RouteKeys, sent_capacity: int = 1 << 16) -> None:
        self.spec, self.url = spec, spec.url
        self.up = True  # until a poll or a request says otherwise
        self.in_flight = 0  # requests the router has sent and not seen end
        self.queued_tokens = 0  # prefill work of those not past their first token: tokens not cached
        self._queued: dict[object, tuple[float, int]] = {}  # each of those: (sent at, its work)
        self.running = self.waiting = 0  # the engine's own counts (its /metrics), when it has them
        self.others = 0  # of those, requests the router did not send (other clients), at the last poll
        self.metrics_at = 0.0  # monotonic time of the last good poll (0: never)
        self.sent = SentPrefixes(sent_capacity)
        self.page_tokens = keys.page_tokens
        self.block_tokens = keys.page_tokens  # the engine's block size, once its /metrics names it
        self.blocks: int | None = None  # the blocks its KV cache has, once its /metrics names them
        self.node = LOCAL  # its host: the daemon's (as assumed until a daemon reports it), or a member's
        self.discovered = False  # found from the cluster (not listed): dropped when no daemon reports it
        self.gpu: GpuPrefixes | None = None
        self.events: EngineEventsSubscriber | None = None
        if spec.events is not None:
            self.gpu = GpuPrefixes(keys.digest, keys.page_tokens)
            self.events = EngineEventsSubscriber(spec.events, spec.replay, self.gpu, spec.topic)

    def cached_tokens(self, keys: Sequence[bytes]) -> int:
        """Leading tokens of the prompt of `keys` the engine's own cache can serve: from its events
        when the router follows them, else from what the router sent it; in whole engine blocks
        (vLLM hits nothing shorter than one: 16 tokens on GPUs, 128 on its CPU build)."""
        pages = self.gpu.leading(keys) if self.gpu is not None else self.sent.leading(keys)
        tokens = pages * self.page_tokens
        return tokens - tokens % self.block_tokens

    def capacity(self) -> int | None:
        """Tokens its KV cache can hold: its blocks as its /metrics names them, less vLLM's null
        block; None while unknown."""
        return None if self.blocks is None else (self.blocks - 1) * self.block_tokens

    def held(self, blocks: int | None = None) -> int:
        """Tokens its cache holds: the blocks holding cached prefixes (its events, else `blocks` as
        its daemon follows them, else what the router sent it), and those the prefills in flight
        to it will fill."""
        b = self.block_tokens
        if self.gpu is not None:
            blocks = self.gpu.blocks
        elif blocks is None:
            blocks = -(-len(self.sent) * self.page_tokens // b)
        return (blocks + -(-self.queued_tokens // b)) * b

    def queue(self, work: int, at: float | None = None) -> object:
        """A request with `work` prefill tokens sent to the engine (now, or at monotonic time `at`);
        `unqueue` the handle at its first token (or its end)."""
        handle = object()
        self._queued[handle] = (time.monotonic() if at is None else at, work)
        self.queued_tokens += work
        return handle

    def unqueue(self, handle: object) -> None:
        got = self._queued.pop(handle, None)
        if got is not None:
            self.queued_tokens -= got[1]

    def queued(self, report: Any, now: float) -> int:
        """Prefill tokens the engine has yet to compute. With a fresh load report of its connector
        (`where`'s `engine_load`: the engine's own count, which follows each prefill's progress and
        includes other clients' requests), that count plus the work the router sent it since the
        report; else the router's own count of the work it sent and has not seen start answering."""
        if not isinstance(report, dict):
            return self.queued_tokens
        age, reported = report.get("age_s"), report.get("queued_prefill_tokens")
        if not isinstance(age, (int, float)) or not isinstance(reported, int) or report.get("stale"):
            return self.queued_tokens
        busy = report.get("running") or report.get("waiting")
        if busy and age > REPORT_FRESH_SECONDS:  # an idle engine reports once, when it runs out of work
            return self.queued_tokens
        since = now - age
        return reported + sum(w for at, w in self._queued.values() if at > since)

    def requests(self) -> int:
        """Requests on the engine: the router's in flight now, plus those of other clients as its
        last poll saw them (its own count less the router's then: a poll is up to an interval old,
        and the router's own requests may have ended since)."""
        return self.in_flight + self.others

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def parse_metrics(text: str) -> EngineMetrics:
    """vLLM's running and waiting request counts (summed over labels), its KV block size and its
    number of KV blocks from its Prometheus text."""
    got = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    block: int | None = None
    blocks: int | None = None
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            got[m.group(1)] += float(m.group(2))
        elif line.startswith("vllm:cache_config_info"):
            b = _BLOCK_SIZE.match(line)
            block = int(b.group(1)) if b and int(b.group(1)) > 0 else block
            n = _NUM_BLOCKS.match(line)
            blocks = int(n.group(1)) if n and int(n.group(1)) > 1 else blocks
    running, waiting = int(got["vllm:num_requests_running"]), int(got["vllm:num_requests_waiting"])
    return EngineMetrics(running, waiting, block, blocks)


async def poll(
    session: aiohttp.ClientSession, engines: Callable[[], Sequence[Engine]], interval: float
) -> None:
    """Forever: every `interval` seconds each engine's /metrics (up or down, and its load); the
    engines as `engines()` lists them then (discovery changes them)."""
    timeout = aiohttp.ClientTimeout(total=max(1.0, interval * 2))

    async def one(e: Engine) -> None:
        try:
            async with session.get(e.url + "/metrics", timeout=timeout) as r:
                text = await r.text() if r.status == 200 else ""
            if not e.up:
                log.info("engine %s is up", e.url)
            e.up = True
            if text:
                got = parse_metrics(text)
                e.running, e.waiting = got.running, got.waiting
                e.block_tokens = got.block_tokens or e.block_tokens
                e.blocks = got.blocks or e.blocks
                e.others = max(0, e.running + e.waiting - e.in_flight)
                e.metrics_at = time.monotonic()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            if e.up:
                log.warning("engine %s does not answer its /metrics: marked down", e.url)
            e.up = False
            e.metrics_at = 0.0
            e.others = 0

    while True:
        await asyncio.gather(*(one(e) for e in engines()))
        await asyncio.sleep(interval)


async def follow_events(engines: Sequence[Engine], interval: float = 0.02) -> None:
    """Forever: apply what each followed engine's publisher sent (non-blocking ticks)."""
    followed = [e.events for e in engines if e.events is not None]
    if not followed:
        return
    while True:
        for sub in followed:
            try:
                sub.tick()  # a malformed batch is counted by the tracker, not raised
            except Exception:  # a socket error: keep routing (on what was sent) and say so
                log.exception("following KV events failed")
        await asyncio.sleep(interval)
