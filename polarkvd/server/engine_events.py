"""Events in: an engine's own GPU prefix cache, followed through vLLM's KV event stream.

Owns, per engine, the translation of vLLM's `BlockStored` / `BlockRemoved` / `AllBlocksCleared`
(vllm/distributed/kv_events.py) into polarkvd page keys of the engine's namespace (`GpuPrefixes`,
pure), and the subscriber that feeds it (`EngineEventsSubscriber`: SUB to the engine's publisher,
replay through its ROUTER after a gap in the sequence numbers, non-blocking, driven by `tick` on the
loop). Must not block the loop or trust the stream: a malformed message is counted and dropped.

vLLM's block hashes are not polarkvd keys; a `BlockStored` carries the block's token ids and its
parent's hash, so the keys are chained from the parent's (`keys.page_keys`): a vLLM block of any size
ends pages of `page_tokens` as its tokens complete them (a block may end none, one or several).
Blocks whose parent is unknown here (stored before we subscribed and not replayed), of another KV
cache group, with extra keys (cache salt, LoRA, multimodal: another namespace than the engine's
default one) or on another medium than the GPU are skipped and counted. docs/ROUTING.md.

Also keeps each engine's last reported load (`EngineLoad`: running and waiting requests, queued
prefill tokens, its served URL), for `where`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq

from polarkvd.errors import ProtocolError
from polarkvd.keys import ROOT_KEY, page_keys

log = logging.getLogger(__name__)

_END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Blocks followed per engine (a vLLM GPU cache holds tens of thousands): past it an engine's further
#: stores are skipped and counted, so a runaway or hostile publisher cannot grow the daemon's memory.
MAX_BLOCKS = 1 << 20
#: Largest event message taken from an engine's publisher (ZeroMQ drops a larger one unread).
MAX_MESSAGE_BYTES = 16 << 20
#: Arrays and maps one message may decode to (a vLLM event holds a few): past it the message is bad.
#: 16 MiB of empty msgpack arrays would otherwise be 16M Python lists, over a GB and a second of loop.
MAX_CONTAINERS = 1 << 20
#: The loop's time for one tick of one subscriber; what is left waits for the next tick.
TICK_SECONDS = 0.01
#: Live batches kept back while a replay runs; past it the replay is given up (what it did not bring
#: is counted lost), so a publisher that never ends its replay cannot grow the daemon's memory.
MAX_HELD_BACK = 4096
#: A replay not ended within this many seconds is given up too (a replay socket nobody answers).
REPLAY_TIMEOUT = 5.0
#: A load report older than this that still says the engine has work is marked stale in `where`
#: (an engine reports while it schedules, and once more when it runs out of work; an idle one is silent).
LOAD_STALE_SECONDS = 5.0
MAX_LOAD_COUNT = 1 << 20
MAX_URL = 512
#: Bytes of engine URLs a daemon publishes in its gossip metadata (which is at most 1 KiB, with its
#: tiers' space); engines past it are left out of the cluster's view, with a warning.
GOSSIP_URL_BYTES = 480
#: Hex digits of the namespace digest published beside each engine URL (tells models apart).
GOSSIP_NS_HEX = 8


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """One engine's load as its connector counts it (docs/VLLM.md says how exact it is)."""

    running: int
    waiting: int
    queued_prefill_tokens: int
    url: str = ""

    @classmethod
    def from_wire(cls, args: dict[str, Any]) -> EngineLoad:
        """The `report_load` op's arguments, checked: a bad one raises ProtocolError naming it."""
        values = {}
        for name, limit in (
            ("running", MAX_LOAD_COUNT),
            ("waiting", MAX_LOAD_COUNT),
            ("queued_prefill_tokens", 1 << 40),
        ):
            v = args.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit:
                raise ProtocolError(f"{name} must be an integer from 0 to {limit}")
            values[name] = v
        url = args.get("url", "")
        if not isinstance(url, str) or len(url) > MAX_URL:
            raise ProtocolError(f"url must be a string of at most {MAX_URL} characters")
        return cls(url=url, **values)


class _Block:
    """What a vLLM block left behind: the last page key chained so far, the tokens after it, and
    the page keys this block completed (gone from the GPU with it)."""

    __slots__ = ("key", "rest", "pages")

    def __init__(self, key: bytes, rest: tuple[int, ...], pages: list[bytes]) -> None:
        self.key, self.rest, self.pages = key, rest, pages


