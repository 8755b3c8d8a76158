"""KV events out: a router's subscriber, decoding with vLLM's own event classes, follows a real
daemon's stores, demotions and removals, and recovers what it missed through the replay socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from polarkvd.errors import EXIT_CONFIG
from tests.conftest import DaemonProc, chain_tokens, store_chain, wait_for

kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="vLLM's event classes decode the stream")
msgspec = pytest.importorskip("msgspec")

pytestmark = pytest.mark.slow  # importing vLLM takes seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Subscriber:
    """What llm-d's indexer or Dynamo's router do: SUB to the stream, decode each batch with vLLM's
    `KVEventBatch`, and track the sequence numbers (a gap is what replay is for)."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.decoder = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch)
        self.batches: list[tuple[int, Any]] = []

    def poll(self, timeout_ms: int = 100) -> None:
        while self.sock.poll(timeout_ms):
            _topic, seq, payload = self.sock.recv_multipart()
            self.batches.append((int.from_bytes(seq, "big"), self.decoder.decode(payload)))
            timeout_ms = 0

    def events(self) -> list[Any]:
        return [ev for _, batch in self.batches for ev in batch.events]

    def stored(self, medium: str) -> set[bytes]:
        return {
            h
            for ev in self.events()
            if isinstance(ev, kv_events.BlockStored) and ev.medium == medium
            for h in ev.block_hashes
        }

    def removed(self, medium: str) -> set[bytes]:
        return {
            h
            for ev in self.events()
            if isinstance(ev, kv_events.BlockRemoved) and ev.medium == medium
            for h in ev.block_hashes
        }

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def publishing(daemon_factory) -> Iterator[tuple[DaemonProc, str, str]]:
    pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    d = daemon_factory(
        {
            "kv_events.enabled": "true",
            "kv_events.endpoint": pub,
            "kv_events.replay_endpoint": replay,
            "kv_events.interval": "10ms",
            "dram.high_watermark": "1.0",
        }
    )
    yield d, pub, replay


def joined(d: DaemonProc, sub: Subscriber) -> None:
    """Until the subscription has reached the publisher (ZeroMQ's slow joiner), store a fresh page
    and see whether its event arrives."""
    deadline, seed = time.monotonic() + 15, 10_000
    with d.engine() as kv:
        while time.monotonic() < deadline:
            seed += 1
            keys = store_chain(kv, chain_tokens(seed, 1))
            sub.poll(200)
            if set(keys) <= sub.stored("CPU"):
                return
    raise AssertionError("the subscriber never received an event")


def test_subscriber_sees_stores_demotions_and_removals(publishing) -> None:
    d, pub, _ = publishing
    sub = Subscriber(pub)
    try:
        joined(d, sub)
        with d.engine() as kv:
            keys = store_chain(kv, chain_tokens(1, 6))
        wait_for(lambda: (sub.poll(), set(keys) <= sub.stored("CPU"))[1], what="BlockStored CPU of 6 pages")
        stored = [
            ev for ev in sub.events() if isinstance(ev, kv_events.BlockStored) and ev.block_hashes[0] in keys
        ]
        # the daemon knows keys, not tokens: vLLM's placeholder for the rest (docs/ROUTING.md)
        assert all(ev.token_ids == [] and ev.parent_block_hash is None for ev in stored)

        with d.control() as c:  # DRAM -> disk: removed from CPU, stored on STORAGE
            c.evict("dram", 1 << 40)
        wait_for(
            lambda: (sub.poll(), set(keys) <= sub.removed("CPU") and set(keys) <= sub.stored("STORAGE"))[1],
            what="BlockRemoved CPU and BlockStored STORAGE",
        )
        with d.control() as c:  # off the disk too
            c.evict("disk", 1 << 40)
        wait_for(lambda: (sub.poll(), set(keys) <= sub.removed("STORAGE"))[1], what="BlockRemoved STORAGE")
        seqs = [s for s, _ in sub.batches]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "sequence numbers without gaps"
    finally:
        sub.close()


def test_replay_recovers_missed_batches(publishing) -> None:
    """A subscriber that joins late asks for everything from sequence 0 and gets the batches it
    missed, in order, from the daemon's start (`AllBlocksCleared`) on, then the end marker."""
    d, pub, replay = publishing
    with d.engine() as kv:
        keys = store_chain(kv, chain_tokens(2, 4))
    sub = Subscriber(pub)
    try:
        joined(d, sub)
        first_live = sub.batches[0][0]
        assert first_live > 0, "the earlier batches were missed: what replay is for"
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        got: list[tuple[int, Any]] = []
        while dealer.poll(10_000):
            _empty, _topic, seq, payload = dealer.recv_multipart()
            if seq == (-1).to_bytes(8, "big", signed=True):
                break
            got.append((int.from_bytes(seq, "big"), sub.decoder.decode(payload)))
        dealer.close(linger=0)
        seqs = [s for s, _ in got]
        assert seqs[: first_live + 1] == list(range(first_live + 1))
        assert isinstance(got[0][1].events[0], kv_events.AllBlocksCleared)
        replayed = {
            h
            for _, b in got
            for ev in b.events
            if isinstance(ev, kv_events.BlockStored)
            for h in ev.block_hashes
        }
        assert set(keys) <= replayed
    finally:
        sub.close()


def test_an_endpoint_in_use_stops_the_start_naming_the_option(daemon_factory, tmp_path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(RuntimeError) as e:
            daemon_factory({"kv_events.enabled": "true", "kv_events.endpoint": f"tcp://127.0.0.1:{port}"})
        assert f"daemon exited with {EXIT_CONFIG}" in str(e.value)
        assert "kv_events.endpoint" in str(e.value)
    finally:
        busy.close()


def test_disk_pages_are_announced_once_their_namespace_attaches_after_a_restart(publishing) -> None:
    """A restarted daemon starts with `AllBlocksCleared`; its disk pages become servable (and are
    announced as `STORAGE`) when an engine of their namespace attaches."""
    d, pub, _ = publishing
    with d.engine() as kv:
        keys = store_chain(kv, chain_tokens(5, 4))
    with d.control() as c:
        c.evict("dram", 1 << 40)
    assert d.stop() == 0
    d.start()
    sub = Subscriber(pub)
    try:
        joined(d, sub)  # attaches an engine of the namespace: the disk scan starts
        wait_for(
            lambda: (sub.poll(), set(keys) <= sub.stored("STORAGE"))[1],
            what="BlockStored STORAGE after restart",
        )
    finally:
        sub.close()
