"""Events out: this daemon's page changes, published as vLLM KV events (docs/ROUTING.md).

Owns the publisher: a subscription to the manager's events (manager/events.py) drained on the loop
every `kv_events.interval` into one `KVEventBatch` in vLLM's wire format (vllm/distributed/kv_events.py:
msgpack of `[ts, [event, ...], data_parallel_rank]`, each event a map tagged by `type`, as vLLM's
msgspec encoder writes it), sent on a PUB socket as `(topic, seq, payload)` and kept for replay on a
ROUTER socket, as vLLM's `ZmqEventPublisher` does. Every socket call is non-blocking: a slow or absent
subscriber costs dropped messages (which it can replay), never the loop's time.

The daemon does not know a page's token ids (engines send keys), so a `BlockStored` carries the page
key as its one block hash and vLLM's placeholder for the rest (no parent, no tokens, block size 0),
as vLLM's own offloading connector does for blocks it cannot describe.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import Any

import msgpack
import zmq

from polarkvd.config.kv_events import KvEventsConfig
from polarkvd.errors import ConfigError
from polarkvd.manager import Manager
from polarkvd.manager.events import DiskPagesRemoved, NamespaceKnown, PageRemoved, PageStored
from polarkvd.types import Tier

log = logging.getLogger(__name__)

#: vLLM's media (vllm/distributed/kv_events.py MEDIUM_*): DRAM (and the pages we lend the pool) are
#: host memory, disk is vLLM's "STORAGE"; L1 is GPU memory, though the daemon's, not an engine's.
MEDIUM = {Tier.VRAM: "GPU", Tier.DRAM: "CPU", Tier.DMP: "CPU", Tier.DISK: "STORAGE"}
#: what the replay socket sends after the last buffered batch (vLLM's `ZmqEventPublisher.END_SEQ`)
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Batches a tick sends to replay subscribers (a few ms of the loop); a longer replay goes on next tick.
REPLAY_BATCHES_PER_TICK = 1024


def block_stored(hashes: list[Any], medium: str) -> dict[str, Any]:
    """A `BlockStored` as vLLM's encoder writes it (fields without a default always present)."""
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": [],
        "block_size": 0,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
    }


def block_removed(hashes: list[Any], medium: str) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


ALL_BLOCKS_CLEARED: dict[str, Any] = {"type": "AllBlocksCleared"}