class GpuPrefixes:
    """One engine's GPU prefix cache as polarkvd keys, built from its decoded event batches."""

    def __init__(self, ns_digest: bytes, page_tokens: int) -> None:
        self.digest, self.page_tokens = ns_digest, page_tokens
        self._blocks: dict[Any, _Block] = {}
        self._held: dict[bytes, int] = {}  # page key -> blocks that completed it (shared prefixes)
        self.counters = {"stored_blocks": 0, "removed_blocks": 0, "skipped_blocks": 0, "cleared": 0, "bad": 0}
        self.removed_since_clear = 0  # blocks evicted since the engine's cache was last emptied

    def leading(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, this engine's GPU holds without a gap."""
        held, n = self._held, 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._held)

    @property
    def blocks(self) -> int:
        """The engine's blocks that hold a cached prefix (as its events told them)."""
        return len(self._blocks)

    def apply(self, events: list[Any]) -> None:
        """One decoded batch's events (maps tagged by `type`, as msgpack decodes vLLM's)."""
        for ev in events:
            kind = ev.get("type") if isinstance(ev, dict) else None
            try:
                if kind == "BlockStored":
                    self._stored(ev)
                elif kind == "BlockRemoved":
                    self._removed(ev)
                elif kind == "AllBlocksCleared":
                    self._blocks.clear()
                    self._held.clear()
                    self.counters["cleared"] += 1
                    self.removed_since_clear = 0
                else:
                    self.counters["bad"] += 1
            except (TypeError, ValueError, KeyError, AttributeError):
                self.counters["bad"] += 1

    def _stored(self, ev: dict[str, Any]) -> None:
        hashes, tokens, size = ev["block_hashes"], ev["token_ids"], ev["block_size"]
        if (
            ev.get("medium") not in (None, "GPU")
            or ev.get("group_idx") not in (None, 0)
            or ev.get("extra_keys")
            and any(ev["extra_keys"])
            or ev.get("lora_name") is not None
            or not isinstance(size, int)
            or size <= 0
            or len(tokens) != len(hashes) * size
        ):
            self.counters["skipped_blocks"] += len(hashes) if isinstance(hashes, list) else 1
            return
        parent = ev.get("parent_block_hash")
        key: bytes = bytes(ROOT_KEY)
        rest: tuple[int, ...] = ()
        if parent is not None:
            before = self._blocks.get(parent)
            if before is None:  # stored before we listened, and not replayed: its keys are unknown
                self.counters["skipped_blocks"] += len(hashes)
                return
            key, rest = before.key, before.rest
        if len(self._blocks) + len(hashes) > MAX_BLOCKS:
            self.counters["skipped_blocks"] += len(hashes)
            return
        pt = self.page_tokens
        for i, h in enumerate(hashes):
            run = rest + tuple(tokens[i * size : (i + 1) * size])
            full = len(run) - len(run) % pt
            pages = page_keys(self.digest, run[:full], pt, key) if full else []
            if pages:
                key = pages[-1]
            rest = run[full:]
            done = [bytes(k) for k in pages]
            self._blocks[h] = _Block(key, rest, done)
            for k in done:
                self._held[k] = self._held.get(k, 0) + 1
        self.counters["stored_blocks"] += len(hashes)

    def _removed(self, ev: dict[str, Any]) -> None:
        if ev.get("medium") not in (None, "GPU") or ev.get("group_idx") not in (None, 0):
            return
        for h in ev["block_hashes"]:
            b = self._blocks.pop(h, None)
            if b is None:
                continue
            self.counters["removed_blocks"] += 1
            self.removed_since_clear += 1
            for p in b.pages:
                n = self._held.get(p, 0) - 1
                if n > 0:
                    self._held[p] = n
                else:
                    self._held.pop(p, None)