class KvEventsPublisher:
    """Drains the manager's events into `KVEventBatch` messages; `tick` on the loop, `close` at stop."""

    def __init__(self, cfg: KvEventsConfig, manager: Manager) -> None:
        self.cfg = cfg
        self.m = manager
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.Socket[bytes] | None = None
        self._sub = manager.events.subscribe()
        self._seq = 0
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=cfg.buffer_steps)
        self._topic = cfg.topic.encode()
        self._pending: list[dict[str, Any]] = []  # events of disk scans, sent with the next batch
        self._closed = False
        self.counters = {"batches": 0, "events": 0, "replays": 0}
        self._replaying: tuple[bytes, int] | None = None  # (identity, next seq) of a replay under way

    def _hash(self, key: bytes) -> Any:
        # vLLM's maybe_convert_block_hash: the low 64 bits of the big-endian value
        return int.from_bytes(key[-8:], "big") if self.cfg.int_hashes else key

    def start(self) -> None:
        """Bind both sockets (an address in use: `ConfigError`, naming the option), then send
        `AllBlocksCleared`: whatever a subscriber knew of an earlier run of this daemon is gone."""
        try:
            self._pub = self._bind(zmq.PUB, self.cfg.endpoint, "kv_events.endpoint")
            self._pub.set_hwm(self.cfg.hwm)
            if self.cfg.replay_endpoint:
                self._replay = self._bind(zmq.ROUTER, self.cfg.replay_endpoint, "kv_events.replay_endpoint")
        except ConfigError:
            self.close()
            raise
        self._send([ALL_BLOCKS_CLEARED])
        log.info(
            "kv events: publishing on %s%s",
            self.cfg.endpoint,
            f", replay on {self.cfg.replay_endpoint}" if self._replay is not None else "",
        )

    def _bind(self, kind: int, endpoint: str, option: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ConfigError([(option, endpoint, f"cannot bind: {e}")]) from None
        return sock

    def tick(self) -> None:
        """Publish what changed since the last tick as one batch, and answer waiting replay requests."""
        if self._closed:
            return
        events = self._translate(self._sub.take())
        if self._pending:
            events, self._pending = self._pending + events, []
        if events:
            self._send(events)
        if self._replay is not None:
            self._serve_replay()

    def _translate(self, events: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        h = self._hash
        for ev in events:
            if isinstance(ev, PageStored):
                out.append(block_stored([h(ev.key)], MEDIUM[ev.tier]))
            elif isinstance(ev, PageRemoved):
                out.append(block_removed([h(ev.key)], MEDIUM[ev.tier]))
            elif isinstance(ev, DiskPagesRemoved):
                if ev.keys:
                    out.append(block_removed([h(k) for k in ev.keys], MEDIUM[Tier.DISK]))
            elif isinstance(ev, NamespaceKnown):
                self._announce_disk(ev.digest)
        return out

    def _announce_disk(self, digest: bytes) -> None:
        """The namespace's pages on disk, once an engine attached to it (before, they could not be
        served): the disk index is scanned on a thread, the stores sent with the next batch."""
        peers = self.m.peers
        if not peers.has_disk:
            return
        fut = asyncio.get_running_loop().run_in_executor(None, peers.disk_keys, digest)

        def done(f: asyncio.Future[list[bytes]]) -> None:
            if f.cancelled() or f.exception() is not None or self._closed:
                return
            medium = MEDIUM[Tier.DISK]
            self._pending.extend(
                block_stored([self._hash(k)], medium) for k in f.result() if peers.on_disk(k)
            )

        fut.add_done_callback(done)

    def _send(self, events: list[dict[str, Any]]) -> None:
        assert self._pub is not None
        payload: bytes = msgpack.packb([time.time(), events, 0], use_bin_type=True)
        seq = self._seq.to_bytes(8, "big")
        try:
            self._pub.send_multipart((self._topic, seq, payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # over the high-water mark: subscribers replay it
        self._buffer.append((self._seq, payload))
        self._seq += 1
        self.counters["batches"] += 1
        self.counters["events"] += len(events)

    def _serve_replay(self) -> None:
        """vLLM's replay protocol: a request is `(identity, b"", start seq as 8 bytes big-endian)`;
        the answer every buffered batch from there as `(identity, b"", topic, seq, payload)`, then
        `(identity, b"", b"", END_SEQ, b"")`. A malformed request is dropped. At most
        REPLAY_BATCHES_PER_TICK batches a tick: a long replay goes on at the next tick, and requests
        wait in the socket meanwhile (a flood of them cannot hold the loop)."""
        assert self._replay is not None
        budget = REPLAY_BATCHES_PER_TICK
        while budget > 0:
            if self._replaying is None:
                try:
                    frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    return
                budget -= 1
                if len(frames) != 3 or len(frames[2]) != 8:
                    log.debug("kv events: malformed replay request (%d frames) dropped", len(frames))
                    continue
                self._replaying = (frames[0], int.from_bytes(frames[2], "big"))
                self.counters["replays"] += 1
            ident, start = self._replaying
            first = self._buffer[0][0] if self._buffer else self._seq
            part = list(itertools.islice(self._buffer, max(0, start - first), max(0, start - first) + budget))
            budget -= len(part)
            try:
                for seq, payload in part:
                    self._replay.send_multipart(
                        (ident, b"", self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK
                    )
                if part and part[-1][0] + 1 < self._seq:
                    self._replaying = (ident, part[-1][0] + 1)  # the rest at the next tick
                    return
                self._replay.send_multipart((ident, b"", b"", END_SEQ, b""), flags=zmq.NOBLOCK)
            except zmq.Again:
                log.debug("kv events: replay to a slow client cut short")
            self._replaying = None

    def stats(self) -> dict[str, Any]:
        return {"enabled": True, "endpoint": self.cfg.endpoint, "next_seq": self._seq, **self.counters}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.m.events.unsubscribe(self._sub)
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