class EngineEventsSubscriber:
    """Subscribes to one engine's KV event publisher; `tick` (loop, non-blocking) applies what
    arrived and asks for replay after a gap; `close` when the engine detaches."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None,
        prefixes: GpuPrefixes,
        topic: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefixes, self._clock = prefixes, clock
        self._replay_since = 0.0
        ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sub: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self._sub.connect(endpoint)
            if replay_endpoint:
                self._replay = ctx.socket(zmq.DEALER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
                self._replay.connect(replay_endpoint)
        except zmq.ZMQError as e:  # e.g. a port that is not a number, an ipc path too long
            self.close()
            raise ProtocolError(
                f"kv_events: ZeroMQ refuses the address ({e.strerror}): endpoint {endpoint!r:.80}, "
                f"replay_endpoint {replay_endpoint!r:.80}"
            ) from None
        # the sequence number expected next: with replay, from 0 (a subscriber that joins late asks
        # at once for what the engine's buffer still holds); without, whatever comes first
        self._next: int | None = 0 if self._replay is not None else None
        self._replaying = False
        self._held_back: list[tuple[int, bytes]] = []  # live batches that arrived during a replay
        self.counters = {"batches": 0, "gaps": 0, "replayed": 0, "lost": 0, "replays_given_up": 0}
        self._ask_replay(0)

    def _ask_replay(self, start: int) -> bool:
        """Ask for the batches from `start` on; False when the request cannot go now. Never blocks:
        requests to a replay address nobody listens on queue up in ZeroMQ, and the loop must not wait."""
        if self._replay is None:
            return False
        try:
            self._replay.send_multipart([b"", start.to_bytes(8, "big")], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._replaying, self._replay_since = True, self._clock()
        return True

    def tick(self, budget: int = 256) -> None:
        until = time.monotonic() + TICK_SECONDS
        for _ in range(budget):
            if time.monotonic() > until:
                break
            try:
                frames = self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 3 or len(frames[1]) != 8:
                self.prefixes.counters["bad"] += 1
                continue
            self._live(int.from_bytes(frames[1], "big"), frames[2])
        if self._replaying:
            self._drain_replay(budget)
        if self._replaying and self._clock() - self._replay_since > REPLAY_TIMEOUT:
            self.counters["replays_given_up"] += 1
            self._end_replay()

    def _live(self, seq: int, payload: bytes) -> None:
        if self._replaying:
            self._held_back.append((seq, payload))
            if len(self._held_back) > MAX_HELD_BACK:
                self.counters["replays_given_up"] += 1
                self._end_replay()
            return
        if self._next is not None and seq > self._next and self._replay is not None:
            self.counters["gaps"] += 1
            if self._ask_replay(self._next):
                self._held_back.append((seq, payload))
                return
        if self._next is not None and seq > self._next:
            self.counters["lost"] += seq - self._next
        self._apply(seq, payload)

    def _drain_replay(self, budget: int) -> None:
        assert self._replay is not None
        for _ in range(budget):
            try:
                frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 4:
                self.prefixes.counters["bad"] += 1
                continue
            _, _topic, seq_b, payload = frames
            if seq_b == _END_SEQ:
                self._end_replay()
                return
            seq = int.from_bytes(seq_b, "big")
            if self._next is None or seq >= self._next:
                self.counters["replayed"] += 1
                self._apply(seq, payload)

    def _end_replay(self) -> None:
        """The replay ended (or is given up): the live batches kept back meanwhile, in order."""
        self._replaying = False
        held, self._held_back = self._held_back, []
        for seq, p in held:
            if self._next is None or seq >= self._next:
                if self._next is not None and seq > self._next:
                    self.counters["lost"] += seq - self._next  # older than the buffer
                self._apply(seq, p)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = _decode(payload)
            events = batch[1]
        except (ValueError, TypeError, IndexError, KeyError, msgpack.UnpackException):
            self.prefixes.counters["bad"] += 1
            events = None
        if isinstance(events, list):
            self.prefixes.apply(events)
        self._next = seq + 1
        self.counters["batches"] += 1

    def close(self) -> None:
        self._sub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)


def _decode(payload: bytes) -> Any:
    """A message's msgpack, refused (ValueError) past MAX_CONTAINERS arrays and maps."""
    made = 0

    def count(x: Any) -> Any:
        nonlocal made
        made += 1
        if made > MAX_CONTAINERS:
            raise ValueError("too many arrays and maps in one message")
        return x

    return msgpack.unpackb(payload, raw=False, list_hook=count, object_hook=count)


def parse_spec(value: object) -> tuple[str, str | None, str]:
    """`hello`'s `kv_events`: {endpoint, replay_endpoint (optional), topic (optional)}, the engine's
    publisher as vLLM's `--kv-events-config` names it. A wildcard host (`tcp://*:5557`, what vLLM
    binds) means this host: engines attach to the daemon of their own host."""
    if not isinstance(value, dict) or not set(value) <= {"endpoint", "replay_endpoint", "topic"}:
        raise ProtocolError("kv_events must be a map of endpoint, replay_endpoint, topic")
    out: list[str | None] = []
    for name in ("endpoint", "replay_endpoint"):
        ep = value.get(name)
        if ep is None and name == "replay_endpoint":
            out.append(None)
            continue
        if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://")) or len(ep) > 512:
            raise ProtocolError(f"kv_events.{name} must be a tcp:// or ipc:// address")
        out.append(ep.replace("tcp://*:", "tcp://127.0.0.1:", 1))
    topic = value.get("topic", "")
    if not isinstance(topic, str) or len(topic) > 256:
        raise ProtocolError("kv_events.topic must be a string of at most 256 characters")
    assert out[0] is not None
    return out[0], out[1], topic


class EngineEvents:
    """Every attached engine's subscriber, by session: `attach` at `hello`, `detach` when its
    connection closes, `tick` on the loop, `leading` for `where`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._subs: dict[int, tuple[Any, EngineEventsSubscriber]] = {}  # session id -> (session, subscriber)
        self._loads: dict[int, tuple[Any, EngineLoad, float]] = {}  # session id -> (session, load, when)
        self._clock = clock
        self._gossip_full = False  # warned once that engine URLs overflow the gossip metadata

    def attach(self, session: Any, spec: tuple[str, str | None, str]) -> None:
        """Follow `session`'s engine from its `hello`'s `kv_events`, as `parse_spec` checked it."""
        endpoint, replay, topic = spec
        ns = session.ns
        self._subs[session.id] = (
            session,
            EngineEventsSubscriber(endpoint, replay, GpuPrefixes(ns.digest, ns.ns.page_tokens), topic),
        )
        log.info("engine %s: following its KV events on %s", session.engine_id, endpoint)

    def detach(self, session: Any) -> None:
        if session is None:
            return
        self._loads.pop(session.id, None)
        entry = self._subs.pop(session.id, None)
        if entry is not None:
            entry[1].close()

    def report_load(self, session: Any, load: EngineLoad) -> None:
        """`session`'s engine says this is its load now (the last report is kept until it detaches)."""
        self._loads[session.id] = (session, load, self._clock())

    def loads(self, ns_digest: bytes) -> dict[str, dict[str, Any]]:
        """Per engine of this namespace that reports its load: the last report, its age in seconds,
        `stale` when it is older than LOAD_STALE_SECONDS and still says there is work, and with its
        KV events followed, `gpu_blocks`: its blocks that hold a cached prefix (a router weighs
        what a new prompt would evict there against the cache's size)."""
        now, out = self._clock(), {}
        for sid, (session, load, at) in self._loads.items():
            if session.ns.digest != ns_digest:
                continue
            age = max(0.0, now - at)
            busy = load.running or load.waiting or load.queued_prefill_tokens
            entry: dict[str, Any] = {
                "running": load.running,
                "waiting": load.waiting,
                "queued_prefill_tokens": load.queued_prefill_tokens,
                "age_s": round(age, 3),
                "stale": bool(busy) and age > LOAD_STALE_SECONDS,
            }
            if load.url:
                entry["url"] = load.url
            followed = self._subs.get(sid)
            if followed is not None:
                entry["gpu_blocks"] = followed[1].prefixes.blocks
            out[session.engine_id] = entry
        return out

    def gossip_meta(self) -> dict[str, Any]:
        """What this host tells the cluster of its engines (gossip metadata, `polarkvd route
        --discover`): {"engines": {URL: first hex digits of its namespace digest}} for each attached
        engine that reported the URL it serves at, at most GOSSIP_URL_BYTES of URLs; {} when none."""
        urls: dict[str, str] = {}
        size = 0
        for session, load, _ in sorted(self._loads.values(), key=lambda e: e[1].url):
            if not load.url or load.url in urls:
                continue
            size += len(load.url.encode()) + GOSSIP_NS_HEX + 4
            if size > GOSSIP_URL_BYTES:
                if not self._gossip_full:
                    log.warning(
                        "engine URLs past %d bytes are not published to the cluster", GOSSIP_URL_BYTES
                    )
                    self._gossip_full = True
                break
            urls[load.url] = session.ns.digest.hex()[:GOSSIP_NS_HEX]
        return {"engines": urls} if urls else {}

    def tick(self) -> None:
        for _, sub in self._subs.values():
            sub.tick()

    def leading(self, ns_digest: bytes, keys: Sequence[bytes]) -> dict[str, int]:
        """Per engine of this namespace that publishes its events: its GPU's leading pages of `keys`."""
        out: dict[str, int] = {}
        for session, sub in self._subs.values():
            if session.ns.digest == ns_digest:
                out[session.engine_id] = max(out.get(session.engine_id, 0), sub.prefixes.leading(keys))
        return out

    def close(self) -> None:
        for _, sub in self._subs.values():
            sub.close()
        self._subs.clear()
